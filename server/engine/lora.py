"""Many LoRA adapters in one forward pass: per group of projections, one stack of every resident adapter.

The projections of a decoder layer that read the same input form a group (q|k|v, o, gate|up,
down; `hotpeft.model.arch`). For each group the bank keeps two stacks with one slot per resident
adapter:

    A  (slots, r, in)                 the adapter's A matrices of the group's members, rank-concatenated
    Bt (slots, r, out_q + out_k + ...) its B matrices times the adapter's scale, transposed,
                                      block-diagonal within the slot (q's rows write only q's outputs)

`r` is the largest summed rank of any adapter in that group: smaller ones are zero-padded (their
padding adds exact zeros). An adapter takes the lowest free slot of each group it has weights
in, and none where it has none. A group's rank is exactly the largest resident one; its slots
grow ahead, doubling, while the doubled stacks still fit the residency budget (exactly
otherwise), and shrink when half of them are free: so a new adapter rarely pays for copying the
stacks (a copy of every resident adapter's weights, which stalls every running stream). The
bytes the stacks hold (`stack_bytes`, free slots included) are what the residency budget
counts; one rank-64 adapter among rank-8 ones costs what its padding costs.

How a step multiplies tokens by their own adapter's slot is `lora_plan.py`. The base layers
(plain, int8 or nf4) are never modified.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hotpeft.adapters.format import LoraModule
from hotpeft.model.arch import Architecture
from hotpeft.server.engine.lora_plan import Layout, StepPlan, plan_layout


class LoraGroup:
    """The LoRA weights of one group of projections (e.g. layer 3's q|k|v) for every resident adapter."""

    def __init__(self, members: list[tuple[str, int]], in_features: int, dtype: torch.dtype, device: torch.device):
        self.members = members  # (module name, out_features), in output order
        self.offsets = {}
        start = 0
        for name, out_f in members:
            self.offsets[name] = (start, start + out_f)
            start += out_f
        self.in_features, self.out_features = in_features, start
        self.A = torch.zeros(0, 0, in_features, dtype=dtype, device=device)  # (slots, r, in)
        self.Bt = torch.zeros(0, 0, self.out_features, dtype=dtype, device=device)  # (slots, r, out)
        self.slot_of: dict[int, int] = {}  # adapter id -> slot
        self.rank_of: dict[int, int] = {}  # adapter id -> its summed rank in this group
        self.layout: Layout | None = None

    # ---- sizes ----------------------------------------------------------------------------------
    def rank_in(self, modules: dict[str, LoraModule]) -> int:
        """An adapter's summed rank over this group's members (0: it has no weights here)."""
        return sum(modules[n].rank for n, _ in self.members if n in modules)

    def bytes_for(self, slots: int, rank: int) -> int:
        return slots * rank * (self.in_features + self.out_features) * self.A.element_size()

    def nbytes(self) -> int:
        return self.bytes_for(self.A.shape[0], self.A.shape[1])

    def free_slot(self) -> int:
        used = set(self.slot_of.values())
        return next(i for i in range(len(used) + 1) if i not in used)

    def target_slots(self, needed: int, ahead: bool) -> int:
        """Slots the stacks take to hold `needed`: as now when they do, else doubled (`ahead`) or exact."""
        cap = self.A.shape[0]
        if needed <= cap:
            return cap
        return max(needed, 2 * cap) if ahead else needed

    def bytes_with(self, rank: int, ahead: bool = False) -> int:
        """What this group's stacks would hold with one more adapter of summed rank `rank`."""
        if rank == 0:
            return self.nbytes()
        return self.bytes_for(self.target_slots(self.free_slot() + 1, ahead), max(self.A.shape[1], rank))

    # ---- the step -------------------------------------------------------------------------------
    def add_delta(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out (N, out_features) += the LoRA deltas of this step's tokens; x (N, in)."""
        plan: StepPlan | None = None if self.layout is None else self.layout.plan
        if plan is None:
            return out
        x = x.to(self.A.dtype)
        A, Bt = self.A[plan.s0:plan.s1], self.Bt[plan.s0:plan.s1]
        if plan.gather is None:  # span
            xa = x @ A.reshape(-1, self.in_features).T  # (N, slots * r)
            if plan.mask is not None:
                xa = xa * plan.mask
            B_flat = Bt.reshape(-1, self.out_features)
            if out.dtype == xa.dtype:
                return out.addmm_(xa, B_flat)  # one fused op for the second matmul and the add
            return out + (xa @ B_flat).to(out.dtype)
        xs = x.index_select(0, plan.gather).view(A.shape[0], plan.per_slot, self.in_features)  # (slots, T, in)
        ys = torch.bmm(torch.bmm(xs, A.transpose(1, 2)), Bt).view(-1, self.out_features)  # (slots * T, out)
        # Gather back rather than index_add_ (which is slow for bf16 on the CPU): one extra
        # zero row for the tokens without a LoRA here.
        delta = F.pad(ys, (0, 0, 0, 1)).index_select(0, plan.back)  # (N, out)
        if out.dtype == delta.dtype:
            return out.add_(delta)
        return out + delta.to(out.dtype)

    # ---- loading --------------------------------------------------------------------------------
    def _write(self, slot: int, present: list[tuple[str, LoraModule]]) -> None:
        """Write one adapter's members into `slot`: A rank-concatenated, Bt block-diagonal with the
        scale folded in (in float32, then cast, as a merged weight would be); the rest zero."""
        A, Bt = self.A[slot], self.Bt[slot]
        row = 0
        Bt.zero_()
        for name, m in present:
            o0, o1 = self.offsets[name]
            A[row:row + m.rank].copy_(m.A)
            block = Bt[row:row + m.rank, o0:o1]
            if Bt.dtype == torch.float32:
                block.copy_(m.B.T).mul_(m.scale)
            else:
                block.copy_((m.B.float() * m.scale).T)
            row += m.rank
        A[row:].zero_()  # zero-padded ranks add exact zeros

    def _resize(self, n_slots: int, rank: int) -> None:
        """Reallocate the stacks at exactly (n_slots, rank), keeping what fits (slots above n_slots
        are free, rank columns above `rank` are padding zeros)."""
        old_n, old_r = self.A.shape[:2]
        keep_n, keep_r = min(old_n, n_slots), min(old_r, rank)
        A_new = self.A.new_zeros(n_slots, rank, self.in_features)
        B_new = self.Bt.new_zeros(n_slots, rank, self.out_features)
        A_new[:keep_n, :keep_r] = self.A[:keep_n, :keep_r]
        B_new[:keep_n, :keep_r] = self.Bt[:keep_n, :keep_r]
        self.A, self.Bt = A_new, B_new

    def put(self, aid: int, modules: dict[str, LoraModule], ahead: bool = False) -> bool:
        """Write one adapter into the lowest free slot, growing the stacks if they must. False (and
        nothing written) when it targets no member of this group."""
        present = [(name, modules[name]) for name, _ in self.members if name in modules]
        if not present:
            return False
        r = sum(m.rank for _, m in present)
        slot = self.free_slot()
        n_slots, r_max = self.target_slots(slot + 1, ahead), max(self.A.shape[1], r)
        before = self.A, self.Bt
        try:
            if (n_slots, r_max) != tuple(self.A.shape[:2]):
                self._resize(n_slots, r_max)
            self._write(slot, present)
        except BaseException:  # the group as it was: its old stacks, or the free slot zero again
            if self.A is before[0]:
                self.A[slot].zero_()
                self.Bt[slot].zero_()
            self.A, self.Bt = before
            raise
        self.slot_of[aid] = slot
        self.rank_of[aid] = r
        return True

    def drop(self, aid: int) -> None:
        """Free an adapter's slot; shrink the stacks when it held the largest rank, or when no more
        than half their slots are below the highest one in use."""
        slot = self.slot_of.pop(aid)
        del self.rank_of[aid]
        self.A[slot].zero_()
        self.Bt[slot].zero_()
        needed = max(self.slot_of.values(), default=-1) + 1
        n_slots = needed if needed <= self.A.shape[0] // 2 else self.A.shape[0]
        rank = max(self.rank_of.values(), default=0)
        if (n_slots, rank) != tuple(self.A.shape[:2]):
            self._resize(n_slots, rank)


class LoraBank:
    """The resident LoRA adapters of one model, keyed by adapter version key.

    Owned by the engine thread: load, unload and `plan` are called between forward passes. Which
    adapters stay (LRU, pins, the budget) is decided by the engine's residency (`residency.py`).
    """

    def __init__(self, arch: Architecture, dtype: torch.dtype, device: torch.device):
        self.dtype = dtype
        self.device = device
        self.shapes = arch.projection_shapes()  # targetable module name -> (out, in)
        self.groups: dict[tuple[int, str], LoraGroup] = {}
        self.group_of: dict[str, LoraGroup] = {}  # module name -> its group
        for layer, gname, names in arch.groups():
            group = LoraGroup([(n, self.shapes[n][0]) for n in names], self.shapes[names[0]][1], dtype, device)
            self.groups[(layer, gname)] = group
            for n in names:
                self.group_of[n] = group
        # typical in + out of a group: multiply-adds per token, slot and rank column
        self.width = sum(g.in_features + g.out_features for g in self.groups.values()) / max(1, len(self.groups))
        self.adapters: dict[str, tuple[int, set[tuple[int, str]]]] = {}  # key -> (id, the groups it has weights in)
        self._next_id = 1  # ids are never reused; 0 means "no LoRA"
        self.layouts: list[Layout] = []
        self.budget: int | None = None  # the residency budget: stacks grow ahead only within it
        self.generation = 0  # bumped whenever the stacks or their layout change (captured graphs read them)

    def group(self, layer: int, name: str) -> LoraGroup | None:
        return self.groups.get((layer, name))

    def is_resident(self, key: str) -> bool:
        return key in self.adapters

    def adapter_id(self, key: str | None) -> int:
        return 0 if key is None else self.adapters[key][0]

    # ---- bytes ----------------------------------------------------------------------------------
    def stack_bytes(self) -> int:
        """Bytes the stacks hold now, rank padding and free slots below the highest included."""
        return sum(g.nbytes() for g in self.groups.values())

    def _with(self, modules: dict[str, LoraModule]) -> tuple[int, bool]:
        """(stack bytes after loading this adapter, whether the stacks grow ahead): ahead when the
        doubled stacks fit the budget, exactly otherwise."""
        ahead = sum(g.bytes_with(g.rank_in(modules), True) for g in self.groups.values())
        if self.budget is None or ahead <= self.budget:
            return ahead, True
        return sum(g.bytes_with(g.rank_in(modules)) for g in self.groups.values()), False

    def stack_bytes_with(self, modules: dict[str, LoraModule]) -> int:
        """What `stack_bytes` would be after loading this adapter."""
        return self._with(modules)[0]

    def stack_bytes_alone(self, modules: dict[str, LoraModule]) -> int:
        """The stacks' bytes with this adapter as the only one: the least the budget must allow."""
        return sum(g.bytes_for(1, r) for g in self.groups.values() if (r := g.rank_in(modules)))

    # ---- residency ------------------------------------------------------------------------------
    def load(self, key: str, modules: dict[str, LoraModule]) -> bool:
        """Make an adapter resident. Idempotent: False when it already was."""
        if key in self.adapters:
            return False
        missing = sorted(set(modules) - set(self.group_of))
        if missing:  # validated on registration; checked again before any write
            raise ValueError(f"no targetable layer {missing[0]!r} in the base model")
        aid = self._next_id
        self._next_id += 1
        _, ahead = self._with(modules)
        parts = []
        try:  # written group by group; a failure takes back what was written: the bank is as it was
            for gkey, group in self.groups.items():
                if group.put(aid, modules, ahead):
                    parts.append(gkey)
        except BaseException:
            for gkey in parts:
                self.groups[gkey].drop(aid)
            self._relayout()
            raise
        self.adapters[key] = (aid, set(parts))
        self._relayout()
        return True

    def unload(self, key: str) -> bool:
        """Drop an adapter's weights. Idempotent: False when it was not resident."""
        entry = self.adapters.pop(key, None)
        if entry is None:
            return False
        aid, gkeys = entry
        for gkey in gkeys:
            self.groups[gkey].drop(aid)
        self._relayout()
        return True

    def _relayout(self) -> None:
        self.generation += 1
        layouts: dict[tuple, Layout] = {}
        for group in self.groups.values():
            if not group.slot_of:
                group.layout = None
                continue
            sig = (tuple(sorted(group.slot_of.items())), group.A.shape[1])
            layout = layouts.get(sig)
            if layout is None:
                layout = layouts[sig] = Layout(*sig)
            group.layout = layout
        self.layouts = list(layouts.values())
        for layout in self.layouts:
            layout.build_table(self._next_id, self.device)

    # ---- the step -------------------------------------------------------------------------------
    def plan(self, row_ids: list[int], takes: list[int], token_ids: torch.Tensor) -> None:
        """Before a forward pass: each row's adapter id (0 for none) and tokens, and every packed
        token's adapter id on the device."""
        for layout in self.layouts:
            layout.plan = plan_layout(layout, row_ids, takes, token_ids, self.width, self.dtype)

    def plan_static(self, token_ids: torch.Tensor) -> None:
        """A plan whose shape depends on nothing but the number of tokens (for captured steps): every
        layout's slots as one span, each token's own slot kept by a mask built on the device."""
        for layout in self.layouts:
            n_slots = 1 + max(slot for _, slot in layout.entries)
            owner = torch.arange(n_slots, device=token_ids.device).repeat_interleave(layout.rank)
            mask = (layout.table[token_ids].unsqueeze(1) == owner.unsqueeze(0)).to(self.dtype)
            layout.plan = StepPlan(0, n_slots, mask=mask)

    def clear_plan(self) -> None:
        for layout in self.layouts:
            layout.plan = None
