"""`hotpeft bench --ray` as a subprocess: the single process, then 1 and 2 Ray Serve replicas (tiny model)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e .[ray])")


def test_bench_ray_measures_the_baseline_and_one_and_two_replicas(tiny_dirs, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "hotpeft.cli", "bench", "--ray", "--model", str(tiny_dirs["base"]),
         "--duration", "3", "--clients", "2", "--max-tokens", "2", "--adapters", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env={**os.environ, "HOTPEFT_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    runs = {r["replicas"]: r for r in result["runs"]}
    assert sorted(runs) == [0, 1, 2]
    for r in runs.values():
        assert r["requests"] > 0 and r["tok_s"] > 0 and r["ttft_p95_ms"] >= r["ttft_p50_ms"] > 0
        assert sum(r["requests_per_replica"].values()) == r["requests"]
    assert runs[0]["affinity_hit_rate"] is None  # one process: nothing to route
    assert len(runs[1]["requests_per_replica"]) == 1 and "-" not in runs[1]["requests_per_replica"]
    assert 0 <= runs[2]["affinity_hit_rate"] <= 1 and len(runs[2]["requests_per_replica"]) <= 2
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| no Ray", "| 1 |", "| 2 |"))]
    assert len(rows) == 3
