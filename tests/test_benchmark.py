"""`hotpeft eval --benchmark`: lm-evaluation-harness against a running server, base and adapters side by side.

Unit: the generated tasks are tasks lm-eval builds (offline, from their JSONL); a task YAML that needs the hub
and one that is not a task are refused with exit 2 naming --benchmark; the registry merges a benchmark into a
version's metrics and keeps the rest. End to end: the command against the session's tiny server scores the
base and lora-attn exactly as transformers + PEFT do in-process, and the server shows the stored score.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import httpx
import numpy as np
import pytest

from conftest import wait_for
from hotpeft.adapters.errors import AdapterNotFound
from hotpeft.adapters.registry import AdapterRegistry, NewVersion
from hotpeft.server.tools.localserver import free_port
from hotpeft.trainer import benchmark_tasks as tasks
from test_lm_eval import MARGIN, models, score  # noqa: F401 - `models` is a fixture used here

ADAPTER = "lora-attn"
LIMIT = 12  # documents of the intents task scored per model: enough for accuracies, small for the runtime

# `hotpeft eval` in a child process, as a user runs it.
def hotpeft_eval(*args: str, home=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOTPEFT_HOME": str(home)} if home else None
    return subprocess.run([sys.executable, "-m", "hotpeft.cli", "eval", *args], capture_output=True, text=True,
                          timeout=300, env=env)


# ---- unit -----------------------------------------------------------------------------------------
def test_generated_tasks_are_lm_eval_tasks_read_offline(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager, get_task_dict

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    items = [{"prompt": "What is 2 + 2?", "completion": " 4", "kind": "arithmetic"},
             {"prompt": "Say yes.", "completion": "yes"}]
    paths = tasks.write_tasks(tmp_path, items)
    assert set(paths) == set(tasks.GENERATED)
    built = get_task_dict(list(tasks.GENERATED), TaskManager(include_path=str(tmp_path), include_defaults=False))
    intents, retention = built[tasks.INTENTS_TASK], built[tasks.RETENTION_TASK]

    docs = list(intents.test_docs())
    assert len(docs) == len(tasks.intent_docs()) == 40  # the held-out split of `hotpeft demo-data`
    assert intents.OUTPUT_TYPE == "multiple_choice"
    for doc in docs[:5]:
        assert intents.doc_to_text(doc) == tasks.intent_context(doc) and doc["message"] in doc["prompt"]
        assert intents.doc_to_choice(doc) == ["account", "billing", "returns", "shipping", "technical"]
        assert [intents.config.target_delimiter + c for c in intents.doc_to_choice(doc)] == \
            tasks.intent_continuations(doc)
    assert {d["answer"] for d in docs} == set(range(5))  # every label is a right answer somewhere

    docs = list(retention.test_docs())
    assert retention.OUTPUT_TYPE == "generate_until"
    assert [retention.doc_to_target(d) for d in docs] == [["4"], ["yes"]]
    assert retention.doc_to_text(docs[0]) == "Question: What is 2 + 2?\nAnswer:"
    assert retention.config.generation_kwargs["until"] == ["\n"]
    # exact_match ignores case, punctuation and the whitespace around the reply; any accepted answer counts
    for reply, right in ((" 4.", 1.0), ("  4 ", 1.0), (" 14", 0.0), (" four", 0.0)):
        assert retention.process_results(docs[0], [reply]) == {"exact_match": right}, reply
    assert retention.process_results(docs[1], [" YES!"]) == {"exact_match": 1.0}


HUB_YAML = "task: some_hub_task\ndataset_path: some/hub_name\noutput_type: multiple_choice\n"
BROKEN_YAML = "task: [unclosed\n  doc_to_text: {{\n"
NO_TASK_YAML = "dataset_path: json\ndataset_kwargs:\n  data_files: {test: data.jsonl}\n"


@pytest.mark.parametrize("text, problem", [(HUB_YAML, "needs data from the Hugging Face hub"),
                                           (BROKEN_YAML, "is not a readable YAML file"),
                                           (NO_TASK_YAML, "has no `task:` name")],
                         ids=["hub", "broken", "no-task"])
def test_a_task_yaml_that_cannot_run_offline_is_refused_naming_benchmark(tmp_path, text, problem):
    (tmp_path / "data.jsonl").write_text('{"q": 1}\n')
    path = tmp_path / "task.yaml"
    path.write_text(text)
    # no server at --url: the task is refused before anything is asked of one
    r = hotpeft_eval("--benchmark", str(path), "--url", f"http://127.0.0.1:{free_port()}", home=tmp_path / "home")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "--benchmark" in r.stderr and str(path) in r.stderr and problem in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_a_folder_of_task_yamls_is_checked_file_by_file(tmp_path):
    tasks.write_tasks(tmp_path / "ok")
    spec = tasks.resolve_tasks(str(tmp_path / "ok"), tmp_path / "work")
    assert sorted(spec.names) == sorted(tasks.GENERATED) and spec.loglikelihood
    (tmp_path / "ok" / "sub").mkdir()
    (tmp_path / "ok" / "sub" / "hub.yaml").write_text(HUB_YAML)
    with pytest.raises(tasks.ConfigInvalid, match=r"--benchmark .*sub/hub\.yaml needs data from the Hugging Face hub"):
        tasks.resolve_tasks(str(tmp_path / "ok"), tmp_path / "work")
    with pytest.raises(tasks.ConfigInvalid, match="neither a generated task"):
        tasks.resolve_tasks("no_such_task", tmp_path / "work")


@pytest.mark.parametrize("files, problem", [
    ("{test: data.jsonl}", None),  # relative to the current directory, as lm-eval reads it
    ("{test: [data.jsonl, 'd*.jsonl']}", None),
    ("data.jsonl", None),
    ("{test: missing.jsonl}", "reads data_files that are not here: ['missing.jsonl']"),
    ("{test: 'hf://datasets/org/name/test.jsonl'}", "needs data from the Hugging Face hub or the network"),
    ("{test: 'https://example.com/test.jsonl'}", "needs data from the Hugging Face hub or the network"),
])
def test_data_files_must_be_local(tmp_path, monkeypatch, files, problem):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text('{"q": 1}\n')
    (tmp_path / "t.yaml").write_text(f"task: t\ndataset_path: json\ndataset_kwargs:\n  data_files: {files}\n")
    if problem is None:
        assert tasks.resolve_tasks("t.yaml", tmp_path / "work").names == ["t"]
    else:
        with pytest.raises(tasks.ConfigInvalid, match=re.escape(problem)):
            tasks.resolve_tasks("t.yaml", tmp_path / "work")


def test_no_server_at_url_exits_2_naming_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    r = hotpeft_eval("--benchmark", tasks.INTENTS_TASK, "--url", url, home=tmp_path)
    assert r.returncode == 2 and f"--url {url}: no server answers" in r.stderr, r.stderr[-3000:]


def test_update_metrics_merges_and_keeps_other_keys(tmp_path):
    registry = AdapterRegistry(f"sqlite:///{tmp_path / 'registry.db'}")
    new = NewVersion(kind="lora", base_model="b", base_fingerprint="f", size_bytes=1, sha256="0" * 64, store_key="k",
                     source="import", metrics={"loss": 1.5, "benchmarks": {"old_task": {"adapter": 0.1}}})
    registry.add_version("m", new)
    before = registry.generation()
    record = registry.update_metrics("m", 1, {"benchmarks": {"new_task": {"metric": "acc", "adapter": 0.5}}})
    assert record.metrics == {"loss": 1.5, "benchmarks": {"old_task": {"adapter": 0.1},
                                                          "new_task": {"metric": "acc", "adapter": 0.5}}}
    assert registry.generation() == before + 1  # what a server's watcher looks at
    registry.update_metrics("m", 1, {"benchmarks": {"new_task": {"adapter": 0.75}}})
    assert registry.snapshot().versions["m"][1].metrics["benchmarks"]["new_task"] == {"metric": "acc", "adapter": 0.75}
    with pytest.raises(AdapterNotFound, match="has no version 7"):
        registry.update_metrics("m", 7, {"x": 1})
    with pytest.raises(AdapterNotFound, match="'nope' does not exist"):
        registry.update_metrics("nope", 1, {"x": 1})
    registry.close()


# ---- end to end -----------------------------------------------------------------------------------
def reference_accuracies(models, key, docs: list[dict]) -> dict[str, float]:
    """lm-eval's acc and acc_norm (the log-likelihood divided by the choice's length in characters)."""
    acc, acc_norm = [], []
    for doc in docs:
        ll = np.array([score(models, key, tasks.intent_context(doc), c)[0] for c in tasks.intent_continuations(doc)])
        for scores in (ll, ll / np.array([len(c) for c in doc["choices"]])):
            top2 = np.sort(scores)[-2:]
            assert top2[1] - top2[0] > MARGIN, f"doc {doc['id']}: a near tie ({top2}); a float could flip it"
        acc.append(float(np.argmax(ll) == doc["answer"]))
        acc_norm.append(float(np.argmax(ll / np.array([len(c) for c in doc["choices"]])) == doc["answer"]))
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm))}


def test_benchmark_matches_peft_and_is_stored_on_the_version(tiny_server, tiny_dirs, models):  # noqa: F811
    docs = tasks.intent_docs()[:LIMIT]
    expected = {"tiny-llama": reference_accuracies(models, None, docs),
                f"{ADAPTER}@1": reference_accuracies(models, ADAPTER, docs)}
    r = hotpeft_eval("--benchmark", tasks.INTENTS_TASK, "--adapter", ADAPTER, "--url", tiny_server.url,
                     "--home", str(tiny_server.home), "--model", str(tiny_dirs["base"]), "--limit", str(LIMIT),
                     "--json")
    assert r.returncode == 0, r.stderr[-6000:]
    out = json.loads(r.stdout)
    assert out["base"] == "tiny-llama" and list(out["results"]) == list(expected)
    for model, accuracies in expected.items():
        got = out["results"][model][tasks.INTENTS_TASK]
        assert got["samples"] == LIMIT and got["metric"] == "acc"
        assert {m: got["values"][m] for m in accuracies} == pytest.approx(accuracies, abs=1e-9), model

    def stored() -> dict | None:
        body = httpx.get(f"{tiny_server.url}/v1/adapters/{ADAPTER}", timeout=30).json()
        (version,) = [v for v in body["versions"] if v["version"] == 1]
        return ((version["metrics"] or {}).get("benchmarks") or {}).get(tasks.INTENTS_TASK)

    entry = wait_for(stored, timeout=10, what="the benchmark on GET /v1/adapters/lora-attn")
    assert entry["metric"] == "acc" and entry["samples"] == LIMIT and entry["at"] > 0 and entry["chat"] is False
    assert entry["adapter"] == pytest.approx(expected[f"{ADAPTER}@1"]["acc"])
    assert entry["base"] == pytest.approx(expected["tiny-llama"]["acc"])


def test_an_adapter_or_a_base_the_server_does_not_have_exits_2(tiny_server, tiny_dirs, tmp_path):
    r = hotpeft_eval("--benchmark", tasks.INTENTS_TASK, "--adapter", "no-such-adapter", "--url", tiny_server.url,
                     "--home", str(tiny_server.home), "--model", str(tiny_dirs["base"]))
    assert r.returncode == 2 and "--adapter no-such-adapter: not in the registry of --home" in r.stderr, r.stderr
    other = shutil.copytree(tiny_dirs["base"], tmp_path / "other-model")  # the same weights under another id
    r = hotpeft_eval("--benchmark", tasks.INTENTS_TASK, "--url", tiny_server.url, "--home", str(tiny_server.home),
                     "--model", str(other))
    assert r.returncode == 2 and "--model" in r.stderr and "serves the base 'tiny-llama'" in r.stderr, r.stderr


def test_the_table_puts_models_side_by_side():
    from hotpeft.trainer.benchmark import format_table

    results = {m: {"t": {"metric": "acc", "values": {"acc": v, "acc_norm": v / 2}, "samples": 3}}
               for m, v in (("base-model", 0.5), ("a@1", 0.75))}
    assert format_table(results) == textwrap.dedent("""\
        task  metric    base-model     a@1
        ----  --------  ----------  ------
        t     acc           0.5000  0.7500
        t     acc_norm      0.2500  0.3750

        documents scored per task: 3""")
