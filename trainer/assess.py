"""Evaluation of one training run: every task's held-out set and the retention set, for the base and the
trained model, then the report (table, stored metrics) and the two registration gates.

    base   = assess(base_model, ...)                 # before training
    tuned  = assess(trained_model, ..., base=base)   # after: the default retention set is cut to the
                                                     # items the base answered right
    metrics, table = report(cfg, tasks, base, tuned, training)
    check_gates(cfg, metrics)                        # --min-improvement, --max-forgetting

A single task reports as before ("base", "adapter"); several tasks add "tasks" with each one apart,
and "base"/"adapter" are then the mean over the tasks (each task counts the same, whatever its size).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hotpeft.trainer import retention as ret
from hotpeft.trainer.config import TrainConfig
from hotpeft.trainer.data import Prepared, encode
from hotpeft.trainer.errors import ConfigInvalid, DatasetInvalid, Forgetting, InsufficientImprovement
from hotpeft.trainer.evaluate import GEN_METRICS, evaluate, format_table, generate, improvement
from hotpeft.trainer.mixture import Task

RETENTION_NEW_TOKENS = 24


@dataclass
class Assessment:
    tasks: dict[str, dict]  # task name -> evaluate()'s metrics
    retention_ok: list[bool] = field(default_factory=list)  # per retention item (False where not asked)

    def overall(self) -> dict:
        """The one task's metrics, or the mean of every numeric metric over the tasks."""
        if len(self.tasks) == 1:
            return next(iter(self.tasks.values()))
        columns = list(self.tasks.values())
        keys = [k for k in ("loss", *GEN_METRICS) if all(k in c for c in columns)]
        out = {k: sum(c[k] for c in columns) / len(columns) for k in keys}
        out["signatures"] = next((c["signatures"] for c in columns if c.get("signatures")), {})
        out["examples"] = sum(c["examples"] for c in columns)
        return out | {"mean_of_tasks": len(columns)}


def retention_set(spec: str) -> tuple[str, list[ret.Item], bool]:
    """(set name, items, filtered by the base) for --retention default, none or FILE; read before anything
    runs, so a bad file fails first."""
    if spec == "none":
        return "none", [], False
    if spec == "default":
        return "default", ret.candidate_items(), True
    path = Path(spec)
    try:
        return path.name, ret.user_items(path), False
    except DatasetInvalid as e:
        raise DatasetInvalid(f"--retention: {e.message}", param="retention") from e


def assess(model, tokenizer, prepared: dict[str, Prepared], items: list[ret.Item], *, base: Assessment | None,
           filtered: bool, common: dict, label: str, progress) -> Assessment:
    """`common`: evaluate()'s keyword arguments (device, eos_ids, pad, max_new_tokens, limit, metrics...)."""
    tasks = {}
    for name, p in prepared.items():
        title = label if len(prepared) == 1 else f"{label}: {name}"
        tasks[name] = evaluate(model, tokenizer, p.valid, **common,
                               progress=lambda done, total, t=title: progress(t, done, total))
    ok = retained(model, tokenizer, items, base_ok=None if base is None else base.retention_ok, filtered=filtered,
                  common=common, progress=lambda done, total: progress(f"{label}: retention", done, total))
    return Assessment(tasks, ok)


def retained(model, tokenizer, items: list[ret.Item], *, base_ok: list[bool] | None, filtered: bool, common: dict,
             progress=lambda done, total: None) -> list[bool]:
    """Which retention items `model` answers right (False where not asked). With the base's answers
    (`base_ok`) and a filtered set (the default one), only the items the base answered right are asked."""
    asked = [i for i in range(len(items)) if base_ok is None or not filtered or base_ok[i]]
    ok = [False] * len(items)
    if not asked:
        return ok
    done = [0]
    progress(0, len(asked))

    def on_batch(n: int) -> None:
        done[0] += n
        progress(done[0], len(asked))

    replies = answers(model, tokenizer, [items[i] for i in asked], device=common["device"],
                      eos_ids=common["eos_ids"], pad=common["pad"], max_new_tokens=RETENTION_NEW_TOKENS,
                      should_stop=common.get("should_stop", lambda: False), on_batch=on_batch)
    for i, right in zip(asked, replies):
        ok[i] = right
    return ok


