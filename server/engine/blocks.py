"""The KV block pool: which block holds what, who uses it, and the prefix cache over full blocks.

Host-side bookkeeping only (the tensors are `kv.py`'s). Block 0 is the null block: never handed
out, zero, where padded reads point. Every other block is either used (reference count > 0) or
free; free blocks wait in one LRU queue, uncached ones at the front (nothing is lost by reusing
them) and cached ones behind in the order they were freed, so the pool reuses the least recently
used cached KV first and a sequence's last blocks before its first ones.

A full block is named by a chain hash: sha256(previous block's hash, its tokens), seeded with the
key of the weights that computed it (`base`, `name@N` of a LoRA or a soft prompt, `mix:<hash>`).
A sequence reuses the longest chain of cached blocks of its own key; KV is never shared between
two keys, so a new version, another adapter or a soft prompt never reads KV of other weights.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass


def chain_hashes(key: str, tokens: list[int], block_size: int, start: int = 0,
                 previous: bytes | None = None) -> list[bytes]:
    """Hashes of the full blocks `start`, `start + 1`, ... of `tokens` (virtual tokens are negative ids)."""
    h = previous if previous is not None else hashlib.sha256(b"hotpeft-kv\0" + key.encode()).digest()
    out = []
    for b in range(start, len(tokens) // block_size):
        h = hashlib.sha256(h + array("q", tokens[b * block_size:(b + 1) * block_size]).tobytes()).digest()
        out.append(h)
    return out


@dataclass
class PoolCounters:
    hit_tokens: int = 0  # prompt tokens whose KV was found cached
    query_tokens: int = 0  # prompt tokens looked up
    evictions: int = 0  # cached blocks reused for other KV


class BlockPool:
    def __init__(self, n_blocks: int, block_size: int, prefix_cache: bool = True):
        if n_blocks < 2:
            raise ValueError("a KV pool needs the null block and at least one more")
        self.n_blocks, self.block_size, self.prefix_cache = n_blocks, block_size, prefix_cache
        self.ref = [0] * n_blocks
        self.hash_of: list[bytes | None] = [None] * n_blocks
        self.cached: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, n_blocks))
        self.counters = PoolCounters()

    @property
    def usable(self) -> int:
        """Blocks a sequence can ever hold (all but the null block)."""
        return self.n_blocks - 1

    @property
    def n_free(self) -> int:
        return len(self.free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise MemoryError(f"{n} KV blocks asked, {len(self.free)} free")
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            if self.hash_of[b] is not None:  # reusing a cached block: its KV is gone
                del self.cached[self.hash_of[b]]
                self.hash_of[b] = None
                self.counters.evictions += 1
            self.ref[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        """A sequence is done with these blocks (in its order); last blocks become the first reused."""
        for b in reversed(blocks):
            self.ref[b] -= 1
            assert self.ref[b] >= 0, f"KV block {b} released twice"
            if self.ref[b] == 0:
                self.free[b] = None
                if self.hash_of[b] is None:
                    self.free.move_to_end(b, last=False)

    def match(self, hashes: list[bytes]) -> list[int]:
        """The longest run of cached blocks for these chain hashes, now used by the caller."""
        if not self.prefix_cache:
            return []
        found = []
        for h in hashes:
            b = self.cached.get(h)
            if b is None:
                break
            found.append(b)
        for b in found:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1
        return found

    def count_lookup(self, looked_up: int, hit: int) -> None:
        self.counters.query_tokens += looked_up
        self.counters.hit_tokens += hit

    def commit(self, block: int, h: bytes) -> None:
        """A used block is full with the KV that `h` names: later sequences of that chain may reuse it."""
        if self.prefix_cache and self.hash_of[block] is None and h not in self.cached:
            self.hash_of[block] = h
            self.cached[h] = block

    def check(self) -> None:
        """Every block is either free or used, never both (a test's and a debugger's check)."""
        used = {b for b in range(1, self.n_blocks) if self.ref[b] > 0}
        assert not used & set(self.free), "a used KV block is in the free queue"
        assert len(used) + len(self.free) == self.usable, "KV blocks leaked"
