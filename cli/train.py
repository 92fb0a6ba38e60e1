"""`hotpeft train`, `hotpeft eval` and `hotpeft demo-data`: the trainer from the shell.

    hotpeft demo-data --out demo/
    hotpeft train --data demo/support-summaries.train.jsonl --validation demo/support-summaries.valid.jsonl \
        --method lora --name support-sum --template 'Summarize the following conversation.\n\n{prompt}\n\nSummary:'
    hotpeft eval --adapter support-sum --data demo/support-summaries.valid.jsonl --template '...'

Training registers into the registry a server started with the same --home (or --registry-url
and --store-dir) watches: the server serves the new version within a second, without a restart.
Exit status: 0 done, 1 trained but not registered (--min-improvement) or failed, 2 bad input.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import sys
import time
import typing
from pathlib import Path

from hotpeft.cli.benchmark import add_benchmark_flags, benchmark_main
from hotpeft.trainer.config import GENERATION_METRICS, TrainConfig, check_metrics, flag, parse_min_improvement
from hotpeft.trainer.demo import SUMMARY_TEMPLATE, write_demo
from hotpeft.trainer.env import TrainerEnv
from hotpeft.trainer.errors import ConfigInvalid, InsufficientImprovement, TrainerError
from hotpeft.trainer.mixture import parse_data_args

def _field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (the source is the one place they are written)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    return docs


def _add_env_flags(p: argparse.ArgumentParser) -> None:
    """The TrainerEnv fields: where the base comes from and where adapters go, as the server's flags."""
    docs = _field_docs(TrainerEnv)
    for f in dataclasses.fields(TrainerEnv):
        help_text = f"{docs[f.name].rstrip('.')} (env HOTPEFT_{f.name.upper()})".replace("%", "%%")
        if f.type == "bool":
            p.add_argument(flag(f.name), dest=f.name, action="store_true", default=None, help=help_text)
        else:
            p.add_argument(flag(f.name), dest=f.name, default=None, help=help_text)


def add_parsers(sub) -> None:
    docs = _field_docs(TrainConfig)
    t = sub.add_parser("train", help="train a LoRA, QLoRA or prompt-tuning adapter on a JSONL file and register it",
                       description="Train an adapter on JSONL data, evaluate it against the base on held-out data, "
                                   "and register it (a new version if the name exists).")
    t.add_argument("--data", required=True, action="append", metavar="FILE[:WEIGHT]",
                   help="training JSONL: chat ({\"messages\"}) or prompt/completion; repeat with weights for "
                        "multi-task training (--data a.jsonl:2 --data b.jsonl:1), or one YAML/JSON mixture file")
    t.add_argument("--validation", type=Path, help="held-out JSONL (default: --validation-fraction of --data)")
    t.add_argument("--sweep", metavar="METHODS",
                   help="compare methods instead of registering one: full,lora,qlora,prompt_tuning (with --rank "
                        "4,8,16,32); prints one table, registers nothing")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        help_text = docs.get(f.name, "").replace("%", "%%")
        if f.name == "min_improvement":
            t.add_argument(flag(f.name), dest=f.name, action="append", default=None, metavar="METRIC=DELTA",
                           help=help_text + " (repeatable; metrics: loss, rouge1, rouge2, rougeL, bleu, chrf, "
                                                   "exact_match)")
        elif hints[f.name] is bool:
            t.add_argument(flag(f.name), dest=f.name, action="store_true", default=None, help=help_text)
        else:
            t.add_argument(flag(f.name), dest=f.name, default=None, required=f.name == "name", help=help_text)
    _add_env_flags(t)
    t.add_argument("--json", action="store_true", help="print the metrics as JSON instead of the table")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="compare the base and registered adapters on a JSONL file",
                       description="Held-out loss, ROUGE-1/2/L, BLEU, chrF and exact match of the base and each --adapter, "
                                   "side by side, and what each keeps of the retention set. Every example of --data "
                                   "is evaluated. With --benchmark: an lm-eval task against a running server.")
    e.add_argument("--adapter", action="append", help="adapter name or name@N (repeatable)")
    e.add_argument("--data", type=Path, help="JSONL to evaluate on (or --benchmark)")
    e.add_argument("--template", help=docs["template"])
    e.add_argument("--limit", type=int, default=None,
                   help="examples generated from for ROUGE / exact match (default 200); with --benchmark: documents "
                        "per task (default: all)")
    e.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per example")
    e.add_argument("--max-length", type=int, default=1024, help="tokens per example for the loss")
    e.add_argument("--metrics", default=",".join(GENERATION_METRICS), help=docs["metrics"])
    e.add_argument("--quantize", choices=("none", "int8", "nf4"), default="none", help="precision of the base")
    e.add_argument("--retention", default="default", help=docs["retention"])
    _add_env_flags(e)
    e.add_argument("--json", action="store_true", help="print the metrics as JSON instead of the table")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_benchmark_flags(e)

    d = sub.add_parser("demo-data", help="write the demo data sets (support-chat summaries, ticket intents, tool calls)")
    d.add_argument("--out", type=Path, default=Path("demo"), help="folder to write the JSONL files to")


