"""Many LoRA adapters in one forward pass: concatenated weights and a per-token column mask.

The projections of a decoder layer that read the same input form a group: q|k|v, o,
gate|up, down. For each group the bank keeps the A matrices of all resident adapters
concatenated along the rank axis, `A_cat (sum_r, in)`, and their B matrices, already
multiplied by each adapter's scale, as `Bt_cat (sum_r, out_q + out_k + out_v)`, block-diagonal
within an adapter (its q rows write only q's outputs, ...). Ranks are not padded: an adapter
takes as many columns as its ranks add up to in that group, and none where it has no target.

Each resident adapter has a slot in every group, its ranks zero-padded to the group's
largest (`A (slots, r, in)`, `Bt (slots, r, out)`). A step computes the deltas of a whole
group in one of two ways, whichever is estimated cheaper, multiply-adds and per-op cost
together (no Python loop over adapters, no per-token copy of weights):

- span:  out += ((x @ A[s0:s1].flat.T) * mask) @ Bt[s0:s1].flat      # every token x every slot
  in [s0, s1); `mask` keeps each token's own slot (none for base and soft-prompt tokens) and
  is dropped when all tokens use one adapter. 3 ops; best for one adapter, for long prefill
  chunks, and on a CPU for batches of a few dozen rows.
- bmm:   tokens are gathered per slot into (s1 - s0, T, in), padded to the busiest slot's
  count T, then two `bmm`s and a gather back (Punica's segmented gather-matmul): each token
  meets only its own adapter. 6 ops; best for large batches spread over many adapters.
On a CPU a small matmul costs about the same whatever its size, so few, wide ops are what
keep this cheap.

Groups whose resident adapters are the same (usually every q|k|v, every down, ...) share
one `Layout`, so a mask is built once per layout and step. The base layers (plain, int8 or
nf4) are never modified.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from hotpeft.adapters.format import LoraModule

# projection name -> group; members of a group read the same input
GROUP_OF = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o",
            "gate_proj": "gate_up", "up_proj": "gate_up", "down_proj": "down"}
# The bmm path costs 3 more small ops than span; on the 2-core CPU of BENCHMARKS.md a small op
# costs about what ~32M multiply-adds do, and span won at 16 rows over 8 adapters (224 vs 184
# tok/s). So bmm is taken only when it saves more multiply-adds than that.
BMM_MIN_SAVING = 32e6
MEMBER_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
        self.layout: Layout | None = None

    def add_delta(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out (N, out_features) += the LoRA deltas of this step's tokens; x (N, in)."""
        plan = None if self.layout is None else self.layout.plan
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

    def weights_for(self, modules: dict[str, LoraModule], dtype: torch.dtype, device: torch.device):
        """This group's (A, Bt) of one adapter, or None when it targets no member. Scale folded into Bt."""
        present = [(name, modules[name]) for name, _ in self.members if name in modules]
        if not present:
            return None
        r = sum(m.rank for _, m in present)
        A = torch.cat([m.A.to(device=device, dtype=torch.float32) for _, m in present])
        Bt = torch.zeros(r, self.out_features, dtype=torch.float32, device=device)
        row = 0
        for name, m in present:
            o0, o1 = self.offsets[name]
            Bt[row:row + m.rank, o0:o1] = (m.B.to(device=device, dtype=torch.float32) * m.scale).T
            row += m.rank
        return A.to(dtype), Bt.to(dtype)

    def put(self, aid: int, A: torch.Tensor, Bt: torch.Tensor) -> None:
        """Write one adapter into the lowest free slot (growing slots or padded rank when needed)."""
        r = A.shape[0]
        used = set(self.slot_of.values())
        slot = next(i for i in range(len(used) + 1) if i not in used)
        n_slots, r_max = max(self.A.shape[0], slot + 1), max(self.A.shape[1], r)
        if (n_slots, r_max) != tuple(self.A.shape[:2]):
            n_slots = max(n_slots, 2 * self.A.shape[0])  # grow by doubling: amortised copies
            old_n, old_r = self.A.shape[:2]
            # Uninitialised, not zeroed: a slot is zeroed when it is written (`put`) and when it is
            # freed (`drop`), and slots above the highest used one are never read. Only the rank
            # padding added to the slots in use must be zero.
            A_new = self.A.new_empty(n_slots, r_max, self.in_features)
            B_new = self.Bt.new_empty(n_slots, r_max, self.out_features)
            A_new[:old_n, :old_r] = self.A
            B_new[:old_n, :old_r] = self.Bt
            A_new[:old_n, old_r:] = 0
            B_new[:old_n, old_r:] = 0
            self.A, self.Bt = A_new, B_new
        self.A[slot].zero_()
        self.Bt[slot].zero_()
        self.A[slot, :r] = A  # zero-padded ranks add exact zeros
        self.Bt[slot, :r] = Bt
        self.slot_of[aid] = slot

    def drop(self, aid: int) -> None:
        slot = self.slot_of.pop(aid)
        self.A[slot].zero_()
        self.Bt[slot].zero_()


