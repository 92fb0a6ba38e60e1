"""`hotpeft bench --smoke` end to end on the tiny model: every scenario runs and reports (figures not asserted)."""
from __future__ import annotations

import json
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
    for key in "abcde":
        assert sc[key]["requests"] >= 1 and sc[key]["output_tokens"] > 0, (key, sc[key])
        assert sc[key]["ttft_p50_ms"] is not None
    assert sc["e"]["roofline_tok_s"] > 0 and sc["e"]["read_bandwidth_gb_s"] > 0
    assert len(sc["f"]["cold_ttft_ms"]) == 1
    assert len(sc["g"]["served_after_ms"]) == 2 and sc["g"]["max_ms"] > 0
    assert sc["h"]["adapters"] == 3 and sc["h"]["bytes"] > 0 and sc["h"]["p50_ms"] > 0
    assert set(result["results"]) == {"(c)/(b)", "(c)/(a)", "(e) of roofline", "(d)/(b)", "(f) ms", "(g) max ms",
                                      "(h) p50 ms"}
    assert "| (c) engine, 8 LoRA + 2 soft |" in proc.stdout  # the printed table


def test_bench_refuses_bad_arguments():
    proc = subprocess.run([sys.executable, "-m", "hotpeft.cli", "bench", "--clients", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--clients >= 1" in proc.stderr
