"""Per-row logits processors of a batched step, on the device, before sampling.

OpenAI's `presence_penalty` and `frequency_penalty` (over the tokens generated so far) and
`logit_bias`; the extensions `repetition_penalty` (over prompt and output tokens, as CTRL,
transformers and vLLM define it: a seen token's positive logit divided by it, a negative one
multiplied) and `min_tokens` (EOS and `stop_token_ids` refused until then). Applied in this order:
repetition, presence and frequency, then logit_bias and min_tokens; in float32.

Only the rows that ask are read; a step where none asks runs nothing here. A row with penalties
keeps its token counts and its seen-token mask on the device (`PenaltyState`), built from its
prompt once and updated with the tokens it generated since the last step, so a step's host work
is per row, never per token of the history. One upload of integers and one of numbers per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass
class PenaltyState:
    counts: torch.Tensor  # (V,) float32: how often each token was generated
    seen: torch.Tensor  # (V,) bool: tokens of the prompt or the output
    counted: int  # output tokens already in `counts` and `seen`


def upload(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host numbers to the device in one copy (pinned and asynchronous on CUDA: no sync)."""
    host = torch.tensor(values, dtype=dtype)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host


def _penalized(p) -> bool:
    return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0)


def process(logits: torch.Tensor, rows: list, eos_ids: set[int]) -> torch.Tensor:
    """`logits` (S, V) of the sampled rows `rows` (the runner's sequences, same order) -> the
    logits to sample from (the same tensor when no row asks)."""
    todo = [i for i, s in enumerate(rows) if s.request.params.processes(s.generated)]
    if not todo:
        return logits
    n, vocab, device = logits.shape[0], logits.shape[1], logits.device
    new, spans, bias_rows, bias_ids, bias = [], [], [], [], []
    presence, frequency, repetition = [0.0] * n, [0.0] * n, [1.0] * n
    penalized = []
    for i in todo:
        s = rows[i]
        p = s.request.params
        if _penalized(p):
            state = getattr(s, "penalties", None)
            if state is None:  # first step of this row: its prompt (no soft prompt's virtual ids)
                state = s.penalties = PenaltyState(torch.zeros(vocab, device=device),
                                                   torch.zeros(vocab, dtype=torch.bool, device=device), 0)
                prompt = list(s.request.prompt_ids)
                spans.append((state, len(new), len(prompt), False))
                new += prompt
            output = s.ids[len(s.ids) - s.generated + state.counted:] if s.generated > state.counted else []
            if output:
                spans.append((state, len(new), len(output), True))
                new += output
                state.counted = s.generated
            penalized.append((i, state))
            presence[i], frequency[i], repetition[i] = p.presence_penalty, p.frequency_penalty, p.repetition_penalty
        for token, value in p.logit_bias:
            bias_rows.append(i)
            bias_ids.append(token)
            bias.append(value)
        if s.generated < p.min_tokens:
            for token in eos_ids | set(p.stop_token_ids):
                bias_rows.append(i)
                bias_ids.append(token)
                bias.append(NEG_INF)
    c = len(bias_rows)
    ints = upload(new + bias_rows + bias_ids + [i for i, _ in penalized], torch.long, device)
    nums = upload(presence + frequency + repetition + bias, torch.float32, device)
    for state, start, length, generated in spans:  # per row: its new tokens, a slice of the one upload
        ids = ints[start:start + length]
        state.seen[ids] = True
        if generated:
            state.counts.index_put_((ids,), torch.ones(length, device=device), accumulate=True)
    logits = logits.float().clone()
    if penalized:
        at = ints[len(new) + 2 * c:]
        counts = torch.zeros_like(logits)
        seen = torch.zeros_like(logits, dtype=torch.bool)
        counts[at] = torch.stack([st.counts for _, st in penalized])
        seen[at] = torch.stack([st.seen for _, st in penalized])
        rp = nums[2 * n:3 * n].unsqueeze(1)
        logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
        logits -= nums[n:2 * n].unsqueeze(1) * counts + nums[:n].unsqueeze(1) * (counts > 0)
    if c:
        start = len(new)
        logits.index_put_((ints[start:start + c], ints[start + c:start + 2 * c]), nums[3 * n:], accumulate=True)
    return logits
