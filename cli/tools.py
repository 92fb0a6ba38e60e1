"""`hotpeft bench` and `hotpeft loadtest`: measure a server (BENCHMARKS.md, RELIABILITY.md)."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from hotpeft.server.tools import loadtest

BENCH_DOC = """`hotpeft bench`: the engine against what people write today, in one reproducible run.

    hotpeft bench [--model ID|DIR] [--quantize auto] [--clients 16] [--duration 30] [--out bench.json]
    hotpeft bench --smoke          # seconds, for the test suite: every scenario, figures not meaningful
    hotpeft bench --ray            # instead: Ray Serve replicas (bench_ray.py)

It writes synthetic adapters for the chosen base (8 LoRA of ranks 8 and 16 on attention or on
attention + MLP, 2 soft prompts, 3 "cold" rank-16 LoRA), starts `hotpeft serve` on 127.0.0.1,
drives it with concurrent streaming clients for a bounded time per scenario, stops it, then
runs the naive baseline in this process, and prints a table and writes JSON:

(a) naive: transformers `generate` + PEFT `set_adapter`, requests served one after another
(b) engine, base only, N concurrent streams
(c) engine, N streams over the 8 LoRA and 2 soft-prompt adapters
(d) engine, N streams all on one rank-16 LoRA
(e) batch-1 decode rate against the memory-bandwidth roofline (read bandwidth / resident bytes)
(f) cold adapter: TTFT of the first request to an adapter not yet resident, minus a resident one's
(g) pick-up: this process registers a new version in the server's registry (as `hotpeft train` or
    another server does); time until the server answers a request naming that version
(h) GET /metrics: render time with 200 more adapters registered, each with traffic
"""


def add_parsers(sub) -> None:
    _bench_parser(sub)
    loadtest.add_parser(sub)


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the engine against naive generate + PEFT (see BENCHMARKS.md)",
                       description=BENCH_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base model (default: the embedded default)")
    p.add_argument("--quantize", default="auto", choices=["auto", "none", "int8", "nf4"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--home", default=os.environ.get("HOTPEFT_HOME", "~/.hotpeft"), help="hotpeft home (model cache)")
    p.add_argument("--clients", type=int, default=16, help="concurrent streams in (b), (c), (d) and (a)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per scenario ((e) gets half)")
    p.add_argument("--rounds", type=int, default=3, help="(b), (c), (d) run interleaved in this many rounds")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (EOS ignored)")
    p.add_argument("--cold", type=int, default=3, help="cold adapters measured in (f)")
    p.add_argument("--pickups", type=int, default=10, help="versions registered from outside in (g)")
    p.add_argument("--metrics-adapters", type=int, default=200, help="adapters registered for (h)")
    p.add_argument("--out", default="bench.json", help="where to write the JSON")
    p.add_argument("--smoke", action="store_true", help="a few seconds in all: checks that every scenario runs")
    p.add_argument("--ray", action="store_true", help="instead: 1 vs 2 Ray Serve replicas on Zipf-popular adapters "
                                                      "(server/tools/bench_ray.py; pip install hotpeft[ray])")
    p.add_argument("--adapters", type=int, default=32, help="--ray: adapters in the workload")
    p.add_argument("--zipf", type=float, default=1.1, help="--ray: Zipf exponent of adapter popularity")


def bench_main(args: argparse.Namespace) -> int:
    if args.ray:
        from hotpeft.server.tools import bench_ray  # starts Ray clusters: only for --ray

        result = bench_ray.run(args)
        print(bench_ray.table(result))
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
        return 0
    from hotpeft.server.tools import bench  # imports torch: only when a benchmark runs

    return bench.run_and_report(args)


def loadtest_main(args: argparse.Namespace) -> int:
    return loadtest.main(args)
