"""The continuous-batching engine: one worker thread, one forward pass per step for every running row.

Each step the worker
1. runs calls queued from other threads (load, unload) and drops cancelled requests (their KV
   blocks are free for this very step),
2. resumes preempted rows, then admits waiting requests while the KV pool has the blocks of their
   prompts beyond what the prefix cache already holds, above a small watermark (their LoRA made
   resident by the device tier, `residency.py`; their prompt embedded with a soft prompt spliced in),
3. gives every running row the blocks this step's tokens need; when the pool is out of blocks it
   preempts the most recently admitted row (its blocks freed, the row queued first to be recomputed
   later, its output unchanged) rather than failing anyone,
4. runs one step over every running row (`runner.py`): one forward pass whatever the rows'
   adapters, a token sampled for every row that finished its prompt or is decoding,
5. frees the blocks of finished rows at once (full ones stay cached for later prompts) and hands
   each token to its request,
6. publishes its stats for other threads whenever rows join or leave or a step ends (`stats()`
   never reads what the worker mutates).

A failure inside a step fails the requests of that step (500 for them) and the engine goes on.
Requests that find no room wait; past `max_queue` waiting requests `submit` raises `Overloaded`
(HTTP 429).
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
from hotpeft.server.engine.blocks import chain_hashes
from hotpeft.server.engine.kv import PagedKVCache
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
    max_num_seqs: int = 32  # sequences running at once
    watermark: float = 0.01  # share of the KV blocks kept free when admitting beside running rows
    graphs: str | None = None  # decode steps at fixed shapes: "cuda-graphs", "compile", "static" (`graphs.py`)


class BatchEngine(Engine):
    def __init__(self, model: torch.nn.Module, arch: Architecture, tokenizer, bank: LoraBank, kv: PagedKVCache,
                 eos_ids: set[int], limits: EngineLimits = EngineLimits(), max_model_len: int | None = None):
        self.kv = kv
        self.limits = limits
        self.tier = DeviceTier(bank, limits.max_resident_adapter_bytes)
        self.runner = StepRunner(model, arch, kv, bank, tokenizer, eos_ids, limits.max_batch_tokens,
                                 max_model_len or kv.capacity_tokens, limits.graphs, limits.max_num_seqs)
        self._watermark = max(1, int(kv.pool.usable * limits.watermark))
        self._preempted: deque[Sequence] = deque()  # rows put back, resumed before any new request
        self._preemptions = 0
        self._cond = threading.Condition()
        self._waiting: deque[tuple[GenerationRequest, EventSink]] = deque()
        self._cancelled: set[int] = set()
        self._calls: list[tuple[Callable, Future]] = []  # run by the worker between steps
        self._stopping = False
        self._abort: str | None = None  # set by abort_all: fail everything now, keep running
        self._beat = time.monotonic()  # the loop's last sign of progress (wake-up or finished step)
        self._running: list[Sequence] = []  # in admission order: the last is the first preempted
        self._thread: threading.Thread | None = None
        self._steps = self._tokens = self._failed_steps = 0
        self._stats = EngineStats(slots=limits.max_num_seqs, kv_bytes=kv.nbytes, kv_capacity_tokens=kv.capacity_tokens,
                                  max_seq_tokens=kv.capacity_tokens, kv_blocks=kv.pool.usable,
                                  kv_blocks_free=kv.pool.n_free, block_size=kv.block_size,
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
                    f"room in the KV cache (--max-queue {self.limits.max_queue}); retry shortly",
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
        return {s.lora_key for s in [*self._running, *self._preempted] if s.lora_key is not None}

    def _publish_stats(self) -> None:
        pool = self.kv.pool
        c = pool.counters
        self._stats = replace(self._stats, running=len(self._running), kv_tokens=sum(s.kv_len for s in self._running),
                              steps=self._steps, tokens=self._tokens, failed_steps=self._failed_steps,
                              kv_blocks_free=pool.n_free, kv_blocks_cached=len(pool.cached),
                              preempted=len(self._preempted), preemptions=self._preemptions,
                              prefix_hit_tokens=c.hit_tokens, prefix_query_tokens=c.query_tokens,
                              prefix_evictions=c.evictions)

    @torch.inference_mode()  # the whole worker: the bank's stacks and the KV cache are inference tensors
    def _loop(self) -> None:
        if self.limits.threads:
            # Set where the model runs, whichever thread built the engine (some OpenMP builds keep the
            # count per thread).
            torch.set_num_threads(self.limits.threads)
        log.info("engine thread started: %d torch threads", torch.get_num_threads())
        graphs = self.runner.graphs
        if graphs is not None and graphs.mode == "cuda-graphs":
            graphs.capture_all()  # before any request: the capture time is in the start-up log
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._running or self._preempted or self._cancelled
                           or self._calls or self._abort):
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
                room = self.limits.max_num_seqs - len(self._running) - len(self._preempted)
                admit = [self._waiting.popleft() for _ in range(max(0, min(room, len(self._waiting))))]
                if cancelled:
                    self._waiting = deque(item for item in self._waiting if item[0].request_id not in cancelled)
            try:
                self._run_calls(calls)
                self._drop_cancelled(cancelled)
                if self._preempted or admit:
                    self._resume()
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

    def _resume(self) -> None:
        while self._preempted and self._place(self._preempted[0], new=False):
            self._running.append(self._preempted.popleft())

    def _admit_all(self, admit: list[tuple[GenerationRequest, EventSink]], cancelled: set[int]) -> None:
        for i, (request, sink) in enumerate(admit):
            if request.request_id not in cancelled and (self._preempted or not self._admit(request, sink)):
                with self._cond:  # no room for its adapter yet: it and those behind it wait
                    self._waiting.extendleft(reversed(admit[i:]))
                break

    def _fail_all(self, why: str) -> None:
        """Every waiting and running request gets an error event: no client is left waiting. Holds the lock."""
        error = ShuttingDown(why)
        for _, future in self._calls:
            future.set_exception(ShuttingDown(why))
        self._calls.clear()
        sinks = [sink for _, sink in self._waiting] + [s.sink for s in [*self._running, *self._preempted]]
        self._waiting.clear()
        self._preempted.clear()
        for s in self._running:
            s.done = True
        self._retire()
        for sink in sinks:
            sink.put(TokenEvent("", [], error=error))

    def _drop_cancelled(self, cancelled: set[int]) -> None:
        if not cancelled:
            return
        for seq in self._running:
            if seq.request.request_id in cancelled:
                seq.done = True
        self._preempted = deque(s for s in self._preempted if s.request.request_id not in cancelled)
        self._retire()

    def _admit(self, request: GenerationRequest, sink: EventSink) -> bool:
        """Start a request. False: its adapter or its KV blocks have no room yet (it waits)."""
        adapter, lora_key = request.adapter, None
        try:
            embeds = self.runner.prompt_embeds(request)
            matcher = self.runner.grammars.matcher(request) if request.params.grammar else None
            if adapter is not None and adapter.kind == "lora":
                if not self.tier.ensure(adapter, self._loras_in_use()):
                    return False
                lora_key = adapter.key
        except Exception as e:  # noqa: BLE001 - this request fails, nothing else
            log.exception("request %d could not be admitted", request.request_id)
            sink.put(TokenEvent("", [], error=EngineFailure(f"generation failed: {type(e).__name__}: {e}")))
            return True
        seq = self.runner.sequence(request, sink, self.runner.bank.adapter_id(lora_key), lora_key, embeds)
        seq.matcher = matcher
        if not self._place(seq, new=True):
            return False
        if self.observer is not None:
            self.observer.admitted(adapter, time.monotonic() - request.created)
        self._running.append(seq)
        return True

    def _place(self, seq: Sequence, new: bool) -> bool:
        """Give a row the blocks of its prompt: the longest cached chain of its own weights' KV, fresh
        blocks for the rest. False (nothing taken) when the pool cannot hold them above the watermark."""
        kv, pool = self.kv, self.kv.pool
        bs = kv.block_size
        cacheable = (seq.prompt_len - 1) // bs  # the last prompt token is always computed: its logits sample
        scoring = seq.request.params.prompt_logprobs is not None and not seq.prompt_scored
        if scoring:  # echo: every prompt position is computed to score the token after it
            seq.prompt_lp = []
        hashes = chain_hashes(seq.kv_key, seq.ids[:cacheable * bs], bs) if pool.prefix_cache and not scoring else []
        hits = pool.match(hashes)
        need = kv.blocks_for(seq.prompt_len) - len(hits)
        if need > pool.n_free - (self._watermark if self._running else 0):
            pool.release(hits)
            return False
        seq.blocks = hits + pool.allocate(need)
        seq.hashes = hashes[:len(hits)]
        seq.kv_len = seq.prefilled = len(hits) * bs
        if new:
            pool.count_lookup(seq.prompt_len, seq.kv_len)
        return True

    def _reserve(self) -> list[int]:
        """Blocks for this step's tokens of every running row, preempting the newest rows while the pool
        is short; returns each row's tokens this step."""
        pool = self.kv.pool
        while self._running:
            takes = self.runner.takes(self._running)
            grow = [max(0, self.kv.blocks_for(s.kv_len + t) - len(s.blocks)) for s, t in zip(self._running, takes)]
            if sum(grow) <= pool.n_free:
                for s, n in zip(self._running, grow):
                    if n:
                        s.blocks += pool.allocate(n)
                return takes
            self._preempt(self._running[-1])
        return []

    def _preempt(self, s: Sequence) -> None:
        self.kv.pool.release(s.blocks)  # full blocks stay cached: resuming may find them again
        s.blocks, s.hashes, s.kv_len, s.prefilled = [], [], 0, 0
        s.embeds = self.runner.resume_embeds(s)
        s.prompt_len = s.embeds.shape[0]
        self._running.remove(s)
        self._preempted.appendleft(s)
        self._preemptions += 1
        log.info("request %d preempted (KV pool out of blocks); it resumes when blocks free up", s.request.request_id)

    def _step(self) -> None:
        takes = self._reserve()
        rows = list(self._running)
        if not rows:
            return
        t0 = time.perf_counter()
        try:
            failpoint("engine.step")
            events = self.runner.run(rows, takes)
        except Exception as e:  # noqa: BLE001 - fail this step's requests, keep the engine
            self._failed_steps += 1
            log.exception("engine step failed for %d requests", len(rows))
            error = step_error(e)
            for s in rows:
                s.done = True
            self._retire()
            for s in rows:
                s.sink.put(TokenEvent("", [], error=error))
            return
        self._steps += 1
        self._tokens += len(events)
        if self.observer is not None:
            self.observer.stepped(time.perf_counter() - t0, len(rows))
        self._retire()  # first, so a client that sees its last token sees its row freed too
        for sink, event in events:
            sink.put(event)

    def _retire(self) -> None:
        """Drop finished rows and give their blocks back (no KV is copied)."""
        for s in self._running:
            if s.done and s.blocks:
                self.kv.pool.release(s.blocks)
                s.blocks = []
        self._running = [s for s in self._running if not s.done]
        if self.tier.unload_when_idle:
            self.tier.unload_idle(self._loras_in_use())
        self._publish_stats()  # before any event goes out: a client that saw its last token sees its row gone
