"""The multi-LoRA literature's workloads, so hotpeft's figures can be set beside published ones.

    hotpeft bench --workload [--popularity skewed --zipf-alpha 1.0] [--adapters 100] [--rate 4 --cv 1]
                             [--requests 200] [--prompt-len lognormal:128,0.5] [--output-len uniform:32,128]

- adapter popularity over `--adapters N` (Punica, S-LoRA): `identical` (every request on one
  adapter), `uniform`, `skewed` (Zipf with exponent `--zipf-alpha` over the adapters' ranks),
  `distinct` (request i on adapter i mod N: every request its own adapter when N >= requests);
- arrivals: open loop at `--rate` requests/s, Poisson (`--cv 1`) or Gamma with that coefficient
  of variation (burstier above 1), or closed loop (`--rate 0`: `--clients` streams back to back);
- prompt and output lengths drawn from `fixed:N`, `uniform:LO,HI` or `lognormal:MEDIAN,SIGMA`;
- reported: throughput (prompt + output tok/s, output tok/s), TTFT and inter-token latency p50 /
  p95 / p99, SLO attainment (`--slo-ttft-ms`, `--slo-itl-ms`: share of requests meeting both),
  and from the server's /metrics: peak KV blocks in use, preemptions, prefix-cache hit rate,
  adapter loads into the engine.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

POPULARITY = ("identical", "uniform", "skewed", "distinct")
WORDS = ("river", "stone", "lamp", "garden", "winter", "signal", "harbour", "letter", "engine", "forest", "market",
         "silver", "window", "bridge", "cloud", "story")


@dataclass
class Lengths:
    """`fixed:N`, `uniform:LO,HI` or `lognormal:MEDIAN,SIGMA` (tokens, at least 1)."""
    spec: str

    def __post_init__(self) -> None:
        kind, _, args = self.spec.partition(":")
        try:
            values = [float(a) for a in args.split(",")] if args else []
        except ValueError:
            values = []
        shapes = {"fixed": 1, "uniform": 2, "lognormal": 2}
        if kind not in shapes or len(values) != shapes[kind] or any(v <= 0 for v in values[:1]):
            raise ValueError(f"a length distribution is fixed:N, uniform:LO,HI or lognormal:MEDIAN,SIGMA; got {self.spec!r}")
        self.kind, self.values = kind, values

    def draw(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return max(1, int(self.values[0]))
        if self.kind == "uniform":
            lo, hi = sorted(self.values)
            return max(1, rng.randint(int(lo), int(hi)))
        median, sigma = self.values
        return max(1, int(round(rng.lognormvariate(np.log(median), sigma))))


def pick_adapters(popularity: str, names: list[str], n_requests: int, alpha: float, rng: random.Random) -> list[str]:
    n = len(names)
    if popularity == "identical":
        return [names[0]] * n_requests
    if popularity == "uniform":
        return [names[rng.randrange(n)] for _ in range(n_requests)]
    if popularity == "skewed":
        weights = [1.0 / (rank + 1) ** alpha for rank in range(n)]
        return rng.choices(names, weights=weights, k=n_requests)
    if popularity == "distinct":
        return [names[i % n] for i in range(n_requests)]
    raise ValueError(f"--popularity is one of {', '.join(POPULARITY)}; got {popularity!r}")


def arrival_gaps(rate: float, cv: float, n: int, rng: random.Random) -> list[float]:
    """Seconds between arrivals: Gamma with mean 1/rate and the given coefficient of variation
    (cv 1 is a Poisson process)."""
    shape = 1.0 / (cv * cv)
    return [rng.gammavariate(shape, 1.0 / (rate * shape)) for _ in range(n)]


def prompt_of(tokens: int, rng: random.Random) -> str:
    """About `tokens` tokens of text (one common word is about one token for BPE vocabularies)."""
    return " ".join(rng.choice(WORDS) for _ in range(tokens))


@dataclass
class Result:
    submitted: float
    prompt_tokens: int = 0
    output_tokens: int = 0
    first: float | None = None
    stamps: list[float] = field(default_factory=list)
    error: str | None = None


async def one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    r = Result(time.perf_counter())
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    r.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    r.output_tokens = chunk["usage"]["completion_tokens"]
                elif chunk.get("choices"):
                    now = time.perf_counter()
                    r.first = r.first or now
                    r.stamps.append(now)
    except httpx.HTTPError as e:
        r.error = f"{type(e).__name__}: {e}"
    return r


async def drive(url: str, plan: list[tuple[str, str, int]], rate: float, cv: float, clients: int,
                seed: int) -> tuple[list[Result], float, dict]:
    """Send `plan` ((model, prompt, max_tokens) per request) open loop at `rate` or closed loop with
    `clients` streams; meanwhile sample the engine's KV use. Returns results, wall time, KV peak."""
    rng = random.Random(seed)
    results: list[Result] = []
    peak = {"kv_blocks_used": 0, "running": 0}
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=None)) as client:
        stop = asyncio.Event()

        async def watch():
            while not stop.is_set():
                e = (await client.get("/dashboard/data")).json()["engine"]
                peak["kv_blocks_used"] = max(peak["kv_blocks_used"], e["kv_blocks"] - e["kv_blocks_free"])
                peak["running"] = max(peak["running"], e["running"])
                await asyncio.sleep(0.25)

        watcher = asyncio.create_task(watch())
        t0 = time.perf_counter()
        if rate > 0:
            tasks = []
            for (model, prompt, n), gap in zip(plan, arrival_gaps(rate, cv, len(plan), rng)):
                await asyncio.sleep(gap)
                tasks.append(asyncio.create_task(one(client, model, prompt, n)))
            results = list(await asyncio.gather(*tasks))
        else:
            queue = list(reversed(plan))

            async def loop():
                while queue:
                    results.append(await one(client, *queue.pop()))

            await asyncio.gather(*(loop() for _ in range(clients)))
        wall = time.perf_counter() - t0
        stop.set()
        await watcher
    return results, wall, peak


