"""The engine boundary: everything the HTTP layer may ask of an engine, and nothing more.

The HTTP layer builds a `GenerationRequest` (token ids, the resolved adapter, sampling
parameters), calls `Engine.generate`, and iterates `TokenEvent`s. It never sees a tensor.
Leaving the iteration early (a client that went away) cancels the request. It reads the engine
through `stats()` (an `EngineStats` record) and `residency()` (a `Residency` view), and changes
residency through `load` / `unload` / `forget`. The local `BatchEngine` (scheduler.py) and the
Ray Serve `RayEngine` (server/ray/engine.py) both implement all of it.
"""
from __future__ import annotations

import abc
import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, fields

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
    presence_penalty: float = 0.0  # OpenAI: minus this for every token already in the output
    frequency_penalty: float = 0.0  # OpenAI: minus this times the token's count in the output
    repetition_penalty: float = 1.0  # extension (CTRL, transformers, vLLM): prompt and output tokens' logits / it (> 0)
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI: (token id, bias in [-100, 100]) added to the logits
    min_tokens: int = 0  # extension (vLLM): EOS and stop_token_ids refused before this many tokens
    stop_token_ids: tuple[int, ...] = ()  # extension (vLLM): these tokens end the choice like EOS
    logprobs: int | None = None  # each sampled token's raw logprob and this many top alternatives (0..20)
    prompt_logprobs: int | None = None  # echo: the prompt tokens' logprobs and this many alternatives (0..5)
    grammar: str | None = None  # llguidance grammar (JSON): the output is constrained to it token by token

    def to_wire(self) -> dict:
        """JSON-like, for another process (Ray); `from_wire` gives it back."""
        return {**{k: getattr(self, k) for k in self.__dataclass_fields__}, "stop": list(self.stop),
                "logit_bias": [list(b) for b in self.logit_bias], "stop_token_ids": list(self.stop_token_ids)}

    @classmethod
    def from_wire(cls, raw: dict) -> SamplingParams:
        return cls(**{**raw, "stop": tuple(raw.get("stop", ())), "stop_token_ids": tuple(raw.get("stop_token_ids", ())),
                      "logit_bias": tuple((int(t), float(b)) for t, b in raw.get("logit_bias", ()))})

    def processes(self, generated: int) -> bool:
        """Whether this row's logits are changed before sampling its next token, `generated` tokens
        in (rows that are not pay nothing)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or generated < self.min_tokens)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterVersion | None = None  # None: the bare base
    request_id: int = field(default_factory=lambda: next(_ids))
    created: float = field(default_factory=time.monotonic)  # for the queue-wait metric
    compiled: object | None = field(default=None, repr=False, compare=False)  # the engine's grammar matcher


@dataclass
class TokenEvent:
    text: str  # new final text (may be empty while text is held back)
    token_ids: list[int]  # tokens sampled since the previous event
    finish_reason: str | None = None  # "stop" | "length" once finished
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: BaseException | None = None  # set when the request failed inside the engine
    replica: str | None = None  # which engine replica produced it (Ray Serve); None in one process
    # [token id, logprob, [[id, logprob], ...]] per token of `token_ids` (an EOS that ends the choice too), when asked
    logprobs: list | None = None
    # echo: [[token id, logprob or None, [[id, logprob], ...]], ...] for every prompt token, in the first event
    prompt_logprobs: list | None = None

    def wire(self) -> dict:
        """JSON-like (Ray); `TokenEvent(**wire)` gives it back."""
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "logprobs": self.logprobs, "prompt_logprobs": self.prompt_logprobs}


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


@dataclass(frozen=True)
class AdapterCounters:
    """Device-tier events since start: lookups that found the LoRA resident or had to load it,
    loads, LRU evictions and loads that failed."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    load_failures: int = 0

    def __add__(self, other: AdapterCounters) -> AdapterCounters:
        return AdapterCounters(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


@dataclass(frozen=True)
class ReplicaStats:
    """Behind Ray Serve: the engine replicas as last posted on the board."""

    up: int
    target: int
    ids: list[str]
    registry_generation: dict[str, int | None]
    resident: dict[str, list[str]]


@dataclass(frozen=True)
class EngineStats:
    """A consistent snapshot of an engine, safe to read from any thread."""

    running: int = 0  # requests decoding or prefilling
    waiting: int = 0  # requests queued for room
    slots: int = 0  # sequences that may run at once (--max-num-seqs)
    kv_tokens: int = 0  # positions in use
    kv_bytes: int = 0  # bytes of the whole KV cache
    kv_capacity_tokens: int = 0  # tokens the KV block pool holds
    max_seq_tokens: int = 0  # the longest sequence one engine can hold (its whole pool)
    kv_blocks: int = 0  # KV blocks (the null block not counted)
    kv_blocks_free: int = 0  # blocks no running sequence holds (cached ones included)
    kv_blocks_cached: int = 0  # blocks whose KV the prefix cache can hand out again
    block_size: int = 0  # tokens per block
    preempted: int = 0  # sequences put back for lack of blocks, waiting to resume
    preemptions: int = 0  # times a running sequence was preempted
    prefix_hit_tokens: int = 0  # prompt tokens found in the prefix cache
    prefix_query_tokens: int = 0  # prompt tokens looked up there
    prefix_evictions: int = 0  # cached blocks reused for other KV
    steps: int = 0
    tokens: int = 0  # tokens sampled
    failed_steps: int = 0
    resident_loras: int = 0  # LoRA versions in the device tier
    resident_lora_bytes: int = 0  # bytes the LoRA stacks hold (rank padding included)
    max_resident_lora_bytes: int = 0  # --max-resident-adapter-bytes
    adapters: AdapterCounters = AdapterCounters()
    alive: bool = False  # the engine's thread (or, behind Ray, any replica) is running
    stalled_s: float = 0.0  # seconds without progress while there is work
    replicas: ReplicaStats | None = None  # Ray Serve only
    in_flight: int = 0  # Ray Serve only: streams the ingress has open

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EngineStats:
        data = dict(data)
        data["adapters"] = AdapterCounters(**data.get("adapters", {}))
        replicas = data.get("replicas")
        data["replicas"] = ReplicaStats(**replicas) if replicas else None
        return cls(**data)


@dataclass(frozen=True)
class Residency:
    """Which LoRA versions are in the device tier and which are pinned (never evicted).

    Behind Ray Serve, per replica too: `replicas` maps replica id -> key -> "device" | "cpu"."""

    device: frozenset[str] = frozenset()
    pinned: frozenset[str] = frozenset()
    replicas: dict[str, dict[str, str]] | None = None

    def placement(self, key: str) -> dict[str, str] | None:
        """Where each replica holds this version (disk / cpu / device); None for a single engine."""
        if self.replicas is None:
            return None
        return {replica: held.get(key, "disk") for replica, held in sorted(self.replicas.items())}


class Engine(abc.ABC):
    """One owner of the model (or, behind Ray, of many replicas); requests in, token streams out."""

    observer = None  # metrics.EngineObserver: told of admissions and steps, from the engine's thread

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    @abc.abstractmethod
    def submit(self, request: GenerationRequest, sink: "EventSink") -> None:
        """Queue a request; its events go to `sink`. Raises `Overloaded` when the queue is full."""

    @abc.abstractmethod
    def cancel(self, request_id: int) -> None:
        """Stop a request; its resources are freed within one step. Idempotent."""

    @abc.abstractmethod
    def abort_all(self, why: str) -> None:
        """Fail every waiting and running request now with `ShuttingDown(why)`; the engine goes on."""

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    @abc.abstractmethod
    def residency(self) -> Residency: ...

    @abc.abstractmethod
    async def load(self, version: AdapterVersion, pin: bool = False) -> bool:
        """Make a LoRA version resident (`pin`: never evicted); False when nothing changed."""

    @abc.abstractmethod
    async def unload(self, keys: set[str]) -> set[str]:
        """Unpin these versions and unload them unless running requests use them; the keys unloaded."""

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
