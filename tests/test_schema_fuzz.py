"""Schemathesis against /openapi.json of a real server: positive and negative cases, bounded.

Checks: no 5xx, every status is one the schema documents, bodies and content types match it,
and data the schema forbids is refused with a 4xx. Hypothesis drives each operation's strategy
directly (schemathesis' pytest plugin does not run under this pytest), a fixed number of
examples per operation and mode, derandomized so a run is repeatable.
"""
from __future__ import annotations

import pytest
import schemathesis
from conftest import ServerProcess
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import (
    content_type_conformance, negative_data_rejection, not_a_server_error, response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
EXAMPLES = 40


@pytest.fixture(scope="module")
def fuzzed_server(tiny_dirs, tmp_path_factory):
    server = ServerProcess(["--model", str(tiny_dirs["base"]), "--adapters-dir", str(tiny_dirs["adapters"]),
                            "--dtype", "float32", "--max-total-tokens", "64"], tmp_path_factory.mktemp("fuzz-home"))
    yield server
    server.stop()


def test_api_conforms_to_its_schema(fuzzed_server, figure):
    schema = schemathesis.openapi.from_url(fuzzed_server.url + "/openapi.json")
    failures, calls, statuses = {}, {"n": 0}, {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case):
                calls["n"] += 1
                response = case.call(timeout=60)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                case.validate_response(response, checks=CHECKS)

            try:
                run()
            except Unsatisfiable:
                pass  # nothing to negate: an operation without parameters has no negative cases
            except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001 - gathered: one report for every operation
                failures[f"{operation.label} ({mode.value})"] = str(e)[:1500]
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    assert fuzzed_server.proc.poll() is None
    figure("schemathesis", operations=len(operations), calls=calls["n"], status_counts=dict(sorted(statuses.items())),
           server_errors=sum(n for s, n in statuses.items() if s >= 500))
