"""Two KV-cache figures on the default model, until `hotpeft bench` has these workloads:

    .venv/bin/python scripts/bench_kv.py [--home DIR] [--out kv.json]

(1) a small pool: `--kv-cache-mib 64`, 9 concurrent streams of 300 tokens each (ignore_eos): does
    the server start, do all complete, how many preemptions, KV bytes used per running sequence;
(2) prefix cache: a ~1,000-token system prompt shared by requests to one adapter (the base), each
    with its own question: median time to first token with the prefix cache on (after one request
    has filled it) and off.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import httpx

from hotpeft.server.tools.localserver import LocalServer
from hotpeft.server.tools.traffic import counters

SYSTEM = " ".join(f"Rule {i}: answer politely, cite the order number, and never promise a refund before checking."
                  for i in range(60))


async def stream(client: httpx.AsyncClient, body: dict) -> tuple[float, int]:
    t0 = time.perf_counter()
    first, n = None, 0
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    first = first or time.perf_counter() - t0
                    n += 1
    return first or float("nan"), n


async def small_pool(url: str) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        peak = {"running": 0, "kv_used_tokens": 0}

        async def watch():
            while True:
                e = (await client.get("/dashboard/data")).json()["engine"]
                if e["running"] >= peak["running"]:
                    peak.update(running=e["running"], kv_used_tokens=e["kv_used_tokens"])
                await asyncio.sleep(0.5)

        watcher = asyncio.create_task(watch())
        bodies = [{"model": "base", "max_tokens": 300, "ignore_eos": True,
                   "messages": [{"role": "user", "content": f"Tell story number {i} about a lighthouse."}]}
                  for i in range(9)]
        t0 = time.perf_counter()
        done = await asyncio.gather(*(stream(client, b) for b in bodies))
        wall = time.perf_counter() - t0
        watcher.cancel()
        seen = counters((await client.get("/metrics")).text)
    return {"streams": len(done), "completed_tokens": [n for _, n in done], "wall_s": round(wall, 1),
            "preemptions": seen["preemptions"], "peak_running": peak["running"],
            "kv_tokens_at_peak": peak["kv_used_tokens"], "kv_blocks": seen["kv_blocks"]}


async def prefix(url: str, n: int = 6) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        ttft = []
        for i in range(n + 1):
            body = {"model": "base", "max_tokens": 4, "messages": [
                {"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}: where is my parcel?"}]}
            first, _ = await stream(client, body)
            ttft.append(first)
        seen = counters((await client.get("/metrics")).text)
    return {"ttft_first_ms": round(ttft[0] * 1000, 1), "ttft_median_ms": round(statistics.median(ttft[1:]) * 1000, 1),
            "hit_tokens": seen["prefix_hit_tokens"], "query_tokens": seen["prefix_query_tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, default=Path(os.environ.get("HOTPEFT_HOME", "~/.hotpeft")).expanduser())
    ap.add_argument("--out", type=Path, default=Path("kv.json"))
    args = ap.parse_args()
    env = {"HOTPEFT_HOME": str(args.home)}
    out: dict = {}
    try:
        with LocalServer(["--kv-cache-mib", "64"], args.home / "bench-kv-small.log", env) as s:
            out["small_pool"] = asyncio.run(small_pool(s.url))
    except RuntimeError as e:
        out["small_pool"] = {"error": str(e).splitlines()[0]}
    for flag in ("--prefix-cache", "--no-prefix-cache"):
        with LocalServer([flag], args.home / "bench-kv-prefix.log", env) as s:
            out[flag.strip("-")] = asyncio.run(prefix(s.url))
    print(json.dumps(out, indent=1))
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
