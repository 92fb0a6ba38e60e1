"""Many LoRA adapters in one forward pass: concatenated weights and a per-token column mask.

Every targetable linear layer of the base is wrapped once at start-up by `MultiLoraLinear`.
A wrapper keeps the A matrices of all resident adapters that target it concatenated along
the rank axis, `A_cat (sum_r, in)`, and their B matrices, already multiplied by each
adapter's scale, as `Bt_cat (sum_r, out)`. Ranks are not padded: an adapter of rank 8 takes 8
columns, one of rank 16 takes 16, and an adapter that does not target a layer takes none.

For a step over N packed tokens the delta of every token is

    delta = ((x @ A_cat[lo:hi].T) * mask) @ Bt_cat[lo:hi]            # (N, out)

where `mask (N, hi-lo)` is 1 where a column belongs to the token's own adapter and 0
elsewhere (base tokens and soft-prompt tokens: all zeros). That is two dense matmuls and a
multiply per layer whatever the mix of adapters: the segmented-matmul idea of Punica /
S-LoRA in plain PyTorch, without a Python loop over adapters and without gathering a copy
of the weights for every token. `[lo, hi)` is the span of columns that the step's adapters
occupy; when every token uses the same adapter the mask is dropped altogether.

Layers whose resident adapters are the same (usually every q_proj, every down_proj, ...)
share one `Layout`, so a mask is built once per layout and step, not once per layer. The
base layer itself (plain, int8 or nf4) is never modified.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from hotpeft.adapters.format import LoraModule

TARGET_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class StepPlan:
    """What one layout does in the current step."""

    lo: int
    hi: int
    mask: torch.Tensor | None  # (N, hi - lo), or None when every token uses the adapter in [lo, hi)


@dataclass(eq=False)
class Layout:
    """Column ranges of the adapters concatenated in a layer: ((adapter id, rank), ...)."""

    entries: tuple[tuple[int, int], ...]
    cols: dict[int, tuple[int, int]] = field(default_factory=dict)  # adapter id -> [c0, c1)
    owner: torch.Tensor | None = None  # (sum_r,) adapter id of each column
    plan: StepPlan | None = None

    def __post_init__(self):
        c = 0
        owners = []
        for aid, r in self.entries:
            self.cols[aid] = (c, c + r)
            owners += [aid] * r
            c += r
        self.owner = torch.tensor(owners, dtype=torch.long)


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Module, name: str, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base = base
        self.name = name
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.register_buffer("A_cat", torch.zeros(0, self.in_features, dtype=dtype, device=device), persistent=False)
        self.register_buffer("Bt_cat", torch.zeros(0, self.out_features, dtype=dtype, device=device), persistent=False)
        self.layout: Layout | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        plan = None if self.layout is None else self.layout.plan
        if plan is None:
            return y
        x2 = x.reshape(-1, self.in_features).to(self.A_cat.dtype)  # (N, in)
        xa = x2 @ self.A_cat[plan.lo:plan.hi].T  # (N, r_span)
        if plan.mask is not None:
            xa = xa * plan.mask
        delta = xa @ self.Bt_cat[plan.lo:plan.hi]  # (N, out)
        return y + delta.view_as(y).to(y.dtype)

    def set_weights(self, parts: list[tuple[int, LoraModule]]) -> tuple[tuple[int, int], ...]:
        """Rebuild the concatenation from (adapter id, module) pairs; returns the layout entries."""
        dtype, device = self.A_cat.dtype, self.A_cat.device
        if parts:
            self.A_cat = torch.cat([m.A.to(device=device, dtype=torch.float32) for _, m in parts]).to(dtype)
            # The scale is folded into B once, so the forward pass never multiplies by it.
            self.Bt_cat = torch.cat(
                [(m.B.to(device=device, dtype=torch.float32) * m.scale).T for _, m in parts]
            ).to(dtype).contiguous()
        else:
            self.A_cat = self.A_cat.new_zeros(0, self.in_features)
            self.Bt_cat = self.Bt_cat.new_zeros(0, self.out_features)
        return tuple((aid, m.rank) for aid, m in parts)

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.A_cat, self.Bt_cat))


class LoraBank:
    """The resident LoRA adapters of one model, keyed by adapter version key.

    Owned by the engine thread: load, unload and `plan` are called between forward passes.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device):
        self.dtype = dtype
        self.device = device
        self.layers: dict[str, MultiLoraLinear] = {}
        self.adapters: dict[str, tuple[int, dict[str, LoraModule]]] = {}  # key -> (adapter id, modules)
        self._next_id = 1  # ids are never reused; 0 means "no LoRA"
        self.layouts: list[Layout] = []
        for name, module in list(model.named_modules()):
            if name.rsplit(".", 1)[-1] in TARGET_SUFFIXES and hasattr(module, "in_features"):
                parent_name, _, child = name.rpartition(".")
                wrapper = MultiLoraLinear(module, name, dtype, device)
                setattr(model.get_submodule(parent_name), child, wrapper)
                self.layers[name] = wrapper

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        return {n: (m.out_features, m.in_features) for n, m in self.layers.items()}

    def is_resident(self, key: str) -> bool:
        return key in self.adapters

    def adapter_id(self, key: str | None) -> int:
        return 0 if key is None else self.adapters[key][0]

    def load(self, key: str, modules: dict[str, LoraModule]) -> bool:
        """Make an adapter resident. Idempotent: False when it already was."""
        if key in self.adapters:
            return False
        missing = sorted(set(modules) - set(self.layers))
        if missing:  # validated on registration; checked again before any write
            raise ValueError(f"no wrapped layer {missing[0]!r} in the base model")
        self.adapters[key] = (self._next_id, modules)
        self._next_id += 1
        self._rebuild(set(modules))
        return True

    def unload(self, key: str) -> bool:
        """Drop an adapter's weights. Idempotent: False when it was not resident."""
        entry = self.adapters.pop(key, None)
        if entry is None:
            return False
        self._rebuild(set(entry[1]))
        return True

    def _rebuild(self, touched: set[str]) -> None:
        for name in touched:
            parts = [(aid, mods[name]) for aid, mods in self.adapters.values() if name in mods]
            self.layers[name].set_weights(parts)
        layouts: dict[tuple, Layout] = {}
        for name, layer in self.layers.items():
            entries = tuple((aid, mods[name].rank) for aid, mods in self.adapters.values() if name in mods)
            if not entries:
                layer.layout = None
                continue
            layout = layouts.get(entries)
            if layout is None:
                layout = layouts[entries] = Layout(entries)
                layout.owner = layout.owner.to(self.device)
            layer.layout = layout
        self.layouts = list(layouts.values())

    def plan(self, token_ids: torch.Tensor, used: set[int]) -> None:
        """Before a forward pass: the adapter id of every packed token (N,), 0 for none, and the set of
        ids that occur in it (from the scheduler's own bookkeeping, so planning never waits on the device).
        """
        lora_ids = used - {0}
        for layout in self.layouts:
            mine = [layout.cols[a] for a in lora_ids if a in layout.cols]
            if not mine:
                layout.plan = None
                continue
            lo, hi = min(c0 for c0, _ in mine), max(c1 for _, c1 in mine)
            if used == lora_ids and len(lora_ids) == 1:  # every token uses this one adapter
                layout.plan = StepPlan(lo, hi, None)
            else:
                mask = (token_ids.unsqueeze(1) == layout.owner[lo:hi].unsqueeze(0)).to(self.dtype)  # (N, hi-lo)
                layout.plan = StepPlan(lo, hi, mask)

    def clear_plan(self) -> None:
        for layout in self.layouts:
            layout.plan = None

    def resident_bytes(self) -> int:
        return sum(layer.resident_bytes() for layer in self.layers.values())
