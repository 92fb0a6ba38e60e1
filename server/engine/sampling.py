"""Per-row sampling over a batch of logits: greedy, temperature, top-p, seeded generators."""
from __future__ import annotations

import random

import torch


def sample(
    logits: torch.Tensor,  # (B, V)
    temperature: list[float],  # per row; 0 means greedy
    top_p: list[float],  # per row, in (0, 1]
    generators: list[random.Random],
) -> torch.Tensor:  # (B,) long, on the logits' device
    """The parameters are the requests' own (host) numbers: which rows sample is known without
    asking the device, and an all-greedy batch is one argmax."""
    greedy = logits.argmax(dim=-1)
    if not any(t > 0 for t in temperature):
        return greedy
    logits = logits.float()
    # One upload for the per-row numbers, the uniform draws included.
    # One uniform draw per row from that row's own generator: a seed fixes a row's output
    # whatever else shares the batch.
    # (Host generators: a draw is a host computation, never a read from the device.)
    draws = [g.random() if t > 0 else 0.0 for t, g in zip(temperature, generators)]
    params = torch.tensor([temperature, top_p, draws], dtype=torch.float32).to(logits.device, non_blocking=True)
    temp, p, u = params[0], params[1], params[2]
    sampled_rows = temp > 0
    probs = torch.softmax(logits / temp.clamp_min(1e-5).unsqueeze(1), dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    cum = sorted_p.cumsum(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    sorted_p = sorted_p.masked_fill(cum - sorted_p >= p.unsqueeze(1), 0.0)
    cum = sorted_p.cumsum(dim=-1)
    pick = torch.searchsorted(cum, (u * cum[:, -1]).unsqueeze(1)).clamp_max(cum.shape[1] - 1)  # (B, 1)
    drawn = order.gather(1, pick).squeeze(1)
    return torch.where(sampled_rows, drawn, greedy)


def make_generator(seed: int | None) -> random.Random:
    """A request's own generator: seeded, it repeats its draws whatever shares the batch."""
    return random.Random(seed)  # None: seeded from the OS
