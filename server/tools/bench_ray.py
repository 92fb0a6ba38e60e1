"""`hotpeft bench --ray`: 1 replica vs 2 on Ray Serve, 32 LoRA adapters with Zipf popularity.

    hotpeft bench --ray [--clients 16] [--duration 30] [--max-tokens 32] [--adapters 32] [--zipf 1.1]

For the single-process server (the baseline) and for `hotpeft serve --ray --replicas N`, N = 1
and 2, on the same adapters, it warms
it up for a third of the duration, then drives `--clients` streams that pick adapters by Zipf
popularity, and reports aggregate tok/s, TTFT p50/p95, the requests and cold loads per replica,
the resident hit rate (requests that reached a replica which had already served, and so held,
their adapter) and the affinity hit rate (of the requests for an adapter that some replica
already held, the share routed to a replica that held it; its complement are duplicate loads). Replicas name themselves in each stream (an SSE comment).
"""
from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from hotpeft.model.arch import Architecture
from hotpeft.model.source import DEFAULT_MODEL_ID, resolve_model
from hotpeft.server.tools.localserver import LocalServer
from hotpeft.server.tools.workload import ALL_LINEAR, PROMPTS, machine, write_lora


async def _one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens, replica = None, 0, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if line.startswith(": hotpeft-replica "):
                replica = line.split()[-1]
            elif line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"{model}: {chunk['error']['message']}")
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.perf_counter()
    return {"model": model, "replica": replica, "ttft": (first or time.perf_counter()) - t0, "tokens": tokens}


async def _drive(url: str, models: list[str], weights: list[float], clients: int, duration: float, max_tokens: int,
                 seed: int) -> tuple[list[dict], float]:
    rng = random.Random(seed)
    out: list[dict] = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()

        async def loop(i: int):
            k = 0
            while time.perf_counter() - t0 < duration:
                model = rng.choices(models, weights)[0]
                out.append(await _one(client, model, PROMPTS[(i + k) % len(PROMPTS)], max_tokens))
                k += 1

        await asyncio.gather(*(loop(i) for i in range(clients)))
        return out, time.perf_counter() - t0


def _measure(args, adapters_dir: Path, models: list[str], weights: list[float], replicas: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="hotpeft-bench-ray-") as home:
        home = Path(home)
        models_cache = Path(args.home).expanduser() / "models"
        if models_cache.is_dir():
            (home / "models").symlink_to(models_cache)
        # replicas 0: the single-process server, the baseline without Ray
        server_args = (["--ray", "--replicas", str(replicas)] if replicas else []) + ["--adapters-dir",
                                                                                       str(adapters_dir)]
        if args.model:
            server_args += ["--model", args.model]
        with LocalServer(server_args, home / "server.log", {"HOTPEFT_HOME": str(home)}) as server:
            # Every replica up: /health answers from the ingress before the engine replicas are.
            asyncio.run(_drive(server.url, ["base"], [1.0], max(1, replicas) * 2, 3, 2, seed=1))
            seen: set[tuple[str, str]] = set()
            warm, _ = asyncio.run(_drive(server.url, models, weights, args.clients, args.duration / 3,
                                         args.max_tokens, seed=2))
            seen |= {(r["replica"], r["model"]) for r in warm}
            loads_warmup = Counter(rep for rep, _ in seen)
            timed, wall = asyncio.run(_drive(server.url, models, weights, args.clients, args.duration,
                                             args.max_tokens, seed=3))
    hits, cold, misplaced, known = 0, Counter(), 0, 0
    cluster = {m for _, m in seen}
    for r in timed:
        key = (r["replica"], r["model"])
        if r["model"] in cluster:  # some replica already holds it: did the router find one that does?
            known += 1
            misplaced += key not in seen
        if key in seen:
            hits += 1
        else:
            cold[r["replica"]] += 1
            seen.add(key)
            cluster.add(r["model"])
    ttft = [r["ttft"] for r in timed]
    per_replica = Counter(r["replica"] or "-" for r in timed)
    return {
        "replicas": replicas, "requests": len(timed), "wall_s": round(wall, 1),
        "tok_s": round(sum(r["tokens"] for r in timed) / wall, 1),
        "ttft_p50_ms": round(float(np.percentile(ttft, 50)) * 1000, 1),
        "ttft_p95_ms": round(float(np.percentile(ttft, 95)) * 1000, 1),
        "requests_per_replica": dict(per_replica),
        "cold_loads_warmup_per_replica": {k or "-": v for k, v in loads_warmup.items()},
        "cold_loads_timed_per_replica": {k or "-": v for k, v in cold.items()},
        "resident_hit_rate": round(hits / len(timed), 3) if timed else None,
        # of the requests for an adapter some replica already held, the share routed to such a replica
        "affinity_hit_rate": round(1 - misplaced / known, 3) if known and replicas else None,
        "duplicate_loads": misplaced,
    }


def run(args) -> dict:
    from transformers import AutoConfig

    source = resolve_model(args.model or DEFAULT_MODEL_ID, Path(args.home).expanduser())
    arch = Architecture.from_config(AutoConfig.from_pretrained(source.path))
    with tempfile.TemporaryDirectory(prefix="hotpeft-ray-adapters-") as work:
        adapters_dir = Path(work)
        models = [f"zipf-{i:02d}" for i in range(args.adapters)]
        for i, name in enumerate(models):
            write_lora(adapters_dir / name, arch, source.model_id, rank=8, targets=ALL_LINEAR, seed=300 + i)
        weights = [1.0 / (rank + 1) ** args.zipf_alpha for rank in range(len(models))]
        runs = [_measure(args, adapters_dir, models, weights, n) for n in (0, 1, 2)]
    return {"machine": machine(), "adapters": args.adapters, "zipf": args.zipf_alpha, "clients": args.clients,
            "duration_s": args.duration, "max_tokens": args.max_tokens, "runs": runs}


def table(result: dict) -> str:
    lines = [f"{result['adapters']} LoRA adapters (rank 8, all linear), Zipf s={result['zipf']}, "
             f"{result['clients']} clients, {result['max_tokens']} tokens each, {result['duration_s']:.0f} s timed",
             "| replicas | requests | tok/s | TTFT p50 ms | TTFT p95 ms | requests per replica | cold loads per replica "
             "(warm-up / timed) | resident hit rate | affinity hit rate |",
             "|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    for r in result["runs"]:
        reps = sorted(r["requests_per_replica"])
        per = ", ".join(str(r["requests_per_replica"][k]) for k in reps)
        cold = ", ".join(f"{r['cold_loads_warmup_per_replica'].get(k, 0)} / {r['cold_loads_timed_per_replica'].get(k, 0)}"
                         for k in reps)
        label = r["replicas"] or "no Ray"
        affinity = "—" if r["affinity_hit_rate"] is None else f"{r['affinity_hit_rate']:.1%}"
        lines.append(f"| {label} | {r['requests']} | {r['tok_s']} | {r['ttft_p50_ms']} | {r['ttft_p95_ms']} | "
                     f"{per} | {cold} | {r['resident_hit_rate']:.1%} | {affinity} |")
    return "\n".join(lines)
