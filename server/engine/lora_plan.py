"""How one step multiplies each packed token by its own adapter's slot of a LoRA stack (`lora.py`).

A step computes the deltas of a whole group in one of two ways, whichever is estimated cheaper,
multiply-adds and per-op cost together (no Python loop over adapters, no per-token copy of
weights):

- span:  out += ((x @ A[s0:s1].flat.T) * mask) @ Bt[s0:s1].flat      # every token x every slot
  in [s0, s1); `mask` keeps each token's own slot (none for base and soft-prompt tokens) and
  is dropped when all tokens use one adapter. 3 ops; best for one adapter, for long prefill
  chunks, and on a CPU for batches of a few dozen rows.
- bmm:   tokens are gathered per slot into (s1 - s0, T, in), padded to the busiest slot's
  count T, then two `bmm`s and a gather back (Punica's segmented gather-matmul): each token
  meets only its own adapter. 6 ops; best for large batches spread over many adapters.
On a CPU a small matmul costs about the same whatever its size, so few, wide ops are what
keep this cheap.

Groups whose resident adapters sit in the same slots with the same padded rank (usually every
q|k|v, every down, ...) share one `Layout`, so a plan is built once per layout and step, from
Python lists: planning never waits on the device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# The bmm path costs 3 more small ops than span; on the 2-core CPU of BENCHMARKS.md a small op
# costs about what ~32M multiply-adds do, and span won at 16 rows over 8 adapters (224 vs 184
# tok/s). So bmm is taken only when it saves more multiply-adds than that.
BMM_MIN_SAVING = 32e6


@dataclass
class StepPlan:
    """What the groups of one layout do in the current step: slots [s0, s1), span or bmm."""

    s0: int
    s1: int
    mask: torch.Tensor | None = None  # span: (N, (s1 - s0) * r), None when every token uses slot s0
    gather: torch.Tensor | None = None  # bmm: ((s1 - s0) * T,) token index per padded row
    back: torch.Tensor | None = None  # bmm: (N,) padded row of each token; the extra zero row for non-LoRA ones
    per_slot: int = 0  # bmm: T


@dataclass(eq=False)
class Layout:
    """Where the adapters of a group live: ((adapter id, slot), ...) and the padded rank r."""

    entries: tuple[tuple[int, int], ...]
    rank: int
    slot_of: dict[int, int] = field(default_factory=dict)
    plan: StepPlan | None = None

    def __post_init__(self):
        self.slot_of = dict(self.entries)


def plan_layout(layout: Layout, token_ids: list[int], width: float, dtype: torch.dtype,
                device: torch.device) -> StepPlan | None:
    """The plan of one layout for tokens whose adapter ids are `token_ids` (0: none); None when no
    token uses an adapter of this layout. `width`: a group's typical in + out features."""
    n = len(token_ids)
    slots = [layout.slot_of.get(a, -1) for a in token_ids]
    used = sorted(set(slots) - {-1})
    if not used:
        return None
    s0, s1 = used[0], used[-1] + 1
    if len(used) == 1 and -1 not in slots:  # every token uses this one adapter
        return StepPlan(s0, s1)
    counts = {s: 0 for s in range(s0, s1)}
    for s in slots:
        if s >= 0:
            counts[s] += 1
    per_slot = max(counts.values())
    saving = (n - per_slot) * (s1 - s0) * layout.rank * width  # span: N x slots; bmm: T x slots
    if saving > BMM_MIN_SAVING:
        zero_row = (s1 - s0) * per_slot
        gather, back, fill = [0] * zero_row, [zero_row] * n, dict.fromkeys(counts, 0)
        for t, s in enumerate(slots):
            if s >= 0:
                row = (s - s0) * per_slot + fill[s]
                fill[s] += 1
                gather[row] = t
                back[t] = row
        return StepPlan(s0, s1, gather=torch.tensor(gather, device=device), back=torch.tensor(back, device=device),
                        per_slot=per_slot)
    r = layout.rank
    owner = torch.arange(s0, s1, device=device).repeat_interleave(r)  # (cols,)
    tok = torch.tensor(slots, device=device)
    return StepPlan(s0, s1, mask=(tok.unsqueeze(1) == owner.unsqueeze(0)).to(dtype))