def _env(args: argparse.Namespace) -> TrainerEnv:
    """Flags first, then HOTPEFT_* variables, then the defaults."""
    values = {}
    for f in dataclasses.fields(TrainerEnv):
        value = getattr(args, f.name, None)
        if value is None:
            value = os.environ.get(f"HOTPEFT_{f.name.upper()}")
        if value is None:
            continue
        try:
            if f.type == "int | None" or f.type == "int":
                value = int(value)
            elif f.type == "bool":
                value = value is True or str(value).lower() in ("1", "true", "yes")
        except ValueError as e:
            raise TrainerError(f"{flag(f.name)}: {e}") from e
        values[f.name] = value
    return TrainerEnv(**values)


def _config(args: argparse.Namespace) -> TrainConfig:
    hints = typing.get_type_hints(TrainConfig)
    values: dict = {}
    for f in dataclasses.fields(TrainConfig):
        raw = getattr(args, f.name)
        if raw is None:
            continue
        if f.name == "min_improvement":
            values[f.name] = parse_min_improvement(raw)
        elif f.name in ("target_modules", "metrics"):
            values[f.name] = [m.strip() for m in raw.split(",") if m.strip()]
        elif hints[f.name] is bool:
            values[f.name] = True
        elif f.name in ("template",):
            values[f.name] = unescape(raw)
        else:
            kind = {int: int, float: float}.get(_scalar(hints[f.name]), str)
            try:
                values[f.name] = kind(raw)
            except ValueError as e:
                raise ConfigInvalid(f.name, f"{flag(f.name)} must be a number, got {raw!r}") from e
    return TrainConfig(**values)


def unescape(text: str | None) -> str | None:
    """`\\n` and `\\t` typed in a shell's single quotes become the characters they name."""
    return None if text is None else text.replace("\\n", "\n").replace("\\t", "\t")


