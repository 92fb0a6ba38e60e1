"""`hotpeft train --sweep`: the PEFT methods side by side on the same data, nothing registered.

    hotpeft train --sweep full,lora,qlora,prompt_tuning --rank 4,8,16,32 --data ... --name cmp

Every run trains and evaluates exactly as `hotpeft train` does (same data, split, seed, evaluation,
retention set), in a child process of its own, so each one's peak memory is its own. The table has
one column per run: trainable parameters (count and share of the model), peak memory, training
time, adapter bytes, the task metrics and retention. Full fine-tuning is trained and evaluated for
comparison but never registered: it makes a whole model, not an adapter. To keep one of the others,
train it again with `hotpeft train` and its flags.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from hotpeft.trainer.config import DEFAULT_LR, FULL, METHODS, TrainConfig, flag
from hotpeft.trainer.env import TrainerEnv
from hotpeft.trainer.errors import ConfigInvalid, TrainerError
from hotpeft.trainer.evaluate import format_table
from hotpeft.trainer.mixture import Task
from hotpeft.trainer.pipeline import run_training

SWEEP_METHODS = (FULL,) + METHODS
QLORA_RANK = 16  # QLoRA runs at this rank when the --rank list has it, else at the list's first


def parse_methods(raw: str) -> list[str]:
    methods = [m.strip() for m in raw.split(",") if m.strip()]
    bad = [m for m in methods if m not in SWEEP_METHODS]
    if not methods or bad:
        raise ConfigInvalid("sweep", f"--sweep: unknown method(s) {', '.join(map(repr, bad)) or '(none given)'}; "
                                     f"choose from {', '.join(SWEEP_METHODS)}")
    return list(dict.fromkeys(methods))


def parse_ranks(raw: str | None) -> list[int]:
    if raw is None:
        return [16]
    try:
        ranks = [int(r) for r in str(raw).split(",") if r.strip()]
    except ValueError as e:
        raise ConfigInvalid("rank", f"--rank takes whole numbers separated by commas (4,8,16,32), got {raw!r}") from e
    if not ranks or any(not 1 <= r <= 256 for r in ranks):
        raise ConfigInvalid("rank", f"--rank values must be between 1 and 256, got {raw!r}")
    return list(dict.fromkeys(ranks))


def plan(cfg: dict, methods: list[str], ranks: list[int]) -> list[tuple[str, TrainConfig]]:
    """(column label, config) per run; `cfg` holds the flags given, the method's defaults fill the rest."""
    runs = []
    for method in methods:
        if method == "lora":
            chosen = [(f"lora r={r}", r) for r in ranks]
        elif method == "qlora":
            rank = QLORA_RANK if QLORA_RANK in ranks else ranks[0]
            chosen = [(f"qlora r={rank}", rank)]
        else:
            chosen = [("full fine-tuning" if method == FULL else "prompt tuning", None)]
        for label, rank in chosen:
            values = {**cfg, "method": method}
            if rank is not None:
                values["rank"] = rank
            if method == "prompt_tuning" or method == FULL:
                values.pop("rank", None)
            if "learning_rate" not in cfg:
                values["learning_rate"] = DEFAULT_LR[method]
            runs.append((label, TrainConfig(**values)))
    return runs


def _run_one(cfg: TrainConfig, tasks: list[Task], valid: Path | None, env: TrainerEnv, base_cache: dict):
    warnings.filterwarnings("ignore", category=FutureWarning)  # a child of `hotpeft train`: as quiet as it is
    try:
        outcome = run_training(cfg, tasks, valid, env, register=False, base_cache=base_cache)
    except TrainerError as e:  # its subclasses do not unpickle: hand the message over instead
        return None, e.message, base_cache
    return outcome.metrics, outcome.table, base_cache


def run_sweep(runs: list[tuple[str, TrainConfig]], tasks: list[Task], valid: Path | None, env: TrainerEnv, *,
              say: Callable[[str], None] = lambda m: None) -> tuple[str, dict]:
    """(the table, {label: metrics}); each run in a fresh child process, one after another."""
    results: dict[str, dict] = {}
    base_cache: dict = {}  # base assessments by precision: the base is evaluated once, not per run
    context = multiprocessing.get_context("spawn")
    for n, (label, cfg) in enumerate(runs, start=1):
        say(f"[{n}/{len(runs)}] {label}: training and evaluating")
        try:
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                metrics, text, base_cache = pool.submit(_run_one, cfg, tasks, valid, env, base_cache).result()
        except BrokenProcessPool as e:  # killed (out of memory, a signal): say which run
            raise TrainerError(f"{label}: the run's process died before it finished ({e})") from e
        if metrics is None:
            raise TrainerError(f"{label}: {text}")
        results[label] = metrics
        t = metrics["training"]
        say(f"[{n}/{len(runs)}] {label}: {t['train_seconds']:.1f}s, {t['trainable_params']:,} trainable parameters")
    return sweep_table(results), results


def sweep_table(results: dict[str, dict]) -> str:
    """A column per run after the base's; QLoRA's base is the nf4 one it was measured against, a column of its own."""
    columns = {}
    for label, m in results.items():
        key = "base (nf4)" if m["training"]["base_precision"] == "nf4" else "base"
        if key not in columns:
            columns[key] = _column(m["base"], m.get("retention"), base=True)
    columns = dict(sorted(columns.items()))  # base, then base (nf4)
    for label, m in results.items():
        columns[label] = {**_column(m["adapter"], m.get("retention")), **m["training"]}
    lines = [format_table(columns)]
    lines.append("full fine-tuning is evaluated for comparison and never registered; the sweep registers nothing: "
                 f"train the one to keep with hotpeft train ({flag('method')}, {flag('rank')})")
    return "\n".join(lines)


def _column(metrics: dict, retention: dict | None, base: bool = False) -> dict:
    out = {k: v for k, v in metrics.items() if k != "samples"}
    if retention and retention.get("items"):
        out["retention"] = retention["base" if base else "adapter"]
        if not base:
            out["retention_drop"] = retention["drop"]
    return out


def config_values(cfg: TrainConfig, given: set[str]) -> dict:
    """The fields the user gave (so each method's own defaults apply to the rest)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k in given}