class LoraBank:
    """The resident LoRA adapters of one model, keyed by adapter version key.

    Owned by the engine thread: load, unload and `plan` are called between forward passes.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device):
        self.dtype = dtype
        self.device = device
        self.shapes: dict[str, tuple[int, int]] = {}  # targetable module name -> (out, in)
        members: dict[tuple[str, str], list[tuple[str, int, int]]] = {}
        for name, module in model.named_modules():
            parent, _, child = name.rpartition(".")
            if child in GROUP_OF and hasattr(module, "in_features"):
                self.shapes[name] = (module.out_features, module.in_features)
                members.setdefault((parent, GROUP_OF[child]), []).append((name, module.out_features, module.in_features))
        self.groups: dict[tuple[str, str], LoraGroup] = {}
        self.group_of: dict[str, LoraGroup] = {}
        for key, ms in members.items():
            ms.sort(key=lambda m: MEMBER_ORDER.index(m[0].rpartition(".")[2]))
            group = LoraGroup([(n, o) for n, o, _ in ms], ms[0][2], dtype, device)
            self.groups[key] = group
            for n, _, _ in ms:
                self.group_of[n] = group
        # typical in + out of a group: multiply-adds per token, slot and rank column
        self.width = sum(g.in_features + g.out_features for g in self.groups.values()) / max(1, len(self.groups))
        self.adapters: dict[str, tuple[int, set[tuple[str, str]]]] = {}  # key -> (id, the groups it has weights in)
        self._next_id = 1  # ids are never reused; 0 means "no LoRA"
        self._bytes: dict[str, int] = {}
        self._used: dict[str, None] = {}  # insertion order = least recently used first
        self.pinned: set[str] = set()  # never evicted
        self.layouts: list[Layout] = []

    def group(self, parent: str, name: str) -> LoraGroup | None:
        return self.groups.get((parent, name))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self.shapes)

    def is_resident(self, key: str) -> bool:
        return key in self.adapters

    def adapter_bytes(self, key: str) -> int:
        """What one resident adapter holds in the stacks (its group ranks, unpadded)."""
        return self._bytes[key]

    def bytes_needed(self, modules: dict[str, LoraModule]) -> int:
        size = torch.empty((), dtype=self.dtype).element_size()
        total = 0
        for group in self.groups.values():
            r = sum(modules[n].rank for n, _ in group.members if n in modules)
            total += r * (group.in_features + group.out_features) * size
        return total

    def lru(self) -> list[str]:
        """Resident adapter keys, least recently used first."""
        return list(self._used)

    def touch(self, key: str) -> None:
        self._used.pop(key, None)
        self._used[key] = None

    def adapter_id(self, key: str | None) -> int:
        return 0 if key is None else self.adapters[key][0]

    def load(self, key: str, modules: dict[str, LoraModule]) -> bool:
        """Make an adapter resident. Idempotent: False when it already was.

        Costs one copy of this adapter's weights: its columns are appended to each group.
        """
        if key in self.adapters:
            return False
        missing = sorted(set(modules) - set(self.group_of))
        if missing:  # validated on registration; checked again before any write
            raise ValueError(f"no targetable layer {missing[0]!r} in the base model")
        # Convert everything first, then write: a failure leaves the bank as it was.
        parts = {}
        for gkey, group in self.groups.items():
            w = group.weights_for(modules, self.dtype, self.device)
            if w is not None:
                parts[gkey] = w
        aid = self._next_id
        self._next_id += 1
        for gkey, (A, Bt) in parts.items():
            self.groups[gkey].put(aid, A, Bt)
        self.adapters[key] = (aid, set(parts))
        self._bytes[key] = self.bytes_needed(modules)
        self.touch(key)
        self._relayout()
        return True

    def unload(self, key: str) -> bool:
        """Drop an adapter's weights. Idempotent: False when it was not resident."""
        entry = self.adapters.get(key)
        if entry is None:
            return False
        aid, gkeys = entry
        for gkey in gkeys:
            self.groups[gkey].drop(aid)
        del self.adapters[key]
        del self._bytes[key]
        self._used.pop(key, None)
        self._relayout()
        return True

    def _relayout(self) -> None:
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

    def plan(self, token_ids: list[int]) -> None:
        """Before a forward pass: the adapter id of every packed token (0 for none).

        Chooses per layout between span and bmm by their multiply-adds; built from Python lists,
        so planning never waits on the device.
        """
        n = len(token_ids)
        for layout in self.layouts:
            slots = [layout.slot_of.get(a, -1) for a in token_ids]
            used = sorted(set(slots) - {-1})
            if not used:
                layout.plan = None
                continue
            s0, s1 = used[0], used[-1] + 1
            if len(used) == 1 and -1 not in slots:  # every token uses this one adapter
                layout.plan = StepPlan(s0, s1)
                continue
            counts = {s: 0 for s in range(s0, s1)}
            for s in slots:
                if s >= 0:
                    counts[s] += 1
            per_slot = max(counts.values())
            saving = (n - per_slot) * (s1 - s0) * layout.rank * self.width  # span: N x slots; bmm: T x slots
            if saving > BMM_MIN_SAVING:
                zero_row = (s1 - s0) * per_slot
                gather, back, fill = [0] * zero_row, [zero_row] * n, dict.fromkeys(counts, 0)
                for t, s in enumerate(slots):
                    if s >= 0:
                        row = (s - s0) * per_slot + fill[s]
                        fill[s] += 1
                        gather[row] = t
                        back[t] = row
                dev = self.device
                layout.plan = StepPlan(s0, s1, gather=torch.tensor(gather, device=dev),
                                       back=torch.tensor(back, device=dev), per_slot=per_slot)
            else:
                r = layout.rank
                owner = torch.arange(s0, s1, device=self.device).repeat_interleave(r)  # (cols,)
                tok = torch.tensor(slots, device=self.device)
                layout.plan = StepPlan(s0, s1, mask=(tok.unsqueeze(1) == owner.unsqueeze(0)).to(self.dtype))

    def clear_plan(self) -> None:
        for layout in self.layouts:
            layout.plan = None

    def adapters_bytes(self) -> int:
        """Bytes the resident adapters themselves take: what the residency budget counts."""
        return sum(self._bytes.values())
