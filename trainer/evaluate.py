"""Held-out evaluation: loss on the completion tokens, and greedy generations scored with ROUGE-1/2/L
(the rouge-score package; for summaries), corpus BLEU and chrF (sacrebleu, with the signature that
says how they were computed; for translation-like tasks) and exact match. The same code scores the
base and every adapter.

    hotpeft eval --adapter NAME [--adapter OTHER ...] --data FILE   (see hotpeft/cli/train.py)
"""
from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hotpeft.trainer.config import METRICS
from hotpeft.trainer.data import IGNORE, Encoded
from hotpeft.trainer.errors import JobCancelled

GEN_METRICS = ("rouge1", "rouge2", "rougeL", "bleu", "chrf", "exact_match")
# (examples done, examples in all) after each batch: the loss pass and the generation pass together
EvalProgress = Callable[[int, int], None]


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def _by_length(items: list, length) -> list[int]:
    """Indices of `items`, longest first: batches of similar lengths waste little on padding."""
    return sorted(range(len(items)), key=lambda i: -length(items[i]))


@torch.no_grad()
def held_out_loss(model, examples: list[Encoded], pad: int, device: torch.device, batch_size: int = 8,
                  should_stop: Callable[[], bool] = lambda: False,
                  on_batch: Callable[[int], None] = lambda n: None) -> float:
    """Mean cross-entropy per completion token (teacher-forced).

    Batches are left-padded (attention is relative under RoPE, so padding on the left changes no
    score), so every completion ends at the last position and the vocabulary projection is computed
    only for the positions that predict a completion token (`logits_to_keep`), not for the prompts."""
    total, count = 0.0, 0
    order = _by_length(examples, lambda e: len(e.input_ids))
    for i in range(0, len(order), batch_size):
        if should_stop():
            raise JobCancelled("the job was cancelled during evaluation")
        chunk = [examples[j] for j in order[i:i + batch_size]]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, e in enumerate(chunk):
            ids[j, width - len(e.input_ids):] = torch.tensor(e.input_ids)
            labels[j, width - len(e.labels):] = torch.tensor(e.labels)
            mask[j, width - len(e.input_ids):] = 1
        targets = labels[:, 1:]  # (B, W - 1): position t predicts token t + 1
        scored = (targets != IGNORE).any(0).nonzero()
        if not len(scored):
            on_batch(len(chunk))
            continue
        keep = width - 1 - int(scored[0])  # positions from the first one that predicts a completion token
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep + 1).logits
        logits = logits[:, :keep].float()  # (B, keep, V); the last position predicts nothing
        wanted = targets[:, -keep:].to(logits.device)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), wanted.reshape(-1),
                                       ignore_index=IGNORE, reduction="sum"))
        count += int((wanted != IGNORE).sum())
        on_batch(len(chunk))
    return total / max(1, count)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, eos_ids: list[int], pad: int,
             device: torch.device, batch_size: int = 64, should_stop: Callable[[], bool] = lambda: False,
             on_batch: Callable[[int], None] = lambda n: None) -> list[str]:
    """Greedy continuations, left-padded batches of similar lengths; decoded without special tokens.

    Batches are wide: on a CPU one decode step of 64 rows costs little more than one of 8
    (BENCHMARKS.md, evaluation)."""
    texts: list[str | None] = [None] * len(prompts)
    order = _by_length(prompts, len)
    for i in range(0, len(order), batch_size):
        if should_stop():
            raise JobCancelled("the job was cancelled during evaluation")
        rows = order[i:i + batch_size]
        chunk = [prompts[j] for j in rows]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, p in enumerate(chunk):
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos_ids, pad_token_id=pad)
        for j, row in zip(rows, out[:, width:]):
            texts[j] = tokenizer.decode(row.tolist(), skip_special_tokens=True).strip()
        on_batch(len(chunk))
    return texts


