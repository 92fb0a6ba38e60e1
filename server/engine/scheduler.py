"""The continuous-batching engine: one worker thread, one forward pass per step for every running row.

Each step the worker
1. runs calls queued from other threads (load, unload) and drops cancelled requests (their slot
   and KV are free for this very step),
2. admits waiting requests into free KV slots (their LoRA made resident by the device tier,
   `residency.py`; their prompt embedded with a soft prompt spliced in),
3. runs one step over every running row (`runner.py`): one forward pass whatever the rows'
   adapters, a token sampled for every row that finished its prompt or is decoding,
4. frees the slots of finished rows at once and hands each token to its request,
5. publishes its stats for other threads whenever rows join or leave or a step ends (`stats()`
   never reads what the worker mutates).

A failure inside a step fails the requests of that step (500 for them) and the engine goes on.
Requests that find no free slot wait; past `max_queue` waiting requests `submit` raises
`Overloaded` (HTTP 429).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace

import torch

from hotpeft.adapters.catalog import AdapterVersion
from hotpeft.adapters.faults import failpoint
from hotpeft.model.arch import Architecture
from hotpeft.server.engine.interface import (
    Engine, EngineFailure, EngineStats, EventSink, GenerationRequest, Overloaded, Residency, ShuttingDown, TokenEvent,
)
from hotpeft.server.engine.kv import SlotKVCache
from hotpeft.server.engine.lora import LoraBank
from hotpeft.server.engine.residency import DeviceTier
from hotpeft.server.engine.runner import Sequence, StepRunner, step_error

log = logging.getLogger("hotpeft.engine")


@dataclass(frozen=True)
class EngineLimits:
    max_batch_tokens: int = 256  # tokens per forward pass (decode rows + prefill chunks)
    max_queue: int = 256  # waiting requests before 429
    max_resident_adapter_bytes: int = 1 << 30  # bytes of the LoRA stacks (LRU, padding included)
    threads: int | None = None  # torch intra-op threads of the engine thread (None: leave as is)


class BatchEngine(Engine):
    def __init__(self, model: torch.nn.Module, arch: Architecture, tokenizer, bank: LoraBank, kv: SlotKVCache,
                 eos_ids: set[int], limits: EngineLimits = EngineLimits()):
        self.kv = kv
        self.limits = limits
        self.tier = DeviceTier(bank, limits.max_resident_adapter_bytes)
        self.runner = StepRunner(model, arch, kv, bank, tokenizer, eos_ids, limits.max_batch_tokens)
        self._cond = threading.Condition()
        self._waiting: deque[tuple[GenerationRequest, EventSink]] = deque()
        self._cancelled: set[int] = set()
        self._calls: list[tuple[Callable, Future]] = []  # run by the worker between steps
        self._stopping = False
        self._abort: str | None = None  # set by abort_all: fail everything now, keep running
        self._beat = time.monotonic()  # the loop's last sign of progress (wake-up or finished step)
        self._running: list[Sequence] = []  # index == slot
        self._thread: threading.Thread | None = None
        self._steps = self._tokens = self._failed_steps = 0
        self._stats = EngineStats(slots=kv.n_slots, slot_len=kv.slot_len, kv_bytes=kv.nbytes,
                                  max_resident_lora_bytes=limits.max_resident_adapter_bytes)

    # ---- the boundary -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="hotpeft-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, request: GenerationRequest, sink: EventSink) -> None:
        with self._cond:
            if self._stopping:  # stays set after stop() until the next start()
                raise EngineFailure("the engine is stopped")
            if len(self._waiting) >= self.limits.max_queue:
                raise Overloaded(
                    f"the server is at capacity: {len(self._waiting)} requests are waiting for one of "
                    f"{self.kv.n_slots} sequence slots (--max-queue {self.limits.max_queue}); retry shortly",
                    retry_after=1,
                )
            self._waiting.append((request, sink))
            self._cond.notify()

    def abort_all(self, why: str) -> None:
        with self._cond:
            self._abort = why
            self._cond.notify()

    def cancel(self, request_id: int) -> None:
        with self._cond:
            self._cancelled.add(request_id)
            self._cond.notify()

    def call(self, fn: Callable) -> Future:
        """Run `fn()` on the worker between two steps (the bank is the worker's alone); its result
        or exception lands in the returned future."""
        future: Future = Future()
        with self._cond:
            if self._stopping or self._thread is None:
                raise EngineFailure("the engine is stopped")
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    async def load(self, version: AdapterVersion, pin: bool = False) -> bool:
        return await asyncio.wrap_future(self.call(
            lambda: self.tier.make_resident(version, pin, self._loras_in_use())))

    async def unload(self, keys: set[str]) -> set[str]:
        return await asyncio.wrap_future(self.call(lambda: self.tier.release(keys, self._loras_in_use())))

    def forget(self, keys: set[str]) -> None:
        self.call(lambda: self.tier.release(keys, self._loras_in_use()))

    def residency(self) -> Residency:
        return self.tier.view

    def stats(self) -> EngineStats:
        """From any thread: the snapshot the worker published last, with the queue and liveness of now."""
        with self._cond:
            waiting = len(self._waiting)
        published = self._stats
        busy = bool(published.running or waiting)
        return replace(
            published, waiting=waiting, resident_loras=len(self.tier.view.device),
            resident_lora_bytes=self.tier.resident_bytes, adapters=self.tier.counters,
            alive=self._thread is not None and self._thread.is_alive(),
            # seconds without progress while there is work: /ready turns 503 past --stall-timeout
            stalled_s=round(time.monotonic() - self._beat, 3) if busy else 0.0,
        )

    # ---- the worker ---------------------------------------------------------------------------
    def _loras_in_use(self) -> set[str]:
        return {s.lora_key for s in self._running if s.lora_key is not None}

    def _publish_stats(self) -> None:
        self._stats = replace(self._stats, running=len(self._running), kv_tokens=sum(s.kv_len for s in self._running),
                              steps=self._steps, tokens=self._tokens, failed_steps=self._failed_steps)

    @torch.inference_mode()  # the whole worker: the bank's stacks and the KV cache are inference tensors
    def _loop(self) -> None:
        if self.limits.threads:
            # Set where the model runs, whichever thread built the engine (some OpenMP builds keep the
            # count per thread).
            torch.set_num_threads(self.limits.threads)
        log.info("engine thread started: %d torch threads", torch.get_num_threads())
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._running or self._cancelled or self._calls
                           or self._abort):
                    self._cond.wait()
                self._beat = time.monotonic()
                if self._stopping:
                    self._fail_all("the server is shutting down")
                    return
                if self._abort:
                    self._fail_all(self._abort)
                    self._abort = None
                cancelled, self._cancelled = self._cancelled, set()
                calls, self._calls = self._calls, []
                free = self.kv.n_slots - len(self._running)
                admit = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
                if cancelled:
                    self._waiting = deque(item for item in self._waiting if item[0].request_id not in cancelled)
            try:
                self._run_calls(calls)
                self._drop_cancelled(cancelled)
                if admit:
                    self._admit_all(admit, cancelled)
                    self._publish_stats()  # rows admitted count as running (and as work for the stall check) at once
                if self._running:
                    self._step()  # publishes when it compacts the rows
                self._beat = time.monotonic()
            except Exception:  # noqa: BLE001 - the worker must survive anything; the step already failed its rows
                log.exception("engine loop error")
                self._publish_stats()

    def _run_calls(self, calls: list[tuple[Callable, Future]]) -> None:
        for fn, future in calls:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - handed to the caller
                future.set_exception(e)
            else:
                future.set_result(result)

    def _admit_all(self, admit: list[tuple[GenerationRequest, EventSink]], cancelled: set[int]) -> None:
        for i, (request, sink) in enumerate(admit):
            if request.request_id not in cancelled and not self._admit(request, sink):
                with self._cond:  # no room for its adapter yet: it and those behind it wait
                    self._waiting.extendleft(reversed(admit[i:]))
                break

    def _fail_all(self, why: str) -> None:
        """Every waiting and running request gets an error event: no client is left waiting. Holds the lock."""
        error = ShuttingDown(why)
        for _, future in self._calls:
            future.set_exception(ShuttingDown(why))
        self._calls.clear()
        sinks = [sink for _, sink in self._waiting] + [s.sink for s in self._running]
        self._waiting.clear()
        for s in self._running:
            s.done = True
        self._compact()
        for sink in sinks:
            sink.put(TokenEvent("", [], error=error))

    def _drop_cancelled(self, cancelled: set[int]) -> None:
        if not cancelled:
            return
        for seq in self._running:
            if seq.request.request_id in cancelled:
                seq.done = True
        self._compact()

    def _admit(self, request: GenerationRequest, sink: EventSink) -> bool:
        """Start a request in a free slot. False: its adapter has no room yet (nothing changed)."""
        adapter, lora_key = request.adapter, None
        try:
            embeds = self.runner.prompt_embeds(request)
            if adapter is not None and adapter.kind == "lora":
                if not self.tier.ensure(adapter, self._loras_in_use()):
                    return False
                lora_key = adapter.key
        except Exception as e:  # noqa: BLE001 - this request fails, nothing else
            log.exception("request %d could not be admitted", request.request_id)
            sink.put(TokenEvent("", [], error=EngineFailure(f"generation failed: {type(e).__name__}: {e}")))
            return True
        if self.observer is not None:
            self.observer.admitted(adapter, time.monotonic() - request.created)
        slot = len(self._running)
        self.kv.release(slot)
        self._running.append(self.runner.sequence(request, sink, slot, self.runner.bank.adapter_id(lora_key),
                                                  lora_key, embeds))
        return True

    def _step(self) -> None:
        rows = list(self._running)
        t0 = time.perf_counter()
        try:
            failpoint("engine.step")
            events = self.runner.run(rows)
        except Exception as e:  # noqa: BLE001 - fail this step's requests, keep the engine
            self._failed_steps += 1
            log.exception("engine step failed for %d requests", len(rows))
            error = step_error(e)
            for s in rows:
                s.done = True
            self._compact()
            for s in rows:
                s.sink.put(TokenEvent("", [], error=error))
            return
        self._steps += 1
        self._tokens += len(events)
        if self.observer is not None:
            self.observer.stepped(time.perf_counter() - t0, len(rows))
        self._compact()  # first, so a client that sees its last token sees its row freed too
        for sink, event in events:
            sink.put(event)

    def _compact(self) -> None:
        """Drop finished rows; move the last live rows into the holes so slots stay 0..n-1."""
        rows = self._running
        alive = [s for s in rows if not s.done]
        n = len(alive)
        holes = [i for i in range(n) if rows[i].done]
        movers = [s for s in rows[n:] if not s.done]
        for s in rows:
            if s.done:
                self.kv.release(s.slot)
        for hole, s in zip(holes, movers):
            self.kv.move(s.slot, hole, s.kv_len)
            s.slot = hole
        self._running = sorted(alive, key=lambda s: s.slot)
        if self.tier.unload_when_idle:
            self.tier.unload_idle(self._loras_in_use())
        self._publish_stats()  # before any event goes out: a client that saw its last token sees its row gone
