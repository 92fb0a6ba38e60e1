"""`hotpeft bench --smoke` end to end on the tiny model: every scenario runs and reports (figures not asserted)."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def test_bench_smoke_runs_every_scenario(tiny_dirs, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "hotpeft.cli", "bench", "--smoke", "--model", str(tiny_dirs["base"]),
         "--dtype", "float32", "--home", str(tmp_path / "home"), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    sc = result["scenarios"]
    for key in "abcdeij":
        assert sc[key]["requests"] >= 1 and sc[key]["output_tokens"] > 0, (key, sc[key])
        assert sc[key]["ttft_p50_ms"] is not None
    assert sc["e"]["roofline_tok_s"] > 0 and sc["e"]["read_bandwidth_gb_s"] > 0
    assert len(sc["f"]["cold_ttft_ms"]) == 1
    assert len(sc["g"]["served_after_ms"]) == 2 and sc["g"]["max_ms"] > 0
    assert sc["h"]["adapters"] == 3 and sc["h"]["bytes"] > 0 and sc["h"]["p50_ms"] > 0
    assert set(result["results"]) == {"(c)/(b)", "(c)/(a)", "(e) of roofline", "(d)/(b)", "(f) ms", "(g) max ms",
                                      "(h) p50 ms", "(i)/(b)", "(j)/(b)"}
    assert "| (c) engine, 8 LoRA + 2 soft |" in proc.stdout  # the printed table


def test_bench_refuses_bad_arguments():
    proc = subprocess.run([sys.executable, "-m", "hotpeft.cli", "bench", "--clients", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--clients >= 1" in proc.stderr


def test_bench_workload_smoke_runs_every_popularity_open_and_closed_loop(tiny_dirs, tmp_path):
    out = tmp_path / "workload.json"
    proc = subprocess.run(
        [sys.executable, "-m", "hotpeft.cli", "bench", "--workload", "--smoke", "--model", str(tiny_dirs["base"]),
         "--dtype", "float32", "--home", str(tmp_path / "home"), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert {(r["popularity"], r["rate"] > 0) for r in runs} == {
        (p, o) for p in ("identical", "uniform", "skewed", "distinct") for o in (True, False)}
    for r in runs:
        assert r["completed"] == r["requests"] == 6 and not r["errors"], r
        assert r["output_tokens"] > 0 and r["prompt_tokens"] > 0 and r["ttft_ms"]["p99"] is not None
        assert r["kv"]["blocks"] > 0 and 0 <= r["slo"]["attainment"] <= 1
    # The first run loads its adapter into the engine; 4 small adapters then stay resident.
    assert runs[0]["adapter_loads"] >= 1 and sum(r["adapter_loads"] for r in runs) <= 4
    assert "| distinct |" in proc.stdout


def test_bench_workload_and_synthetic_names_refuse_bad_values(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hotpeft.cli", "bench", "--workload", "--prompt-len", "normal:5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "lognormal:MEDIAN,SIGMA" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "hotpeft.cli", "serve", "--model", "synthetic:gpt-9"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HOTPEFT_HOME": str(tmp_path)})
    assert proc.returncode == 2 and "synthetic:llama-3.1-8b" in proc.stderr and "synthetic:llama-3.2-1b" in proc.stderr
