"""`hotpeft loadtest`: many concurrent clients against a running server for a bounded time.

    hotpeft loadtest --url http://127.0.0.1:8000 --clients 100 --duration 30 [--api-key KEY] [--model NAME ...]

Each client loops until the time is up: a chat completion, a streamed completion or a model
list, chosen at random, with a few tokens each. A 429 is a valid answer (the client waits its
Retry-After, at most 0.5 s, and goes on); anything 5xx or a broken connection is an error. The
summary (JSON on stdout) counts requests by status, errors and latency percentiles; the exit
status is 1 when there was any 5xx or transport error.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter

import httpx


def add_parser(sub) -> None:
    p = sub.add_parser("loadtest", help="many concurrent clients against a running server; stops by itself",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--clients", type=int, default=100, help="concurrent clients (default 100)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds to run (default 30)")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per completion (default 8)")
    p.add_argument("--model", action="append", default=None,
                   help="model or adapter to call; repeat for several (default: base)")
    p.add_argument("--api-key", default=None, help="bearer key, when the server needs one")
    p.add_argument("--seed", type=int, default=0, help="seed of the clients' choices")


async def _client(i: int, http: httpx.AsyncClient, args, deadline: float, out: dict) -> None:
    rng = random.Random(args.seed * 100003 + i)
    models = args.model or ["base"]
    while time.monotonic() < deadline:
        kind = rng.choices(["chat", "stream", "models"], weights=[5, 4, 1])[0]
        model = rng.choice(models)
        t0 = time.monotonic()
        try:
            if kind == "models":
                r = await http.get("/v1/models")
                status = r.status_code
            elif kind == "chat":
                r = await http.post("/v1/chat/completions", json={
                    "model": model, "max_tokens": args.max_tokens, "temperature": 0.8, "seed": rng.randrange(1 << 30),
                    "messages": [{"role": "user", "content": f"Say something about the number {rng.randrange(1000)}."}]})
                status = r.status_code
            else:
                body = {"model": model, "prompt": f"Count from {rng.randrange(100)}:", "max_tokens": args.max_tokens,
                        "stream": True}
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    status = r.status_code
                    if status == 200:
                        async for line in r.aiter_lines():
                            if line.startswith("data: ") and '"error"' in line:
                                status = 599  # an error reported inside the stream
                            if line == "data: [DONE]":
                                break
                    else:
                        await r.aread()
        except httpx.HTTPError as e:
            out["transport_errors"][type(e).__name__] += 1
            continue
        out["latency"].append(time.monotonic() - t0)
        out["status"][status] += 1
        if status == 429:
            await asyncio.sleep(min(float(r.headers.get("retry-after", "0.5")), 0.5))


async def run(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    out = {"status": Counter(), "transport_errors": Counter(), "latency": []}
    started = time.monotonic()
    deadline = started + args.duration
    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits, timeout=120) as http:
        await asyncio.gather(*(_client(i, http, args, deadline, out) for i in range(args.clients)))
    lat = sorted(out["latency"])
    pct = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1) if lat else None  # noqa: E731
    server_errors = sum(n for s, n in out["status"].items() if s >= 500)
    return {
        "clients": args.clients, "seconds": round(time.monotonic() - started, 1), "requests": len(lat),
        "status": {str(k): v for k, v in sorted(out["status"].items())},
        "server_errors": server_errors, "transport_errors": dict(out["transport_errors"]),
        "latency_ms": {"p50": pct(0.5), "p95": pct(0.95), "max": pct(1.0)},
    }


def main(args) -> int:
    summary = asyncio.run(run(args))
    print(json.dumps(summary))
    return 1 if summary["server_errors"] or summary["transport_errors"] else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    sys.exit(main(parser.parse_args(["loadtest", *sys.argv[1:]])))