def score(predictions: list[str], references: list[str], metrics=GEN_METRICS) -> dict:
    """The generation `metrics` of `predictions` against `references` (one reference each); BLEU and
    chrF on sacrebleu's 0-100 scale, their signatures under "signatures"."""
    out: dict = {}
    n = max(1, len(predictions))
    rouge = [k for k in ("rouge1", "rouge2", "rougeL") if k in metrics]
    if rouge:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(rouge, use_stemmer=True)
        sums = dict.fromkeys(rouge, 0.0)
        for pred, ref in zip(predictions, references):
            s = scorer.score(ref, pred)
            for k in rouge:
                sums[k] += s[k].fmeasure
        out |= {k: v / n for k, v in sums.items()}
    signatures = {}
    for key in ("bleu", "chrf"):
        if key in metrics:
            from sacrebleu.metrics import BLEU, CHRF

            metric = BLEU() if key == "bleu" else CHRF()
            out[key] = metric.corpus_score(predictions, [references]).score
            signatures[key] = metric.get_signature().format()
    if "exact_match" in metrics:
        out["exact_match"] = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / n
    if signatures:
        out["signatures"] = signatures
    return out


def evaluate(model, tokenizer, examples: list[Encoded], *, device: torch.device, eos_ids: list[int], pad: int,
             max_new_tokens: int, limit: int, should_stop: Callable[[], bool] = lambda: False,
             progress: EvalProgress = lambda done, total: None, metrics=GEN_METRICS) -> dict:
    """{"loss", the generation `metrics`, "signatures", "examples", "generated", "samples"}."""
    model.eval()
    subset = examples[:limit]
    done, total = [0], len(examples) + len(subset)

    def on_batch(n: int) -> None:
        done[0] += n
        progress(done[0], total)

    progress(0, total)
    loss = held_out_loss(model, examples, pad, device, should_stop=should_stop, on_batch=on_batch)
    preds = generate(model, tokenizer, [e.prompt_ids for e in subset], max_new_tokens=max_new_tokens,
                     eos_ids=eos_ids, pad=pad, device=device, should_stop=should_stop, on_batch=on_batch)
    refs = [e.reference for e in subset]
    out = {"loss": loss, **score(preds, refs, metrics), "examples": len(examples), "generated": len(subset)}
    out["samples"] = [{"prediction": p, "reference": r} for p, r in list(zip(preds, refs))[:3]]
    return out


# ---- the table ------------------------------------------------------------------------------------
ROWS = [
    ("loss", "held-out loss", "{:.4f}"),
    ("rouge1", "ROUGE-1", "{:.4f}"),
    ("rouge2", "ROUGE-2", "{:.4f}"),
    ("rougeL", "ROUGE-L", "{:.4f}"),
    ("bleu", "BLEU", "{:.2f}"),
    ("chrf", "chrF", "{:.2f}"),
    ("exact_match", "exact match", "{:.4f}"),
    ("retention", "retention", "{:.3f}"),
    ("retention_drop", "retention drop", "{:+.3f}"),
    ("trainable_params", "trainable params", "{:,}"),
    ("trainable_percent", "trainable %", "{:.3f}"),
    ("train_seconds", "training time (s)", "{:.1f}"),
    ("tokens_per_s", "training tokens/s", "{:.0f}"),
    ("peak_memory_mib", "peak memory (MiB)", "{:.0f}"),
    ("adapter_bytes", "adapter size (bytes)", "{:,}"),
]


def format_table(columns: dict[str, dict], signatures: bool = True) -> str:
    """Metrics side by side: one column per model (base first), one row per metric present anywhere."""
    names = list(columns)
    rows = [(label, [fmt.format(columns[c][key]) if columns[c].get(key) is not None else "-" for c in names])
            for key, label, fmt in ROWS if any(columns[c].get(key) is not None for c in names)]
    first = max([len("metric")] + [len(label) for label, _ in rows])
    widths = [max([len(c)] + [len(cells[i]) for _, cells in rows]) for i, c in enumerate(names)]
    lines = ["  ".join(["metric".ljust(first)] + [c.rjust(w) for c, w in zip(names, widths)])]
    lines.append("  ".join(["-" * first] + ["-" * w for w in widths]))
    for label, cells in rows:
        lines.append("  ".join([label.ljust(first)] + [cell.rjust(w) for cell, w in zip(cells, widths)]))
    found = next((columns[c]["signatures"] for c in names if columns[c].get("signatures")), {}) if signatures else {}
    for key, signature in found.items():
        lines.append(f"{'BLEU' if key == 'bleu' else 'chrF'} signature: {signature}")
    return "\n".join(lines)


def improvement(base: dict, adapter: dict, metric: str) -> float:
    return (adapter[metric] - base[metric]) * METRICS[metric]
