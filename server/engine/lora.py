"""Many LoRA adapters in one forward pass: stacked weights, gathered batched matmuls.

Every targetable linear layer of the base is wrapped once at start-up by `MultiLoraLinear`.
Each wrapper holds, for every resident adapter ("slot"), its A and B padded to the largest
resident rank, stacked along a slot axis. A forward pass reads the slot of each row from the
shared `LoraBank` and computes all rows' deltas with two `bmm`s over gathered weights (the
Punica / S-LoRA idea, in plain PyTorch). Slot 0 is all zeros and stands for "no LoRA", so
base rows and rows of soft-prompt adapters pass through untouched. The base layer itself
(plain, int8 or nf4) is never modified.
"""
from __future__ import annotations

import threading

import torch
from torch import nn

from hotpeft.adapters.format import LoraModule

NO_LORA = 0  # slot index of "no adapter": zero weights, zero scale
TARGET_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Module, bank: "LoraBank", name: str):
        super().__init__()
        self.base = base
        self.bank = bank
        self.name = name
        self.in_features = base.in_features
        self.out_features = base.out_features
        dtype, device = bank.dtype, bank.device
        # (S, r_max, in), (S, out, r_max), (S,): slot 0 is the zero adapter.
        self.register_buffer("lora_A", torch.zeros(1, 1, self.in_features, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lora_B", torch.zeros(1, self.out_features, 1, dtype=dtype, device=device), persistent=False)
        self.register_buffer("scale", torch.zeros(1, dtype=dtype, device=device), persistent=False)
        self.active_slots: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        slots = self.bank.row_slots  # (B,) long, or None when no row of the batch uses a LoRA
        if slots is None or not self.active_slots:
            return y
        xa = x.to(self.lora_A.dtype)
        if x.dim() == 2:  # (T, in): a single row without a batch axis
            xa = xa.unsqueeze(0)
        A = self.lora_A[slots]  # (B, r, in)
        B = self.lora_B[slots]  # (B, out, r)
        delta = torch.bmm(torch.bmm(xa, A.transpose(1, 2)), B.transpose(1, 2))  # (B, T, out)
        delta = delta * self.scale[slots].view(-1, 1, 1)
        return y + delta.view_as(y).to(y.dtype)

    def set_slot(self, slot: int, module: LoraModule | None) -> None:
        """Write (or clear, with None) one slot. Grows the stacks when needed."""
        r = 0 if module is None else module.rank
        slots_needed = max(slot + 1, self.lora_A.shape[0])
        r_max = max(r, self.lora_A.shape[1])
        if slots_needed != self.lora_A.shape[0] or r_max != self.lora_A.shape[1]:
            A = self.lora_A.new_zeros(slots_needed, r_max, self.in_features)
            B = self.lora_B.new_zeros(slots_needed, self.out_features, r_max)
            scale = self.scale.new_zeros(slots_needed)
            n, old_r = self.lora_A.shape[:2]
            A[:n, :old_r] = self.lora_A
            B[:n, :, :old_r] = self.lora_B
            scale[:n] = self.scale
            self.lora_A, self.lora_B, self.scale = A, B, scale
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.scale[slot] = 0
        if module is None:
            self.active_slots.discard(slot)
            return
        # Zero-padded ranks add exact zeros, so a padded adapter computes the same delta.
        self.lora_A[slot, :r] = module.A.to(self.lora_A)
        self.lora_B[slot, :, :r] = module.B.to(self.lora_B)
        self.scale[slot] = module.scale
        self.active_slots.add(slot)

    def slot_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.lora_A, self.lora_B, self.scale))


class LoraBank:
    """The resident LoRA adapters of one model, keyed by adapter version key, and the per-step row map."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device):
        self.dtype = dtype
        self.device = device
        self.row_slots: torch.Tensor | None = None
        self.slot_of: dict[str, int] = {}
        self._lock = threading.Lock()
        self.layers: dict[str, MultiLoraLinear] = {}
        for name, module in list(model.named_modules()):
            if name.rsplit(".", 1)[-1] in TARGET_SUFFIXES and hasattr(module, "in_features"):
                parent_name, _, child = name.rpartition(".")
                wrapper = MultiLoraLinear(module, self, name)
                setattr(model.get_submodule(parent_name), child, wrapper)
                self.layers[name] = wrapper

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        return {n: (m.out_features, m.in_features) for n, m in self.layers.items()}

    def load(self, key: str, modules: dict[str, LoraModule]) -> bool:
        """Make an adapter resident. Idempotent: False when it already was."""
        with self._lock:
            if key in self.slot_of:
                return False
            missing = sorted(set(modules) - set(self.layers))
            if missing:  # validated on registration; checked again before any write
                raise ValueError(f"no wrapped layer {missing[0]!r} in the base model")
            used = set(self.slot_of.values())
            slot = next(i for i in range(1, len(used) + 2) if i not in used)
            for name, layer in self.layers.items():
                layer.set_slot(slot, modules.get(name))
            self.slot_of[key] = slot
            return True

    def unload(self, key: str) -> bool:
        """Free an adapter's slot. Idempotent: False when it was not resident."""
        with self._lock:
            slot = self.slot_of.pop(key, None)
            if slot is None:
                return False
            for layer in self.layers.values():
                layer.set_slot(slot, None)
            return True

    def set_rows(self, keys: list[str | None]) -> None:
        """Before a forward pass: the adapter of each row (None = no LoRA for that row)."""
        if all(k is None for k in keys):
            self.row_slots = None
            return
        self.row_slots = torch.tensor(
            [NO_LORA if k is None else self.slot_of[k] for k in keys], dtype=torch.long, device=self.device
        )

    def resident_bytes(self) -> int:
        return sum(layer.slot_bytes() for layer in self.layers.values())