def _scalar(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


class _Progress:
    """tqdm bars on stderr: training (steps, loss, ETA), then one per evaluated model (examples, ETA)."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.label = enabled, None, None

    def _bar(self, label: str, total: int, unit: str, elapsed: float = 0.0):
        from tqdm import tqdm

        if self.bar is None or self.label != label:
            self.close()
            # smoothing=0: the average rate since the start, which is set `elapsed` seconds back, so the
            # first update's rate is right (not the time since the bar was drawn)
            self.bar = tqdm(total=total, desc=label, unit=unit, file=sys.stderr, dynamic_ncols=True, smoothing=0)
            self.bar.start_t = self.bar.last_print_t = time.time() - elapsed
            self.label = label
        return self.bar

    def train(self, step: int, total: int, loss: float, elapsed: float) -> None:
        if self.enabled:
            bar = self._bar("training", total, "step", elapsed)
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{loss:.4f}")

    def evaluate(self, label: str, done: int, total: int) -> None:
        if self.enabled:
            bar = self._bar(f"evaluating {label}", total, "example")
            bar.update(done - bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def train_main(args: argparse.Namespace) -> int:
    from hotpeft.trainer.pipeline import run_training  # imports torch: only when training

    try:
        tasks = parse_data_args(args.data)
        if args.sweep is not None:
            return sweep_main(args, tasks)
        cfg = _config(args)
        env = _env(args)
    except TrainerError as e:
        print(f"hotpeft train: {e.message}", file=sys.stderr)
        return 2
    _quiet()
    bar = _Progress(not args.no_progress)

    tables: list[str] = []

    def say(message: str, data: dict | None = None) -> None:  # the table is printed once, at the end
        if message.startswith("Evaluation:"):
            tables.append(message.partition("\n")[2])
        elif not args.json:
            print(message, file=sys.stderr)

    try:
        try:
            outcome = run_training(cfg, tasks, args.validation, env, progress=bar.train, events=say,
                                   eval_progress=bar.evaluate)
        finally:
            bar.close()
    except TrainerError as e:
        if isinstance(e, InsufficientImprovement) and tables:  # the figures the gate refused on
            print(tables[-1], file=sys.stderr)
        print(f"hotpeft train: {e.message}", file=sys.stderr)
        return 1 if isinstance(e, InsufficientImprovement) else 2
    if args.json:
        print(json.dumps({"adapter": outcome.record.key, "metrics": outcome.metrics}, indent=1, default=str))
    else:
        print(outcome.table)
        print(f"\nregistered {outcome.record.key}: call it with \"model\": \"{outcome.record.name}\"")
    return 0


def sweep_main(args: argparse.Namespace, tasks: list) -> int:
    """`hotpeft train --sweep`: every method on the same data, one table (hotpeft/trainer/sweep.py)."""
    from hotpeft.trainer.sweep import config_values, parse_methods, parse_ranks, plan, run_sweep  # imports torch

    if args.method is not None:
        raise ConfigInvalid("method", "--sweep names the methods to compare; drop --method")
    methods, ranks = parse_methods(args.sweep), parse_ranks(args.rank)
    given = {f.name for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None} - {"rank"}
    args.rank = None
    runs = plan(config_values(_config(args), given), methods, ranks)
    env = _env(args)
    _quiet()
    table, results = run_sweep(runs, tasks, args.validation, env, say=lambda m: print(m, file=sys.stderr))
    if args.json:
        print(json.dumps({label: _no_samples(m) for label, m in results.items()}, indent=1, default=str))
    else:
        print(table)
    return 0


def _no_samples(value):
    """`value` without the generated samples stored beside each set of metrics."""
    if isinstance(value, dict):
        return {k: _no_samples(v) for k, v in value.items() if k != "samples"}
    return value


def eval_main(args: argparse.Namespace) -> int:
    from hotpeft.trainer.eval_adapters import evaluate_adapters  # imports torch: only when evaluating

    if args.benchmark:
        return benchmark_main(args)
    if args.data is None or not args.adapter:
        print("hotpeft eval: give --data FILE and at least one --adapter, or --benchmark TASK", file=sys.stderr)
        return 2
    _quiet()
    bar = _Progress(not args.no_progress)
    try:
        env = _env(args)
        metrics = check_metrics([m.strip() for m in args.metrics.split(",") if m.strip()])
        print(f"loading the base and evaluating it and {len(args.adapter)} adapter(s) on {args.data}", file=sys.stderr)
        try:
            table, metrics = evaluate_adapters(env, args.adapter, args.data, template=unescape(args.template),
                                               limit=args.limit or 200, max_new_tokens=args.max_new_tokens,
                                               max_length=args.max_length, quantize=args.quantize,
                                               progress=bar.evaluate, metrics=metrics, retention=args.retention)
        finally:
            bar.close()
    except TrainerError as e:
        print(f"hotpeft eval: {e.message}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=1, default=str) if args.json else table)
    return 0


def demo_main(args: argparse.Namespace) -> int:
    paths = write_demo(args.out)
    for p in paths.values():
        print(p)
    print(f"\nsummaries: train with --template {json.dumps(SUMMARY_TEMPLATE)}", file=sys.stderr)
    return 0


def _quiet() -> None:
    import logging
    import warnings

    logging.basicConfig(level="WARNING")
    warnings.filterwarnings("ignore")
