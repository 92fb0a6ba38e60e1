"""A one-request-at-a-time engine: a worker thread runs prefill and decode with a KV cache.

This is the foundation's engine behind the `Engine` interface; the continuous-batching engine
replaces it. The model work already goes through `ModelRunner`, which batches rows of
different adapters in one forward pass, so a batching scheduler only adds scheduling.
"""
from __future__ import annotations

import logging
import queue
import threading

import torch

from hotpeft.server.engine.base import Engine, EngineFailure, EventSink, GenerationRequest, TokenEvent
from hotpeft.server.engine.detok import IncrementalText
from hotpeft.server.engine.runner import ModelRunner
from hotpeft.server.engine.sampling import make_generator, sample

log = logging.getLogger("hotpeft.engine")


class SerialEngine(Engine):
    def __init__(self, runner: ModelRunner, tokenizer):
        self.runner = runner
        self.tokenizer = tokenizer
        self._queue: queue.Queue[tuple[GenerationRequest, EventSink] | None] = queue.Queue()
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._running = 0
        self._steps = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="hotpeft-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, request: GenerationRequest, sink: EventSink) -> None:
        self._queue.put((request, sink))

    def cancel(self, request_id: int) -> None:
        with self._lock:
            self._cancelled.add(request_id)

    def stats(self) -> dict:
        return {
            "running": self._running,
            "waiting": self._queue.qsize(),
            "steps": self._steps,
            "alive": self._thread is not None and self._thread.is_alive(),
        }

    def _is_cancelled(self, request_id: int) -> bool:
        with self._lock:
            return request_id in self._cancelled

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            request, sink = item
            if self._is_cancelled(request.request_id):
                self._forget(request.request_id)
                continue
            self._running = 1
            try:
                self._run(request, sink)
            except Exception as e:  # noqa: BLE001 - one request's failure must not stop the engine
                log.exception("request %d failed in the engine", request.request_id)
                sink.put(TokenEvent("", [], error=EngineFailure(f"generation failed: {type(e).__name__}: {e}")))
            finally:
                self._running = 0
                self._forget(request.request_id)

    def _forget(self, request_id: int) -> None:
        with self._lock:
            self._cancelled.discard(request_id)

    @torch.inference_mode()
    def _run(self, request: GenerationRequest, sink: EventSink) -> None:
        p = request.params
        detok = IncrementalText(self.tokenizer, list(p.stop))
        generator = make_generator(p.seed)
        temperature = torch.tensor([p.temperature])
        top_p = torch.tensor([p.top_p])
        logits, cache = self.runner.prefill([request.prompt_ids], [request.adapter])
        n_prompt = len(request.prompt_ids)
        generated = 0
        while True:
            self._steps += 1
            token = int(sample(logits, temperature, top_p, [generator])[0])
            generated += 1
            finish = None
            text = ""
            if token in self.runner.eos_ids:
                finish = "stop"
            else:
                text = detok.push(token)
                if detok.stopped:
                    finish = "stop"
                elif generated >= p.max_tokens:
                    finish = "length"
            if finish is not None and not detok.stopped:
                text += detok.finish()
            sink.put(TokenEvent(text, [token], finish, n_prompt, generated))
            if finish is not None or self._is_cancelled(request.request_id):
                return
            logits = self.runner.decode([[token]], cache, [request.adapter])
