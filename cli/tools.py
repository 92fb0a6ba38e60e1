"""`hotpeft bench` and `hotpeft loadtest`: measure a server (BENCHMARKS.md, RELIABILITY.md)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from hotpeft.server.tools import loadtest

BENCH_DOC = """`hotpeft bench`: the engine against what people write today, in one reproducible run.

    hotpeft bench [--model ID|DIR] [--quantize auto] [--clients 16] [--duration 30] [--out bench.json]
    hotpeft bench --smoke          # seconds, for the test suite: every scenario, figures not meaningful
    hotpeft bench --ray            # instead: Ray Serve replicas (bench_ray.py)
    hotpeft bench --workload ...   # instead: one of the field's workloads (traffic.py; below)

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
(i) engine, N streams on the base, half of them constrained to a JSON schema (structured outputs)
(j) engine, N streams on the base, each asking for the top 5 logprobs of every token

--workload: adapter popularity identical / uniform / skewed (Zipf) / distinct over --adapters
rank-8 LoRAs, open-loop arrivals (Poisson or Gamma with --cv) at --rate req/s or closed loop
(--rate 0), prompt and output lengths from a distribution; reports throughput, TTFT and ITL
p50/p95/p99, SLO attainment, peak KV blocks, preemptions, prefix-cache hit rate, adapter loads.
--model synthetic:llama-3.1-8b (or llama-3.2-1b, smollm2-135m): a real model's shapes with random
weights, nothing downloaded ((a), which loads weights with transformers, is skipped for it).
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
    p.add_argument("--compile", default="auto", choices=["auto", "off", "on"], help="the server's --compile")
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
    p.add_argument("--adapters", type=int, default=32, help="--ray, --workload: adapters in the workload")
    p.add_argument("--zipf-alpha", "--zipf", dest="zipf_alpha", type=float, default=1.1,
                   help="--ray, --workload skewed: Zipf exponent of adapter popularity")
    w = p.add_argument_group("--workload")
    w.add_argument("--workload", action="store_true", help="run one of the field's workloads instead of (a)-(h)")
    w.add_argument("--popularity", default="skewed", choices=["identical", "uniform", "skewed", "distinct", "all"])
    w.add_argument("--rate", type=float, default=4.0, help="requests/s of the open-loop arrivals (0: closed loop)")
    w.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of the gaps (1: Poisson)")
    w.add_argument("--requests", type=int, default=200, help="requests per run")
    w.add_argument("--prompt-len", default="lognormal:128,0.5", help="fixed:N, uniform:LO,HI or lognormal:MEDIAN,SIGMA")
    w.add_argument("--output-len", default="uniform:32,128", help="as --prompt-len")
    w.add_argument("--rank", type=int, default=8, help="LoRA rank of the workload's adapters")
    w.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="SLO on time to first token")
    w.add_argument("--slo-itl-ms", type=float, default=100.0, help="SLO on a request's mean inter-token latency")
    w.add_argument("--kv-cache-mib", type=int, default=None, help="the server's --kv-cache-mib")
    w.add_argument("--max-num-seqs", type=int, default=64, help="the server's --max-num-seqs")
    w.add_argument("--seed", type=int, default=0, help="seed of the popularity, lengths and arrivals")


def bench_main(args: argparse.Namespace) -> int:
    if args.ray:
        from hotpeft.server.tools import bench_ray  # starts Ray clusters: only for --ray

        result = bench_ray.run(args)
        print(bench_ray.table(result))
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
        return 0
    if args.workload:
        return _workload(args)
    from hotpeft.server.tools import bench  # imports torch: only when a benchmark runs

    return bench.run_and_report(args)


def _workload(args: argparse.Namespace) -> int:
    from hotpeft.model.source import DEFAULT_MODEL_ID  # the model package: only when a benchmark runs
    from hotpeft.server.tools import bench_workload, traffic  # imports torch: only when a benchmark runs

    args.model = args.model or DEFAULT_MODEL_ID
    popularities = list(traffic.POPULARITY) if args.popularity == "all" or args.smoke else [args.popularity]
    loops = [args.rate]
    if args.smoke:
        args.adapters, args.requests, args.prompt_len, args.output_len = 4, 6, "uniform:4,12", "uniform:2,6"
        loops = [20.0, 0.0]
        args.clients = min(args.clients, 3)
    try:
        traffic.Lengths(args.prompt_len), traffic.Lengths(args.output_len)
    except ValueError as e:
        print(f"hotpeft bench: {e}", file=sys.stderr)
        return 2
    if args.adapters < 1 or args.requests < 1 or args.rate < 0 or args.cv <= 0 or args.clients < 1:
        print("hotpeft bench: --adapters >= 1, --requests >= 1, --rate >= 0, --cv > 0 and --clients >= 1 are required",
              file=sys.stderr)
        return 2
    result = bench_workload.run(args, popularities, loops)
    print(bench_workload.table(result))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def loadtest_main(args: argparse.Namespace) -> int:
    return loadtest.main(args)
