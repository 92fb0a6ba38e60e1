"""Prometheus metrics of one server, on its own CollectorRegistry (`GET /metrics`).

Every name starts with `hotpeft_`. The `adapter` label is a registry name, the base model's id,
`mix` (a per-request mix), `unknown` (a request whose model did not resolve) or `other` (past
`--metrics-max-adapters` distinct names): never a string a client typed, and bounded.
Request metrics are observed by the routes (`RequestTracker`), queue wait and step figures by
the engine (`EngineObserver`), and gauges are read from the engine, the CPU tier and the job
records when Prometheus scrapes.

Behind Ray Serve (`by_replica`) the ingress's request metrics carry a `replica` label, the engine
replica that generated the answer (`none` when none did), and `remote` adds every engine
replica's own families with its `replica` label (server/ray/board.py). The gauges read at scrape
time are `gauges.py`.
"""
from __future__ import annotations

import copy
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily

from hotpeft.server.errors import describe

# From a GPU's milliseconds to a CPU's seconds per long request.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
OUTCOMES = ("ok", "client_error", "server_error", "cancelled", "rejected")
UNKNOWN, MIX, OTHER = "unknown", "mix", "other"
ENGINE_FAMILIES = ("hotpeft_engine_step_duration_seconds", "hotpeft_engine_batch_size", "hotpeft_queue_wait_seconds")
WINDOW_S = 600  # what the dashboard shows: the last ten minutes, in 10-second buckets
BUCKET_S = 10


