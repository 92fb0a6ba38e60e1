"""The engine boundary: what the HTTP layer submits and what it gets back.

The HTTP layer builds a `GenerationRequest` (token ids, the resolved adapter, sampling
parameters), calls `Engine.generate`, and iterates `TokenEvent`s. It never sees a tensor.
Leaving the iteration early (a client that went away) cancels the request.
"""
from __future__ import annotations

import abc
import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from hotpeft.adapters.catalog import AdapterVersion

_ids = itertools.count(1)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: run to max_tokens whatever the model says


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterVersion | None = None  # None: the bare base
    request_id: int = field(default_factory=lambda: next(_ids))
    created: float = field(default_factory=time.monotonic)  # for the queue-wait metric


@dataclass
class TokenEvent:
    text: str  # new final text (may be empty while text is held back)
    token_ids: list[int]  # tokens sampled since the previous event
    finish_reason: str | None = None  # "stop" | "length" once finished
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: BaseException | None = None  # set when the request failed inside the engine
    replica: str | None = None  # which engine replica produced it (Ray Serve); None in one process


class EngineFailure(RuntimeError):
    """A request failed inside the engine; the engine itself keeps running."""


class Overloaded(RuntimeError):
    """The engine's queue is full: come back later (HTTP 429 with Retry-After)."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class ShuttingDown(EngineFailure):
    """The server stopped (or its drain timed out) before this request finished (503)."""


class ReplicaUnavailable(EngineFailure):
    """The engine replica running this request went away (Ray Serve): retry, another replica answers (503)."""


class OutOfMemory(Overloaded):
    """A step ran out of memory: its requests fail with 503 and Retry-After; the engine goes on."""


class Engine(abc.ABC):
    """One owner of the model; requests in, token streams out."""

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    @abc.abstractmethod
    def submit(self, request: GenerationRequest, sink: "EventSink") -> None:
        """Queue a request; its events go to `sink` from the engine's thread. Raises `Overloaded`."""

    @abc.abstractmethod
    def cancel(self, request_id: int) -> None:
        """Stop a request; its resources are freed within one step. Idempotent."""

    @abc.abstractmethod
    def stats(self) -> dict: ...

    @abc.abstractmethod
    async def load(self, version: AdapterVersion, pin: bool = False) -> bool:
        """Make a LoRA version resident (`pin`: never evicted); False when nothing changed."""

    @abc.abstractmethod
    async def unload(self, keys: set[str]) -> set[str]:
        """Unpin these versions and unload them unless running requests use them; the keys unloaded."""

    def placement(self, key: str) -> dict[str, str] | None:
        """Where each replica holds this version (disk / cpu / device); None for a single engine."""
        return None

    @abc.abstractmethod
    def forget(self, keys: set[str]) -> None:
        """Deleted versions: out of the engine as soon as no running request uses them (not waited for)."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Submit now (so `Overloaded` is raised here, before any response is sent) and return the
        request's event stream. Closing the stream early cancels the request; so does `cancel`.
        """
        sink = EventSink(asyncio.get_running_loop())
        self.submit(request, sink)
        return self._events(request, sink)

    async def _events(self, request: GenerationRequest, sink: "EventSink") -> AsyncIterator[TokenEvent]:
        finished = False
        try:
            while True:
                event = await sink.queue.get()
                if event.error is not None:
                    finished = True
                    raise event.error
                yield event
                if event.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self.cancel(request.request_id)


class EventSink:
    """Hands events from the engine thread to one request's asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[TokenEvent] = asyncio.Queue()

    def put(self, event: TokenEvent) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass
