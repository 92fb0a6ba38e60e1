"""The paged KV cache: one pool of fixed-size blocks, allocated once from a budget.

Per layer K and V are (n_blocks * block_size, n_kv_heads, head_dim): position p of a sequence
lives at row `blocks[p // block_size] * block_size + p % block_size`. A sequence holds only the
blocks its tokens fill (`blocks.py` hands them out and takes them back); nothing is reserved for
`--max-model-len` and nothing is copied when sequences end. Block 0 is never handed out: reads
past a sequence's length point there, so attention never meets never-written memory (it starts
zero; the padded rows of fixed-shape decode steps, `graphs.py`, write finite K/V into its first
row, which is only ever read under a mask).
"""
from __future__ import annotations

import logging

import torch

from hotpeft.model.arch import Architecture
from hotpeft.server.engine.blocks import BlockPool

log = logging.getLogger("hotpeft.engine")

BLOCK_SIZE = 16
CPU_DEFAULT_BUDGET = 2048 * 2**20
GPU_FREE_SHARE = 0.3  # of the free GPU memory, when no budget is given


class KVBudgetTooSmall(ValueError):
    """The KV budget holds no block beyond the null block."""


class PagedKVCache:
    def __init__(self, arch: Architecture, n_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 prefix_cache: bool = True):
        shape = (n_blocks * block_size, arch.num_kv_heads, arch.head_dim)
        # torch.empty: on the CPU pages are committed only when written; only the null block is zeroed.
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)]
        for t in self.k + self.v:
            t[:block_size].zero_()
        self.block_size = block_size
        self.pool = BlockPool(n_blocks, block_size, prefix_cache)
        self.nbytes = sum(t.numel() * t.element_size() for t in self.k + self.v)
        self.block_bytes = self.nbytes // n_blocks

    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole pool holds: the longest sequence that can ever run."""
        return self.pool.usable * self.block_size

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)


def build_kv_cache(arch: Architecture, *, budget_mib: int | None, max_model_len: int, dtype: torch.dtype,
                   device: torch.device, prefix_cache: bool = True, block_size: int = BLOCK_SIZE) -> PagedKVCache:
    """As many blocks as the budget holds: `budget_mib`, else 30% of the free GPU memory on CUDA,
    else 2 GiB on the CPU. A pool smaller than one `max_model_len` sequence is said, not refused."""
    per_block = arch.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size()) * block_size
    if budget_mib is not None:
        budget = budget_mib * 2**20
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * GPU_FREE_SHARE)
    else:
        budget = CPU_DEFAULT_BUDGET
    n_blocks = budget // per_block
    if n_blocks < 2:
        raise KVBudgetTooSmall(
            f"a KV cache budget of {budget / 2**20:.2f} MiB holds no block of {block_size} tokens "
            f"({per_block / 2**20:.2f} MiB each, plus one reserved); raise --kv-cache-mib")
    kv = PagedKVCache(arch, n_blocks, block_size, dtype, device, prefix_cache)
    log.info("KV cache: %d blocks x %d tokens = %d tokens, %.0f MiB%s; prefix cache %s", kv.pool.usable, block_size,
             kv.capacity_tokens, kv.nbytes / 2**20,
             " (CPU pages are committed as they are used)" if device.type == "cpu" else "",
             "on" if prefix_cache else "off")
    if kv.capacity_tokens < max_model_len:
        log.warning("the KV cache holds %d tokens, less than one sequence of --max-model-len %d: longer requests are "
                    "refused (400); raise --kv-cache-mib to %d for one full-length sequence", kv.capacity_tokens,
                    max_model_len, -(-(max_model_len + block_size) * per_block // block_size // 2**20))
    return kv
