"""Log-probabilities of the rows that ask, computed on the device and read with the step's tokens.

What a row gets are the raw log-probabilities of its adapted model: log_softmax of the logits the
forward pass produced (LoRA deltas, soft prompt or mix applied), before penalties, logit_bias,
grammar masks and temperature, in float32. A sampled token's logprob and the top `k` alternatives;
for `echo`, every prompt token's logprob given the tokens before it (`prompt_logprobs`).

Rows that do not ask cost nothing: a step where none asks copies its tokens back as before. A step
where some ask packs the tokens, the chosen logprobs and the top-k ids and values into one float64
tensor (token ids are exact in float64) and copies that: still one device -> host copy per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hotpeft.server.engine.processors import upload


@dataclass
class PromptScores:
    """The prompt positions scored this step: packed token index -> the prompt token it predicts."""

    index: torch.Tensor  # (K,) long, packed indices whose logits score the next prompt token
    targets: torch.Tensor  # (K,) long, the next prompt token
    targets_host: list[int]
    spans: list[tuple[object, int]]  # (sequence, how many of the K are its), in order
    k: int  # alternatives per scored token (the largest any of these rows asks)


def _top(lp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if k == 0:
        empty = lp.new_zeros((lp.shape[0], 0))
        return empty, empty
    values, ids = lp.topk(k, dim=-1)
    return values, ids.double()


def pack(raw: torch.Tensor, tokens: torch.Tensor, rows: list, score_logits: torch.Tensor | None,
         scores: PromptScores | None) -> torch.Tensor | None:
    """None when no row asks; else the flat float64 tensor `unpack` reads (tokens first)."""
    asking = [i for i, s in enumerate(rows) if s.request.params.logprobs is not None]
    if not asking and scores is None:
        return None
    parts = [tokens.double()]
    if asking:
        k = max(rows[i].request.params.logprobs for i in asking)
        at = upload(asking, torch.long, raw.device) if len(asking) < len(rows) else None
        lp = torch.log_softmax((raw if at is None else raw[at]).float(), dim=-1)  # (L, V)
        chosen = lp.gather(1, (tokens if at is None else tokens[at]).unsqueeze(1)).squeeze(1)
        values, ids = _top(lp, k)
        parts += [chosen.double(), values.double().flatten(), ids.flatten()]
    if scores is not None:
        lp = torch.log_softmax(score_logits.float(), dim=-1)  # (K, V)
        chosen = lp.gather(1, scores.targets.unsqueeze(1)).squeeze(1)
        values, ids = _top(lp, scores.k)
        parts += [chosen.double(), values.double().flatten(), ids.flatten()]
    return torch.cat(parts)


def _entries(flat: list[float], at: int, n: int, k: int, targets: list[int], wants: list[int]) -> tuple[list, int]:
    """n entries [token, logprob, [[id, logprob] * wants[j]]] read from `flat` at `at`."""
    chosen = flat[at:at + n]
    values = flat[at + n:at + n + n * k]
    ids = flat[at + n + n * k:at + n + 2 * n * k]
    out = [[targets[j], chosen[j], [[int(ids[j * k + t]), values[j * k + t]] for t in range(wants[j])]]
           for j in range(n)]
    return out, at + n + 2 * n * k


def unpack(flat: list[float], rows: list, scores: PromptScores | None) -> list[int]:
    """The sampled tokens; each asking row's entry goes to `s.pending_logprob`, scored prompt
    positions are appended to their row's `s.prompt_lp`."""
    n = len(rows)
    tokens = [int(t) for t in flat[:n]]
    at = n
    asking = [i for i, s in enumerate(rows) if s.request.params.logprobs is not None]
    if asking:
        k = max(rows[i].request.params.logprobs for i in asking)
        entries, at = _entries(flat, at, len(asking), k, [tokens[i] for i in asking],
                               [rows[i].request.params.logprobs for i in asking])
        for i, entry in zip(asking, entries):
            rows[i].pending_logprob = entry
    if scores is not None:
        count = sum(c for _, c in scores.spans)
        wants = [s.request.params.prompt_logprobs for s, c in scores.spans for _ in range(c)]
        entries, at = _entries(flat, at, count, scores.k, scores.targets_host, wants)
        start = 0
        for s, c in scores.spans:
            s.prompt_lp += entries[start:start + c]
            start += c
    return tokens


def score_plan(rows: list, takes: list[int]) -> tuple[list[int], list[int], list[tuple[object, int]]]:
    """Packed indices and target tokens of the prompt positions scored this step (echo rows in
    prefill that have not been scored yet): position j scores the prompt token at j + 1; the first
    real prompt token has no logprob (null, as OpenAI gives it)."""
    index, targets, spans = [], [], []
    start = 0
    for s, take in zip(rows, takes):
        if not s.decoding and s.request.params.prompt_logprobs is not None and not s.prompt_scored:
            last = s.virtual + len(s.request.prompt_ids) - 1  # the last prompt position predicts the output
            lo, hi = max(s.prefilled, s.virtual), min(s.prefilled + take, last)
            if hi > lo:
                index += range(start + lo - s.prefilled, start + hi - s.prefilled)
                targets += s.ids[lo + 1:hi + 1]
                spans.append((s, hi - lo))
        start += take
    return index, targets, spans
