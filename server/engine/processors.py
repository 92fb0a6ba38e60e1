"""Per-row logits processors of a batched step, on the device, before sampling.

OpenAI's `presence_penalty` and `frequency_penalty` (over the tokens generated so far) and
`logit_bias`; the extensions `repetition_penalty` (over prompt and output tokens, as CTRL,
transformers and vLLM define it: a seen token's positive logit divided by it, a negative one
multiplied) and `min_tokens` (EOS and `stop_token_ids` refused until then). Applied in that order,
in float32. Only the rows that ask are read; a step where none asks runs nothing here, and one
where some do adds one upload of integers and one of numbers, whatever the number of rows.
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")


def _upload(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host


def process(logits: torch.Tensor, rows: list, eos_ids: set[int]) -> torch.Tensor:
    """`logits` (S, V) of the sampled rows `rows` (the runner's sequences, same order) -> the
    logits to sample from (the same tensor when no row asks)."""
    todo = [i for i, s in enumerate(rows) if s.request.params.processed]
    if not todo:
        return logits
    n, device = logits.shape[0], logits.device
    out_rows, out_ids, seen_rows, seen_ids, bias_rows, bias_ids, bias = [], [], [], [], [], [], []
    presence, frequency, repetition = [0.0] * n, [0.0] * n, [1.0] * n
    for i in todo:
        s = rows[i]
        p = s.request.params
        if p.presence_penalty or p.frequency_penalty:
            output = s.ids[len(s.ids) - s.generated:] if s.generated else []
            out_ids += output
            out_rows += [i] * len(output)
            presence[i], frequency[i] = p.presence_penalty, p.frequency_penalty
        if p.repetition_penalty != 1.0:
            real = s.ids[len(s.ids) - s.generated - len(s.request.prompt_ids):]  # not a soft prompt's virtual ids
            seen_ids += real
            seen_rows += [i] * len(real)
            repetition[i] = p.repetition_penalty
        for token, value in p.logit_bias:
            bias_rows.append(i)
            bias_ids.append(token)
            bias.append(value)
        if s.generated < p.min_tokens:
            for token in eos_ids | set(p.stop_token_ids):
                bias_rows.append(i)
                bias_ids.append(token)
                bias.append(NEG_INF)
    ints = _upload(out_rows + out_ids + seen_rows + seen_ids + bias_rows + bias_ids, torch.long, device)
    nums = _upload(presence + frequency + repetition + bias, torch.float32, device)
    a, b, c = len(out_rows), len(seen_rows), len(bias_rows)
    logits = logits.float().clone()
    if b:
        seen = torch.zeros_like(logits, dtype=torch.bool).index_put_(
            (ints[2 * a:2 * a + b], ints[2 * a + b:2 * a + 2 * b]), torch.ones(b, dtype=torch.bool, device=device))
        rp = nums[2 * n:3 * n].unsqueeze(1)
        logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
    if a:
        counts = torch.zeros_like(logits).index_put_((ints[:a], ints[a:2 * a]), torch.ones(a, device=device),
                                                     accumulate=True)
        logits -= nums[n:2 * n].unsqueeze(1) * counts + nums[:n].unsqueeze(1) * (counts > 0)
    if c:
        at = 2 * a + 2 * b
        logits.index_put_((ints[at:at + c], ints[at + c:at + 2 * c]), nums[3 * n:], accumulate=True)
    return logits
