"""The KV cache: memory allocated once, from a budget, as `n_slots` slots of `slot_len` positions.

Per layer K and V are (n_slots, n_kv_heads, slot_len, head_dim). Running sequences always
occupy slots 0..n-1 (a finished sequence's slot is filled by moving the last one down), so
decode attention reads `K[:n, :, :L]`, a view, never a gathered copy.
"""
from __future__ import annotations

import logging

import torch

from hotpeft.model.arch import Architecture

log = logging.getLogger("hotpeft.engine")

ZERO_AHEAD = 256  # KV positions zeroed at a time ahead of a sequence
CPU_DEFAULT_BUDGET = 4096 * 2**20
GPU_FREE_SHARE = 0.3  # of the free GPU memory, when no budget is given


class KVBudgetTooSmall(ValueError):
    """The KV budget holds no sequence of the context length."""


class SlotKVCache:
    def __init__(self, arch: Architecture, n_slots: int, slot_len: int, dtype: torch.dtype, device: torch.device):
        shape = (n_slots, arch.num_kv_heads, slot_len, arch.head_dim)
        # torch.empty: on the CPU the pages are committed only when written. Positions that a
        # step may read before its sequence wrote them are zeroed first (see `prepare`).
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)]
        self.n_slots, self.slot_len = n_slots, slot_len
        self.clean = [0] * n_slots  # per slot: positions [0, clean) hold finite values
        self.nbytes = sum(t.numel() * t.element_size() for t in self.k + self.v)

    def release(self, slot: int) -> None:
        self.clean[slot] = 0  # whatever the last owner left is not trusted by the next one

    def move(self, src: int, dst: int, length: int) -> None:
        for t in self.k + self.v:
            t[dst, :, :length] = t[src, :, :length]
        self.clean[dst] = length
        self.clean[src] = 0

    def prepare(self, n_rows: int, read_len: int) -> None:
        """Zero what decode attention will read of slots 0..n_rows-1 beyond what they hold.

        Masked positions get zero weight, but 0 * NaN is NaN: never-written memory must not be read.
        Zeroes ahead in blocks, so this is a handful of ops every few hundred steps, not every step.
        """
        for slot in range(n_rows):
            start = self.clean[slot]
            if start < read_len:
                end = min(self.slot_len, max(read_len, start + ZERO_AHEAD))
                for t in self.k + self.v:
                    t[slot, :, start:end].zero_()
                self.clean[slot] = end


def build_kv_cache(arch: Architecture, *, max_seqs: int, slot_len: int, budget_mib: int | None, dtype: torch.dtype,
                   device: torch.device) -> SlotKVCache:
    """Slots of `slot_len` positions, as many as the budget holds, at most `max_seqs`.

    Budget: `budget_mib`, else 30% of the free GPU memory on CUDA, else 4 GiB on the CPU."""
    per_slot = arch.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size()) * slot_len
    if budget_mib is not None:
        budget = budget_mib * 2**20
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * GPU_FREE_SHARE)
    else:
        budget = CPU_DEFAULT_BUDGET
    n_slots = min(max_seqs, budget // per_slot)
    if n_slots < 1:
        raise KVBudgetTooSmall(
            f"a KV cache budget of {budget / 2**20:.0f} MiB holds no sequence of {slot_len} tokens "
            f"({per_slot / 2**20:.1f} MiB each); raise --kv-cache-mib to {-(-per_slot // 2**20)} or lower --max-model-len"
        )
    kv = SlotKVCache(arch, n_slots, slot_len, dtype, device)
    log.info("KV cache: %d slots x %d tokens, %.0f MiB%s", n_slots, slot_len, kv.nbytes / 2**20,
             " (CPU pages are committed as they are used)" if device.type == "cpu" else "")
    return kv
