"""The CPU tier: parsed adapters held in memory, least recently used evicted by bytes.

Below it is the disk (the store); above it the engine's device tier. Pinned entries are never
evicted. An entry larger than the whole budget is still handed to its caller, just not kept.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from hotpeft.adapters.format import ParsedAdapter


class AdapterCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, ParsedAdapter] = OrderedDict()  # least recently used first
        self.pinned: set[str] = set()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        # Since start, for metrics: lookups served from memory or not, loads kept, entries evicted.
        self.counts = {"hits": 0, "misses": 0, "loads": 0, "evictions": 0}

    def __contains__(self, key: str) -> bool:
        """Held now; unlike `get`, looking does not count as a use."""
        with self._lock:
            return key in self._entries

    def get(self, key: str) -> ParsedAdapter | None:
        with self._lock:
            parsed = self._entries.get(key)
            if parsed is not None:
                self._entries.move_to_end(key)
            return parsed

    def get_or_load(self, key: str, load: Callable[[], ParsedAdapter]) -> ParsedAdapter:
        """The cached entry, or `load()`'s result, cached. Concurrent callers of one key load it once."""
        parsed = self.get(key)
        if parsed is not None:
            self.counts["hits"] += 1
            return parsed
        self.counts["misses"] += 1
        with self._lock:
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            parsed = self.get(key)
            if parsed is None:
                parsed = load()
                self.counts["loads"] += 1
                self.put(key, parsed)
        with self._lock:
            self._loading.pop(key, None)
        return parsed

    def put(self, key: str, parsed: ParsedAdapter) -> None:
        with self._lock:
            self._entries[key] = parsed
            self._entries.move_to_end(key)
            self._evict()

    def _evict(self) -> None:
        total = sum(p.nbytes for p in self._entries.values())
        for key in list(self._entries):
            if total <= self.max_bytes:
                break
            if key not in self.pinned:
                total -= self._entries.pop(key).nbytes
                self.counts["evictions"] += 1

    def pin(self, key: str, parsed: ParsedAdapter) -> None:
        with self._lock:
            self.pinned.add(key)
            self._entries[key] = parsed
            self._entries.move_to_end(key)

    def drop(self, key: str) -> bool:
        """Forget an entry (and its pin). Idempotent: False when it was not held."""
        with self._lock:
            self.pinned.discard(key)
            return self._entries.pop(key, None) is not None

    def unpin(self, key: str) -> None:
        with self._lock:
            self.pinned.discard(key)
            self._evict()

    def keys(self) -> set[str]:
        with self._lock:
            return set(self._entries)

    def nbytes(self) -> int:
        with self._lock:
            return sum(p.nbytes for p in self._entries.values())