class Metrics:
    def __init__(self, *, base_id: str, max_adapters: int, info: dict[str, str],
                 gauges: Callable[[], list[GaugeMetricFamily]] = lambda: [], by_replica: bool = False):
        self.base_id = base_id
        self.by_replica = by_replica
        # Behind Ray Serve: the other processes' families, each with the labels that tell them apart.
        self.remote: Callable[[], list[tuple[dict[str, str], list]]] | None = None
        self.labels: dict[str, str] = {}  # and this process's own, added to its families when rendering
        self.max_adapters = max_adapters
        self._names: set[str] = set()
        self._lock = threading.Lock()
        # For the dashboard: finished requests (time, adapter, ttft s, e2e s, tokens) and steps (time, rows).
        self.recent: deque[tuple[float, str, float | None, float, int]] = deque(maxlen=200_000)
        self.recent_steps: deque[tuple[float, int]] = deque(maxlen=200_000)
        r = self.registry = CollectorRegistry()
        a = ["adapter"]
        q = ["adapter"]  # observed by the engine, wherever it runs
        if by_replica:
            a = ["adapter", "replica"]
        self.request_latency = Histogram("hotpeft_request_duration_seconds", "End-to-end request latency",
                                         a + ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("hotpeft_time_to_first_token_seconds", "Time to first token", a,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("hotpeft_inter_token_latency_seconds", "Time between tokens of one choice", a,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("hotpeft_queue_wait_seconds", "Time from submission to a sequence slot", q,
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_len = Histogram("hotpeft_request_prompt_tokens", "Prompt tokens per request", a,
                                    buckets=TOKEN_BUCKETS, registry=r)
        self.output_len = Histogram("hotpeft_request_generation_tokens", "Generated tokens per request", a,
                                    buckets=TOKEN_BUCKETS, registry=r)
        self.step_time = Histogram("hotpeft_engine_step_duration_seconds", "One forward pass of the batch",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("hotpeft_engine_batch_size", "Sequences in one engine step",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.requests = Counter("hotpeft_requests", "Requests by adapter, endpoint and outcome",
                                a + ["endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter("hotpeft_prompt_tokens", "Prompt tokens processed", a, registry=r)
        self.generation_tokens = Counter("hotpeft_generation_tokens", "Tokens generated", a, registry=r)
        Info("hotpeft_build", "Version, base model, quantization and device", registry=r).info(info)
        r.register(_Gauges(gauges))

    def label(self, adapter) -> str:
        """The adapter label of an AdapterVersion (None: the base)."""
        if adapter is None:
            return self.base_id
        if adapter.record is None:
            return MIX
        name = adapter.record.name
        with self._lock:
            if name in self._names:
                return name
            if len(self._names) < self.max_adapters:
                self._names.add(name)
                return name
        return OTHER

    def own_families(self) -> list:
        """This process's families that have samples; behind Ray Serve, not the engine's (the
        ingress runs none: its empty engine histograms would only add zeros)."""
        skip = ENGINE_FAMILIES if self.by_replica else ()
        return [f for f in self.registry.collect() if f.samples and f.name not in skip]

    def render(self) -> bytes:
        """The Prometheus text of this process, and of the engine replicas behind it if any."""
        if self.remote is None:
            return generate_latest(self.registry)
        families = labelled([(self.labels, self.own_families()), *self.remote()])
        return generate_latest(_Fixed(families))

    def track(self, endpoint: str) -> RequestTracker:
        return RequestTracker(self, endpoint)

    def window(self, now: float | None = None) -> dict:
        """Per adapter and 10-second bucket over the last ten minutes: TTFT and end-to-end p50/p95 (ms),
        requests and generated tokens/s; and the mean batch size per bucket."""
        now = time.time() if now is None else now
        start = now - WINDOW_S
        buckets: dict[str, dict[int, list]] = {}
        for t, adapter, ttft, e2e, tokens in list(self.recent):
            if t >= start:
                b = buckets.setdefault(adapter, {}).setdefault(int((t - start) // BUCKET_S), [[], [], 0])
                if ttft is not None:
                    b[0].append(ttft)
                b[1].append(e2e)
                b[2] += tokens
        pct = lambda xs, q: round(float(np.percentile(xs, q)) * 1000, 1) if xs else None  # noqa: E731
        series = {
            adapter: [{"t": round(start + i * BUCKET_S, 1), "ttft_p50_ms": pct(b[0], 50), "ttft_p95_ms": pct(b[0], 95),
                       "e2e_p50_ms": pct(b[1], 50), "e2e_p95_ms": pct(b[1], 95), "requests": len(b[1]),
                       "tokens_per_s": round(b[2] / BUCKET_S, 2)} for i, b in sorted(by.items())]
            for adapter, by in sorted(buckets.items())
        }
        steps: dict[int, list[int]] = {}
        for t, rows in list(self.recent_steps):
            if t >= start:
                steps.setdefault(int((t - start) // BUCKET_S), []).append(rows)
        batch = [{"t": round(start + i * BUCKET_S, 1), "mean": round(sum(r) / len(r), 2), "steps": len(r)}
                 for i, r in sorted(steps.items())]
        return {"now": now, "window_s": WINDOW_S, "bucket_s": BUCKET_S, "series": series, "batch": batch}


class _Fixed:
    """Families already collected, in the shape generate_latest reads."""

    def __init__(self, families: list):
        self.families = families

    def collect(self):
        return iter(self.families)


class _Gauges:
    """Read at scrape time, so they are never stale."""

    def __init__(self, make: Callable[[], list[GaugeMetricFamily]]):
        self.make = make

    def collect(self):
        yield from self.make()


class RequestTracker:
    """One request's way through a route: resolution, tokens per choice, and its outcome (once)."""

    def __init__(self, metrics: Metrics, endpoint: str):
        self.m = metrics
        self.endpoint = endpoint
        self.adapter = UNKNOWN
        self.replica = "none"  # behind Ray Serve: the engine replica that answers, once it is known
        self.t0 = time.perf_counter()
        self._first: float | None = None
        self._last: dict[int, float] = {}
        self._done = False

    def resolved(self, adapter) -> None:
        self.adapter = self.m.label(adapter)

    def _by(self) -> tuple[str, ...]:
        return (self.adapter, self.replica) if self.m.by_replica else (self.adapter,)

    def tokens(self, choice: int, n: int) -> None:
        if not n:
            return
        now = time.perf_counter()
        if self._first is None:
            self._first = now
            self.m.ttft.labels(*self._by()).observe(now - self.t0)
        last = self._last.get(choice)
        if last is not None:
            gap = (now - last) / n
            for _ in range(n):
                self.m.itl.labels(*self._by()).observe(gap)
        self._last[choice] = now

    def finish(self, outcome: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        if self._done:
            return
        self._done = True
        m, by = self.m, self._by()
        e2e = time.perf_counter() - self.t0
        m.requests.labels(*by, self.endpoint, outcome).inc()
        m.request_latency.labels(*by, self.endpoint).observe(e2e)
        if outcome == "ok":
            m.recent.append((time.time(), self.adapter, None if self._first is None else self._first - self.t0, e2e,
                             completion_tokens))
            m.prompt_len.labels(*by).observe(prompt_tokens)
            m.output_len.labels(*by).observe(completion_tokens)
        if prompt_tokens:
            m.prompt_tokens.labels(*by).inc(prompt_tokens)
        if completion_tokens:
            m.generation_tokens.labels(*by).inc(completion_tokens)

    def failed(self, exc: BaseException, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        status, _ = describe(exc)
        outcome = "rejected" if status == 429 else "client_error" if status < 500 else "server_error"
        self.finish(outcome, prompt_tokens, completion_tokens)


class EngineObserver:
    """What the engine reports from its thread: queue wait at admission, each step's time and rows."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def admitted(self, adapter, waited_s: float) -> None:
        self.m.queue_wait.labels(self.m.label(adapter)).observe(waited_s)

    def stepped(self, seconds: float, rows: int) -> None:
        self.m.step_time.observe(seconds)
        self.m.batch_size.observe(rows)
        self.m.recent_steps.append((time.time(), rows))


def labelled(parts: list[tuple[dict[str, str], list]]) -> list:
    """Metric families of several processes as one exposition: each sample gets its process's
    labels, families of one name are merged (a name may be declared only once)."""
    merged: dict[str, object] = {}
    for labels, families in parts:
        for family in families:
            samples = [s._replace(labels={**s.labels, **labels}) for s in family.samples]
            if family.name in merged:
                merged[family.name].samples.extend(samples)
            else:
                out = copy.copy(family)
                out.samples = samples
                merged[family.name] = out
    return list(merged.values())
