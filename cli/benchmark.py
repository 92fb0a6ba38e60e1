"""`hotpeft eval --benchmark TASK`: lm-evaluation-harness against a running server (trainer/benchmark.py).

    hotpeft eval --benchmark hotpeft_intents_mc --adapter support-intent [--url http://127.0.0.1:8000]
    hotpeft eval --benchmark tasks/my_task.yaml --adapter a --adapter b@2 --limit 50 --json

The base is always benchmarked; each --adapter (NAME: its active version, or NAME@N) is too, and its
score is stored on that version with the base's beside it. --home / --registry-url must be the server's
(the registry it watches), --model its base (the tokenizer lm-eval counts with).
Exit status: 0 done, 1 lm-eval failed, 2 bad input (a flag is named) or no server at --url.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"


def add_benchmark_flags(parser: argparse.ArgumentParser) -> None:
    """Flags `hotpeft eval` takes for a benchmark run; --adapter, --limit, --json and the TrainerEnv flags
    (--home, --model, --registry-url) are the parser's own."""
    parser.add_argument("--benchmark", metavar="TASK",
                        help="run lm-evaluation-harness against a running server instead: a generated task "
                             "(hotpeft_intents_mc, hotpeft_retention_gen), a task YAML or a folder of them "
                             "(local data only); --limit caps the documents per task")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"with --benchmark: the server (default {DEFAULT_URL})")
    parser.add_argument("--api-key", default=None,
                        help="with --benchmark: a key the server accepts (default: env HOTPEFT_API_KEY)")
    parser.add_argument("--chat", action="store_true",
                        help="with --benchmark: render documents as chats (generation tasks go to "
                             "/v1/chat/completions with each adapter's own template)")


def benchmark_main(args: argparse.Namespace) -> int:
    from hotpeft.cli.train import _env, _quiet  # deferred: cli.train imports this module (a cycle otherwise)
    from hotpeft.trainer import benchmark as bench  # deferred: httpx and SQLAlchemy, not for `hotpeft --help`
    from hotpeft.trainer.benchmark_tasks import resolve_tasks  # deferred: with the rest of the benchmark
    from hotpeft.trainer.errors import ConfigInvalid, TrainerError  # deferred: with the rest of the benchmark

    api_key = args.api_key or os.environ.get("HOTPEFT_API_KEY") or None
    refs = list(getattr(args, "adapter", None) or [])
    limit = getattr(args, "limit", None)
    _quiet()
    try:
        if limit is not None and int(limit) < 1:
            raise ConfigInvalid("limit", f"--limit must be 1 or more, got {limit}")
        if _missing_lm_eval():
            raise ConfigInvalid("benchmark", "--benchmark needs lm-evaluation-harness: pip install 'lm-eval[api]'")
        env = _env(args)
        with tempfile.TemporaryDirectory(prefix="hotpeft-tasks-") as tmp:
            spec = resolve_tasks(args.benchmark, Path(tmp))  # bad input is refused before the server is asked
            base_card = bench.served_base(args.url, api_key)
            base = base_card["id"]
            tokenizer = bench.tokenizer_folder(env, base, args.url)
            records = bench.resolve_versions(env, refs, args.url, api_key)
            say = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr))
            results = bench.run_benchmark(args.url, spec, [base] + [r.key for r in records], tokenizer,
                                          api_key=api_key, limit=limit, chat=args.chat, events=say,
                                          max_length=base_card.get("max_model_len"))
        stored = bench.store_scores(env, records, results, base, chat=args.chat)
    except TrainerError as e:
        print(f"hotpeft eval: {e.message}", file=sys.stderr)
        return 1 if isinstance(e, bench.BenchmarkFailed) else 2
    if args.json:
        print(json.dumps({"base": base, "results": results,
                          "stored": {r.key: r.metrics["benchmarks"] for r in stored}}, indent=1))
    else:
        print(bench.format_table(results))
        for r in stored:
            print(f"stored on {r.key}: metrics.benchmarks {', '.join(sorted(r.metrics['benchmarks']))}")
    return 0


def _missing_lm_eval() -> bool:
    return importlib.util.find_spec("lm_eval") is None

