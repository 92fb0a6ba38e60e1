"""The device tier: which LoRA versions the engine's stacks hold, within a byte budget.

LRU by the bytes the stacks really hold (`LoraBank.stack_bytes`: every slot padded to its group's
largest rank), pinned versions never evicted, versions that running requests use never evicted.
A version released while requests still use it leaves when the last of them ends.

Worker thread only: every method is called between two steps. Other threads read the published
`view`, `resident_bytes` and `counters`, each replaced whole on every change, never mutated.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace

from hotpeft.adapters.catalog import AdapterVersion
from hotpeft.adapters.errors import AdapterConflict
from hotpeft.server.engine.interface import AdapterCounters, Residency
from hotpeft.server.engine.lora import LoraBank

log = logging.getLogger("hotpeft.engine")


class NoRoom(ValueError):
    """This adapter cannot fit the budget whatever is evicted."""


class DeviceTier:
    def __init__(self, bank: LoraBank, budget: int):
        self.bank = bank
        self.budget = budget
        bank.budget = budget  # the stacks grow ahead only within it
        self.pinned: set[str] = set()
        self.unload_when_idle: set[str] = set()  # released while running requests used them
        self._used: dict[str, None] = {}  # insertion order = least recently used first
        # published for other threads
        self.view = Residency()
        self.resident_bytes = 0
        self.counters = AdapterCounters()

    def _count(self, **deltas: int) -> None:
        self.counters = replace(self.counters, **{k: getattr(self.counters, k) + v for k, v in deltas.items()})

    def _publish(self) -> None:
        self.view = Residency(device=frozenset(self.bank.adapters), pinned=frozenset(self.pinned))
        self.resident_bytes = self.bank.stack_bytes()

    def _touch(self, key: str) -> None:
        self._used.pop(key, None)
        self._used[key] = None

    # ---- admission --------------------------------------------------------------------------------
    def ensure(self, av: AdapterVersion, in_use: set[str]) -> bool:
        """Make a request's LoRA resident. False: no room yet (rows still use what would have to go),
        nothing changed. Raises when it can never fit (counted as a failed load)."""
        key = av.key
        if self.bank.is_resident(key):
            self._count(hits=1)
        else:
            try:
                if not self._make_room(key, av.adapter.lora, in_use):
                    return False
                self._load(av)
            except Exception:
                self._count(load_failures=1)
                raise
            self._count(misses=1)
        self._touch(key)
        return True

    # ---- the API ----------------------------------------------------------------------------------
    def make_resident(self, av: AdapterVersion, pin: bool, in_use: set[str]) -> bool:
        """Load (and optionally pin) a LoRA version; True when it was loaded now, False when it already was."""
        if av.kind != "lora":
            return False
        loaded = False
        if not self.bank.is_resident(av.key):
            try:
                room = self._make_room(av.key, av.adapter.lora, in_use)
            except NoRoom as e:
                raise AdapterConflict(str(e)) from e
            if not room:
                raise AdapterConflict(
                    f"no room for adapter {av.key} in --max-resident-adapter-bytes {self.budget}: running requests "
                    "use the adapters that would go; retry")
            self._load(av)
            loaded = True
        self._touch(av.key)
        if pin:
            self.pinned.add(av.key)
        self.unload_when_idle.discard(av.key)
        self._publish()
        return loaded

    def release(self, keys: set[str], in_use: set[str]) -> set[str]:
        """Unpin and unload these versions, except those running requests use (they go as soon as the
        last of those requests ends: `unload_idle`). Returns the keys unloaded now."""
        done = set()
        for key in keys:
            self.pinned.discard(key)
            if key in in_use:
                self.unload_when_idle.add(key)
            elif self._unload(key):
                done.add(key)
        self._publish()
        return done

    def unload_idle(self, in_use: set[str]) -> None:
        """After rows finished: unload the released versions no running request uses any more."""
        idle = self.unload_when_idle - in_use
        for key in idle:
            self._unload(key)
        self.unload_when_idle -= idle
        if idle:
            self._publish()

    # ---- inside -----------------------------------------------------------------------------------
    def _unload(self, key: str) -> bool:
        self._used.pop(key, None)
        return self.bank.unload(key)

    def _load(self, av: AdapterVersion) -> None:
        self._count(loads=1)
        t0 = time.perf_counter()
        self.bank.load(av.key, av.adapter.lora)
        self._publish()
        log.info("adapter %s loaded into the engine in %.1f ms (stacks now %.1f MiB)", av.key,
                 (time.perf_counter() - t0) * 1000, self.resident_bytes / 2**20)

    def _make_room(self, key: str, modules, in_use: set[str]) -> bool:
        """Evict least recently used versions (not pinned, not in use) until the stacks with `key`
        fit the budget. False when they cannot yet (running requests hold what would have to go)."""
        alone = self.bank.stack_bytes_alone(modules)
        if alone > self.budget:
            raise NoRoom(f"adapter {key} needs {alone / 2**20:.1f} MiB of LoRA stacks, more than "
                         f"--max-resident-adapter-bytes {self.budget}; raise it to at least {alone}")
        keep = in_use | self.pinned
        for victim in list(self._used):
            if self.bank.stack_bytes_with(modules) <= self.budget:
                break
            if victim not in keep:
                self._unload(victim)
                self._count(evictions=1)
                log.info("evicted adapter %s from the engine (LRU, --max-resident-adapter-bytes)", victim)
        self._publish()
        need = self.bank.stack_bytes_with(modules)
        if need <= self.budget:
            return True
        if not in_use:  # nothing will ever finish and free room: pinned versions hold it
            raise NoRoom(f"adapter {key} needs the LoRA stacks to grow to {need / 2**20:.1f} MiB, but pinned "
                         f"adapters hold {self.resident_bytes / 2**20:.1f} MiB of --max-resident-adapter-bytes "
                         f"{self.budget}")
        return False