def report(results: list[Result], wall: float, slo_ttft_ms: float, slo_itl_ms: float) -> dict:
    ok = [r for r in results if r.error is None and r.first is not None]
    ttft = [(r.first - r.submitted) * 1000 for r in ok]
    itl = [(b - a) * 1000 for r in ok for a, b in zip(r.stamps, r.stamps[1:])]
    per_request_itl = [float(np.mean(np.diff(r.stamps))) * 1000 if len(r.stamps) > 1 else 0.0 for r in ok]
    pct = lambda xs, q: round(float(np.percentile(xs, q)), 1) if xs else None  # noqa: E731
    prompt, output = sum(r.prompt_tokens for r in ok), sum(r.output_tokens for r in ok)
    met = sum(1 for t, i in zip(ttft, per_request_itl) if t <= slo_ttft_ms and i <= slo_itl_ms)
    return {
        "requests": len(results), "completed": len(ok), "errors": sorted({r.error for r in results if r.error})[:5],
        "wall_s": round(wall, 2), "prompt_tokens": prompt, "output_tokens": output,
        "total_tok_s": round((prompt + output) / wall, 1), "output_tok_s": round(output / wall, 1),
        "ttft_ms": {"p50": pct(ttft, 50), "p95": pct(ttft, 95), "p99": pct(ttft, 99)},
        "itl_ms": {"p50": pct(itl, 50), "p95": pct(itl, 95), "p99": pct(itl, 99)},
        "slo": {"ttft_ms": slo_ttft_ms, "itl_ms": slo_itl_ms,
                "attainment": round(met / len(results), 3) if results else None},
    }


def counters(metrics_text: str) -> dict:
    """The engine's counters a workload moves, read from /metrics."""
    def value(name: str, label: str = "") -> float:
        for line in metrics_text.splitlines():
            if line.startswith(name + label + " ") or (not label and line.startswith(name + " ")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    return {"preemptions": value("hotpeft_preemptions_total"),
            "prefix_hit_tokens": value("hotpeft_prefix_cache_hit_tokens_total"),
            "prefix_query_tokens": value("hotpeft_prefix_cache_query_tokens_total"),
            "adapter_loads_device": value("hotpeft_adapter_loads_total", '{tier="device"}'),
            "kv_blocks": value("hotpeft_kv_cache_blocks")}