def answers(model, tokenizer, items: list[ret.Item], *, device, eos_ids: list[int], pad: int,
            max_new_tokens: int = 16, should_stop=lambda: False, on_batch=lambda n: None) -> list[bool]:
    """Greedy replies of `model` to `items` (chat items through the base's chat template), checked."""
    prompts = []
    for n, item in enumerate(items):
        enc = encode(item.to_record(n), tokenizer, 1 << 20)
        prompts.append(enc.prompt_ids)
    replies = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad=pad,
                       device=device, should_stop=should_stop, on_batch=on_batch)
    return [ret.correct(reply, item) for reply, item in zip(replies, items)]


def report(cfg: TrainConfig, tasks: list[Task], retention: tuple[str, list[ret.Item], bool], base: Assessment,
           tuned: Assessment, training: dict, base_label: str) -> tuple[dict, str]:
    """(what is stored on the version, the table printed and put in the job's events)."""
    base_overall, tuned_overall = base.overall(), tuned.overall()
    metrics: dict = {"base": base_overall, "adapter": tuned_overall, "training": training}
    table = format_table({base_label: base_overall, cfg.name: {**tuned_overall, **training}})
    if len(tasks) > 1:
        metrics["tasks"] = {t.name: {"weight": t.weight, "base": without_samples(base.tasks[t.name]),
                                     "adapter": without_samples(tuned.tasks[t.name])} for t in tasks}
        table = "all tasks (mean over tasks):\n" + table
        for t in tasks:
            table += (f"\n\ntask {t.name} (weight {t.weight:g}):\n"
                      + format_table({base_label: base.tasks[t.name], cfg.name: tuned.tasks[t.name]}, signatures=False))
    name, items, filtered = retention
    if name != "none":
        summary = ret.summarize(items, base.retention_ok, tuned.retention_ok, name=name, filtered=filtered)
        metrics["retention"] = summary
        table += "\n\n" + retention_table(summary, cfg.max_forgetting)
    return metrics, table


def retention_table(s: dict, max_forgetting: float | None) -> str:
    if not s["items"]:
        return (f"retention ({s['set']} set): the base answers none of its {s['candidates']} items, so forgetting "
                "cannot be measured")
    what = (f"{s['items']} of {s['candidates']} items, those the base answers right" if s["candidates"] != s["items"]
            or s["set"] == "default" else f"{s['items']} items")
    lines = [f"retention ({s['set']} set, {what}): base {s['base']:.3f}, adapter {s['adapter']:.3f}, "
             f"drop {s['drop']:+.3f}" + (f" (--max-forgetting {max_forgetting:g})" if max_forgetting is not None else "")]
    for kind, k in s["by_kind"].items():
        lines.append(f"  {kind:<10} {k['items']:>3} items: base {k['base']:.3f}, adapter {k['adapter']:.3f}")
    return "\n".join(lines)


def check_measurable(cfg: TrainConfig, retention: tuple[str, list[ret.Item], bool], base: Assessment) -> None:
    """Before training: --max-forgetting needs retention items the base answers right."""
    name, items, _ = retention
    if cfg.max_forgetting is not None and not any(base.retention_ok):
        raise ConfigInvalid("max_forgetting", f"--max-forgetting cannot be checked: the base answers none of the "
                                              f"{len(items)} items of the {name} retention set; give --retention "
                                              "a FILE of questions this base answers")


def check_gates(cfg: TrainConfig, metrics: dict) -> None:
    """--min-improvement, then --max-forgetting: raise when the adapter may not be registered."""
    base, adapter = metrics["base"], metrics["adapter"]
    short = [f"{m} improved by {improvement(base, adapter, m):+.4f}, --min-improvement asks {d:+.4f}"
             for m, d in cfg.min_improvement.items() if improvement(base, adapter, m) < d]
    if short:
        raise InsufficientImprovement("the adapter does not beat the base enough, so it was not registered: "
                                      + "; ".join(short), param="min_improvement")
    kept = metrics.get("retention")
    if cfg.max_forgetting is not None and kept and kept["items"] and kept["drop"] > cfg.max_forgetting:
        raise Forgetting(f"the adapter forgot too much, so it was not registered: on the retention set "
                         f"({kept['set']}, {kept['items']} items) the base scores {kept['base']:.3f} and the adapter "
                         f"{kept['adapter']:.3f}, a drop of {kept['drop']:.3f} > --max-forgetting "
                         f"{cfg.max_forgetting:g}", param="max_forgetting")


def without_samples(metrics: dict) -> dict:
    """Metrics without the generated samples stored beside them."""
    return {k: v for k, v in metrics.items() if k != "samples"}
