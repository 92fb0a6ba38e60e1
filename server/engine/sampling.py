"""Per-row sampling over a batch of logits: greedy, temperature, top-p, seeded generators."""
from __future__ import annotations

import torch


def sample(
    logits: torch.Tensor,  # (B, V)
    temperature: torch.Tensor,  # (B,) 0 means greedy
    top_p: torch.Tensor,  # (B,) in (0, 1]
    generators: list[torch.Generator | None],
) -> torch.Tensor:  # (B,) long
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    sampled_rows = temperature > 0
    if not bool(sampled_rows.any()):
        return greedy
    t = torch.where(sampled_rows, temperature, torch.ones_like(temperature)).clamp_min(1e-5)
    probs = torch.softmax(logits / t.unsqueeze(1), dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    cum = sorted_p.cumsum(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    sorted_p = sorted_p.masked_fill(cum - sorted_p >= top_p.unsqueeze(1), 0.0)
    cum = sorted_p.cumsum(dim=-1)
    # One uniform draw per row from that row's own generator: a seed fixes a row's output
    # whatever else shares the batch.
    u = torch.stack([torch.rand((), generator=g) for g in generators]).to(cum) * cum[:, -1]  # (B,)
    pick = torch.searchsorted(cum, u.unsqueeze(1)).clamp_max(cum.shape[1] - 1)  # (B, 1)
    drawn = order.gather(1, pick).squeeze(1)
    return torch.where(sampled_rows, drawn, greedy)


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
