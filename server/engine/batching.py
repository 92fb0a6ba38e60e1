"""The continuous-batching engine: one worker thread, one forward pass per step for every running row.

Each step the worker
1. drops cancelled requests (their slot and KV are free for this very step),
2. admits waiting requests into free KV slots (their LoRA is made resident, their prompt
   embedded with the soft prompt spliced in),
3. packs one token of every decoding row and a chunk of every prefilling row into one batch,
   at most `max_batch_tokens` tokens, decode rows first so a long prompt never stalls them,
4. runs one forward pass whatever the rows' adapters, samples every row that finished its
   prompt or is decoding, and streams each row's token to its request,
5. frees the slots of finished rows at once.

A failure inside a step fails the requests of that step (500 for them) and the engine goes on.
Requests that find no free slot wait; past `max_queue` waiting requests `submit` raises
`Overloaded` (HTTP 429).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from hotpeft.adapters.catalog import AdapterVersion
from hotpeft.adapters.errors import AdapterConflict
from hotpeft.adapters.faults import failpoint
from hotpeft.server.engine.base import (
    Engine, EngineFailure, EventSink, GenerationRequest, OutOfMemory, Overloaded, ShuttingDown, TokenEvent,
)
from hotpeft.server.engine.detok import IncrementalText
from hotpeft.server.engine.forward import LlamaStep, SlotKVCache, StepInput
from hotpeft.server.engine.lora import LoraBank
from hotpeft.server.engine.sampling import make_generator, sample

log = logging.getLogger("hotpeft.engine")


@dataclass(frozen=True)
class EngineLimits:
    max_batch_tokens: int = 256  # tokens per forward pass (decode rows + prefill chunks)
    max_queue: int = 256  # waiting requests before 429
    max_resident_adapter_bytes: int = 1 << 30  # LoRA weights in the engine's stacks (LRU by bytes)
    threads: int | None = None  # torch intra-op threads of the engine thread (None: leave as is)


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    sink: EventSink
    slot: int
    adapter_id: int  # LoRA bank id, 0 = no LoRA
    lora_key: str | None  # the resident LoRA this row uses (never evicted while it runs)
    embeds: torch.Tensor | None  # (P, H) prompt embeddings incl. soft prompt; dropped after prefill
    prompt_len: int  # P: positions of the prompt, virtual tokens included
    detok: IncrementalText
    generator: torch.Generator
    prefilled: int = 0
    kv_len: int = 0
    generated: int = 0
    last_token: int = -1
    done: bool = False

    @property
    def decoding(self) -> bool:
        return self.prefilled >= self.prompt_len


class BatchEngine(Engine):
    def __init__(self, model: torch.nn.Module, tokenizer, bank: LoraBank, kv: SlotKVCache, eos_ids: set[int],
                 limits: EngineLimits = EngineLimits()):
        self.model = model
        self.tokenizer = tokenizer
        self.bank = bank
        self.kv = kv
        self.eos_ids = eos_ids
        self.limits = limits
        self.step_fn = LlamaStep(model, kv, bank)
        self.embed = model.get_input_embeddings()
        self.device = self.embed.weight.device
        self.vocab_size = self.embed.weight.shape[0]
        self._cond = threading.Condition()
        self._waiting: deque[tuple[GenerationRequest, EventSink]] = deque()
        self._cancelled: set[int] = set()
        self._calls: list[tuple[Callable, Future]] = []  # run by the worker between steps
        self._stopping = False
        self._abort: str | None = None  # set by abort_all: fail everything now, keep running
        self._beat = time.monotonic()  # the loop's last sign of progress (wake-up or finished step)
        self.resident: frozenset[str] = frozenset()  # LoRA keys in the bank; republished by the worker
        self._unload_when_idle: set[str] = set()  # released while running requests used them
        self._running: list[Sequence] = []  # index == slot
        self._thread: threading.Thread | None = None
        self._steps = 0
        self._tokens = 0
        self._failed_steps = 0
        self.observer = None  # metrics.EngineObserver: told of admissions and steps, from this thread
        # the device tier, since start
        self.adapter_counts = {"hits": 0, "misses": 0, "loads": 0, "evictions": 0, "load_failures": 0}

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
        """Fail every waiting and running request now (each gets an error event); the engine goes on."""
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
        return await asyncio.wrap_future(self.call(lambda: self.make_resident(version, pin)))

    async def unload(self, keys: set[str]) -> set[str]:
        return await asyncio.wrap_future(self.call(lambda: self.release(keys)))

    def forget(self, keys: set[str]) -> None:
        self.call(lambda: self.release(keys))

    @torch.inference_mode()  # the bank's stacks are inference tensors (made in `_admit`)
    def make_resident(self, av: AdapterVersion, pin: bool = False) -> bool:
        """Worker only (through `call`). Load a LoRA into the bank, evicting LRU ones if needed;
        True when it was loaded now, False when it already was. `pin` keeps it from eviction."""
        if av.kind != "lora":
            return False
        loaded = False
        if not self.bank.is_resident(av.key):
            try:
                room = self._make_room(av.key, av.adapter.lora)
            except ValueError as e:
                raise AdapterConflict(str(e)) from e
            if not room:
                raise AdapterConflict(
                    f"no room for adapter {av.key} in --max-resident-adapter-bytes "
                    f"{self.limits.max_resident_adapter_bytes}: running requests use the adapters that would go; retry"
                )
            self._load(av)
            loaded = True
        self.bank.touch(av.key)
        if pin:
            self.bank.pinned.add(av.key)
        self._unload_when_idle.discard(av.key)
        return loaded

    @torch.inference_mode()
    def release(self, keys: set[str]) -> set[str]:
        """Worker only. Unpin and unload these LoRAs, except those running requests still use (they
        go as soon as the last of those requests ends). Returns the keys unloaded now."""
        in_use = {s.lora_key for s in self._running}
        done = set()
        for key in keys:
            self.bank.pinned.discard(key)
            if key in in_use:
                self._unload_when_idle.add(key)  # out once its last running request ends (`_compact`)
            elif self.bank.unload(key):
                done.add(key)
        self._publish()
        return done

    def _load(self, av: AdapterVersion) -> None:
        self.adapter_counts["loads"] += 1
        t0 = time.perf_counter()
        self.bank.load(av.key, av.adapter.lora)
        self._publish()
        log.info("adapter %s loaded into the engine in %.1f ms (%.1f MiB)", av.key,
                 (time.perf_counter() - t0) * 1000, self.bank.adapter_bytes(av.key) / 2**20)

    def _publish(self) -> None:
        self.resident = frozenset(self.bank.adapters)

    def stats(self) -> dict:
        with self._cond:
            waiting = len(self._waiting)
        running = list(self._running)
        busy = bool(running or waiting)
        return {
            "running": len(running),
            "waiting": waiting,
            "slots": self.kv.n_slots,
            "slot_len": self.kv.slot_len,
            "kv_tokens": sum(s.kv_len for s in running),
            "kv_bytes": self.kv.nbytes,
            "steps": self._steps,
            "tokens": self._tokens,
            "failed_steps": self._failed_steps,
            "resident_loras": len(self.bank.adapters),
            "resident_lora_bytes": self.bank.adapters_bytes(),
            "alive": self._thread is not None and self._thread.is_alive(),
            # seconds without progress while there is work: /ready turns 503 past --stall-timeout
            "stalled_s": round(time.monotonic() - self._beat, 3) if busy else 0.0,
        }

    # ---- the worker ---------------------------------------------------------------------------
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
                admit = []
                free = self.kv.n_slots - len(self._running)
                while self._waiting and len(admit) < free:
                    admit.append(self._waiting.popleft())
                if cancelled:
                    kept = deque(item for item in self._waiting if item[0].request_id not in cancelled)
                    self._waiting = kept
            for fn, future in calls:
                try:
                    future.set_result(fn())
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    future.set_exception(e)
            try:
                self._drop_cancelled(cancelled)
                for i, (request, sink) in enumerate(admit):
                    if request.request_id not in cancelled and not self._admit(request, sink):
                        with self._cond:  # no room for its adapter yet: it and those behind it wait
                            self._waiting.extendleft(reversed(admit[i:]))
                        break
                if self._running:
                    self._step()
                self._beat = time.monotonic()
            except Exception:  # noqa: BLE001 - the worker must survive anything; the step already failed its rows
                log.exception("engine loop error")

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

    def _make_room(self, key: str, modules) -> bool:
        """Evict least recently used adapters (not pinned, not used by a running row) until `key` fits.

        False when it cannot fit yet (rows still use what would have to go): the request waits.
        """
        budget = self.limits.max_resident_adapter_bytes
        need = self.bank.bytes_needed(modules)
        if need > budget:
            raise ValueError(
                f"adapter {key} needs {need / 2**20:.1f} MiB of LoRA memory, more than "
                f"--max-resident-adapter-bytes {budget}; raise it to at least {need}"
            )
        in_use = {s.lora_key for s in self._running} | self.bank.pinned
        for victim in self.bank.lru():
            if self.bank.adapters_bytes() + need <= budget:
                break
            if victim not in in_use:
                self.bank.unload(victim)
                self._publish()
                self.adapter_counts["evictions"] += 1
                log.info("evicted adapter %s from the engine (LRU, --max-resident-adapter-bytes)", victim)
        if self.bank.adapters_bytes() + need <= budget:
            return True
        if not self._running:  # nothing will ever finish and free room: only pinned adapters are left
            raise ValueError(
                f"adapter {key} needs {need / 2**20:.1f} MiB of LoRA memory, but pinned adapters hold "
                f"{self.bank.adapters_bytes() / 2**20:.1f} MiB of --max-resident-adapter-bytes {budget}"
            )
        return False

    @torch.inference_mode()
    def _admit(self, request: GenerationRequest, sink: EventSink) -> bool:
        """Start a request in a free slot. False: its adapter has no room yet (nothing changed)."""
        adapter_id, lora_key = 0, None
        try:
            ids = request.prompt_ids
            if not ids or min(ids) < 0 or max(ids) >= self.vocab_size:
                raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
            adapter = request.adapter
            embeds = self.embed(torch.tensor(ids, dtype=torch.long, device=self.device))  # (T, H)
            if adapter is not None and adapter.kind == "lora":
                lora_key = adapter.key
                if not self.bank.is_resident(lora_key):
                    if not self._make_room(lora_key, adapter.adapter.lora):
                        return False
                    self._load(adapter)
                    self.adapter_counts["misses"] += 1
                else:
                    self.adapter_counts["hits"] += 1
                self.bank.touch(lora_key)
                adapter_id = self.bank.adapter_id(lora_key)
            elif adapter is not None and adapter.kind == "prompt_tuning":
                # Soft prompt: virtual-token embeddings before the input, positions 0..n-1 (as PEFT does).
                soft = adapter.adapter.soft_prompt.to(device=self.device, dtype=embeds.dtype)  # (n, H)
                embeds = torch.cat([soft, embeds])
            if embeds.shape[0] + request.params.max_tokens > self.kv.slot_len:
                raise ValueError(
                    f"prompt ({embeds.shape[0]} positions) + max_tokens ({request.params.max_tokens}) "
                    f"exceed the KV slot of {self.kv.slot_len} positions"
                )
        except Exception as e:  # noqa: BLE001 - this request fails, nothing else
            if lora_key is not None and not self.bank.is_resident(lora_key):
                self.adapter_counts["load_failures"] += 1
            log.exception("request %d could not be admitted", request.request_id)
            sink.put(TokenEvent("", [], error=EngineFailure(f"generation failed: {type(e).__name__}: {e}")))
            return True
        if self.observer is not None:
            self.observer.admitted(request.adapter, time.monotonic() - request.created)
        slot = len(self._running)
        self.kv.release(slot)
        p = request.params
        self._running.append(Sequence(
            request, sink, slot, adapter_id, lora_key, embeds, embeds.shape[0],
            IncrementalText(self.tokenizer, list(p.stop)), make_generator(p.seed),
        ))
        return True

    def _build(self) -> tuple[StepInput, list[Sequence], list[int]]:
        rows = self._running
        decode_tokens = [s.last_token for s in rows if s.decoding]
        all_decoding = len(decode_tokens) == len(rows)
        budget = self.limits.max_batch_tokens - len(decode_tokens)
        takes, pieces, positions, slots, chunks, sample_rows = [], [], [], [], [], []
        decode_embeds = self.embed(torch.tensor(decode_tokens, dtype=torch.long, device=self.device)) if decode_tokens else None
        di = 0
        n_tok = 0
        for row, s in enumerate(rows):
            if s.decoding:
                take = 1
                if not all_decoding:
                    pieces.append(decode_embeds[di:di + 1])
                di += 1
                sample_rows.append(row)
            else:
                take = min(s.prompt_len - s.prefilled, max(1, budget))  # every row moves every step
                budget -= take
                pieces.append(s.embeds[s.prefilled:s.prefilled + take])
                if take > 1:
                    chunks.append((row, n_tok, n_tok + take, s.kv_len))
                if s.prefilled + take == s.prompt_len:
                    sample_rows.append(row)
            positions.extend(range(s.kv_len, s.kv_len + take))
            slots.extend([row] * take)
            takes.append(take)
            n_tok += take
        dev = self.device
        kv_lens = [s.kv_len + t for s, t in zip(rows, takes)]
        last_index = torch.tensor(list(itertools.accumulate(takes)), dtype=torch.long, device=dev) - 1
        if all_decoding:
            embeds = decode_embeds  # already in row order
        else:
            embeds = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        step = StepInput(
            embeds=embeds,
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            token_slots=torch.tensor(slots, dtype=torch.long, device=dev),
            last_index=last_index,
            kv_lens=torch.tensor(kv_lens, dtype=torch.long, device=dev),
            chunks=chunks,
            read_len=max(kv_lens),
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=dev),
        )
        token_adapters = [s.adapter_id for s, t in zip(rows, takes) for _ in range(t)]
        self.bank.plan(token_adapters)
        return step, [rows[r] for r in sample_rows], takes

    @torch.inference_mode()
    def _step(self) -> None:
        rows = list(self._running)
        t0 = time.perf_counter()
        try:
            failpoint("engine.step")
            step, sampled, takes = self._build()
            self.kv.prepare(len(rows), step.read_len)
            logits = self.step_fn.forward(step)  # (S, V); S = 0 when every row is mid-prompt
            tokens = []
            if sampled:
                temperature = torch.tensor([s.request.params.temperature for s in sampled], device=logits.device)
                top_p = torch.tensor([s.request.params.top_p for s in sampled], device=logits.device)
                tokens = sample(logits, temperature, top_p, [s.generator for s in sampled]).tolist()
        except Exception as e:  # noqa: BLE001 - fail this step's requests, keep the engine
            self._failed_steps += 1
            log.exception("engine step failed for %d requests", len(rows))
            error = self._step_error(e)
            for s in rows:
                s.done = True
            self._compact()
            for s in rows:
                s.sink.put(TokenEvent("", [], error=error))
            return
        finally:
            self.bank.clear_plan()
        self._steps += 1
        if self.observer is not None:
            self.observer.stepped(time.perf_counter() - t0, len(rows))
        for s, take in zip(rows, takes):
            s.kv_len += take
            if not s.decoding:
                s.prefilled += take
                if s.decoding:
                    s.embeds = None  # the prompt is in the KV cache now
        events = []
        for s, token in zip(sampled, tokens):
            try:
                events.append((s.sink, self._event(s, token)))
            except Exception as e:  # noqa: BLE001 - e.g. a tokenizer error: this row only
                log.exception("request %d failed after sampling", s.request.request_id)
                events.append((s.sink, TokenEvent("", [], error=EngineFailure(f"generation failed: {type(e).__name__}: {e}"))))
                s.done = True
        self._tokens += len(tokens)
        self._compact()  # first, so a client that sees its last token sees its row freed too
        for sink, event in events:
            sink.put(event)

    @staticmethod
    def _step_error(e: BaseException) -> Exception:
        """Out of memory is a capacity problem (503, retry); anything else is a failed generation (500)."""
        if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return OutOfMemory("the server ran out of memory for this batch; retry shortly (or lower --max-num-seqs "
                               "/ --max-batch-tokens)", retry_after=2)
        return EngineFailure(f"generation failed: {type(e).__name__}: {e}")

    def _event(self, s: Sequence, token: int) -> TokenEvent:
        p = s.request.params
        s.generated += 1
        s.last_token = token
        finish, text = None, ""
        if token in self.eos_ids and not p.ignore_eos:
            finish = "stop"
        else:
            text = s.detok.push(token)
            if s.detok.stopped:
                finish = "stop"
            elif s.generated >= p.max_tokens:
                finish = "length"
        if finish is not None and not s.detok.stopped:
            text += s.detok.finish()
        if finish is not None:
            s.done = True
        return TokenEvent(text, [token], finish, len(s.request.prompt_ids), s.generated)

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
        if self._unload_when_idle:
            idle = self._unload_when_idle - {s.lora_key for s in alive}
            for key in idle:
                self.bank.unload(key)
            self._unload_when_idle -= idle
            if idle:
                self._publish()
