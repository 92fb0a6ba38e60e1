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
q|k|v, every down, ...) share one `Layout`, so a plan is built once per layout and step. The host
decides from the rows alone (their adapters and token counts: which slots, span or bmm, the
busiest slot's count); each token's slot, mask and gather indices are computed on the device from
the step's per-token adapter ids, so planning never loops over tokens and never waits on the device.
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
    table: torch.Tensor | None = None  # (adapter ids,) long on the device: the slot of each id, -1 for none
    plan: StepPlan | None = None

    def __post_init__(self):
        self.slot_of = dict(self.entries)

    def build_table(self, n_ids: int, device: torch.device) -> None:
        table = [-1] * n_ids
        for aid, slot in self.entries:
            table[aid] = slot
        self.table = torch.tensor(table, dtype=torch.long, device=device)


def plan_layout(layout: Layout, row_ids: list[int], takes: list[int], token_ids: torch.Tensor, width: float,
                dtype: torch.dtype) -> StepPlan | None:
    """The plan of one layout for rows whose adapter ids are `row_ids` (0: none) running `takes`
    tokens each; `token_ids` (N,) is every packed token's adapter id on the device. None when no
    token uses an adapter of this layout. `width`: a group's typical in + out features."""
    counts: dict[int, int] = {}  # slot -> tokens this step
    for aid, take in zip(row_ids, takes):
        slot = layout.slot_of.get(aid, -1)
        if slot >= 0:
            counts[slot] = counts.get(slot, 0) + take
    if not counts:
        return None
    n = token_ids.shape[0]
    s0, s1 = min(counts), max(counts) + 1
    if len(counts) == 1 and counts[s0] == n:  # every token uses this one adapter
        return StepPlan(s0, s1)
    slots = layout.table[token_ids]  # (N,) on the device, -1 for tokens without an adapter here
    per_slot = max(counts.values())
    saving = (n - per_slot) * (s1 - s0) * layout.rank * width  # span: N x slots; bmm: T x slots
    if saving > BMM_MIN_SAVING:
        n_slots, device = s1 - s0, slots.device
        zero_row = n_slots * per_slot
        key = torch.where(slots >= 0, slots - s0, n_slots)  # tokens without an adapter here sort last
        order = torch.argsort(key, stable=True)
        sorted_key = key[order]
        # tokens per slot by scatter_add, not bincount: bincount reads its input's max back on CUDA
        per = torch.zeros(n_slots + 1, dtype=torch.long, device=device).scatter_add_(0, key, torch.ones_like(key))
        starts = per.cumsum(0) - per
        rank_in_slot = torch.arange(n, device=device) - starts[sorted_key]
        rows = torch.where(sorted_key < n_slots, sorted_key * per_slot + rank_in_slot, zero_row)
        back = torch.empty(n, dtype=torch.long, device=device).index_put_((order,), rows)
        gather = torch.zeros(zero_row + 1, dtype=torch.long, device=device).index_put_((rows,), order)[:zero_row]
        return StepPlan(s0, s1, gather=gather, back=back, per_slot=per_slot)
    owner = torch.arange(s0, s1, device=slots.device).repeat_interleave(layout.rank)  # (cols,)
    return StepPlan(s0, s1, mask=(slots.unsqueeze(1) == owner.unsqueeze(0)).to(dtype))
