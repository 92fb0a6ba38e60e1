"""`hotpeft bench`: scenarios (a)-(h) against a server started on 127.0.0.1; what each measures is
`hotpeft bench --help` (hotpeft/cli/tools.py), the figures are in BENCHMARKS.md."""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from hotpeft.adapters import AdapterCatalog, AdapterRegistry, AdapterStore, BaseSpec
from hotpeft.model.arch import Architecture
from hotpeft.model.fingerprint import fingerprint
from hotpeft.model.load import default_device, pick_dtype
from hotpeft.model.source import DEFAULT_MODEL_ID, resolve_model
from hotpeft.model.synthetic import is_synthetic
from hotpeft.server.tools.bench_naive import naive
from hotpeft.server.tools.localserver import LocalServer
from hotpeft.server.tools.workload import (
    ATTN, PROMPTS, drive, drive_samples, machine, stream_one, summarize, write_bench_adapters, write_lora,
)

TARGETS = {"(c)/(b)": 0.90, "(c)/(a)": 8.0, "(e) of roofline": 0.60, "(d)/(b)": 0.95, "(f) ms": 30.0,
           "(g) max ms": 2000.0, "(h) p50 ms": 100.0, "(i)/(b)": 0.85, "(j)/(b)": 0.95}
# (i): half the streams constrained to this schema, which cannot close within 64 tokens (at least 64
# strings), so constrained and free rows run to the same length and only the masks' cost differs;
# (j): every stream asks for the top 5 logprobs of each token.
NOTES_SCHEMA = {"type": "object", "properties": {"notes": {"type": "array", "items": {"type": "string"},
                                                            "minItems": 64}}, "required": ["notes"]}


# ---- scenarios (e)-(h) ---------------------------------------------------------------------------
def single_stream_decode(url: str, duration: float, max_tokens: int) -> dict:
    """(e): one stream on the base; decode rate from the first to the last token of each request."""
    out = asyncio.run(drive(url, ["base"], duration, max_tokens))
    rate = 1000.0 / out["itl_p50_ms"] if out["itl_p50_ms"] else None
    return out | {"decode_tok_s": round(rate, 1) if rate else None}


def cold_adapter(url: str, cold: list[str], warm: str) -> dict:
    async def ttft(model: str) -> float:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            s = await stream_one(client, model, PROMPTS[0], 2)
        return (s.first - s.submitted) * 1000

    warm_ms = sorted(asyncio.run(ttft(warm)) for _ in range(5))[2]
    cold_ms = [asyncio.run(ttft(c)) for c in cold]
    return {"warm_ttft_ms": round(warm_ms, 1), "cold_ttft_ms": [round(c, 1) for c in cold_ms],
            "cold_minus_warm_ms": round(float(np.median(cold_ms)) - warm_ms, 1)}


def bench_catalog(work: Path, source, arch: Architecture):
    """The bench server's catalogue, opened from this process (as a training job opens it)."""
    return AdapterCatalog(AdapterRegistry(f"sqlite:///{work / 'registry.db'}"), AdapterStore(work / "store"),
                          BaseSpec.of(source.model_id, arch), fingerprint(source.path, source.model_id),
                          max_lora_rank=1024)


def metrics_render(url: str, work: Path, source, arch: Architecture, n_adapters: int) -> dict:
    """(h): `n_adapters` more adapters registered, each with traffic (so each has its metric series, up
    to --metrics-max-adapters), then the time to render GET /metrics."""
    catalog = bench_catalog(work, source, arch)
    folder = work / "many"
    write_lora(folder, arch, source.model_id, rank=4, targets=["q_proj"], seed=7)
    try:
        names = [catalog.register_dir(f"many-{i:03d}", folder, source="bench").name for i in range(n_adapters)]
    finally:
        catalog.close()
    with httpx.Client(base_url=url, timeout=120) as c:
        for name in names:
            while c.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 1}).status_code == 404:
                time.sleep(0.05)  # until the server's registry poll has seen it
        times, size = [], 0
        for _ in range(20):
            t0 = time.perf_counter()
            r = c.get("/metrics")
            times.append((time.perf_counter() - t0) * 1000)
            size = len(r.content)
    return {"adapters": n_adapters, "bytes": size, "series": r.text.count("\n"),
            "p50_ms": round(float(np.median(times)), 1), "max_ms": round(max(times), 1)}


def pickup(url: str, work: Path, source, arch: Architecture, n: int) -> dict:
    """(g): register `n` versions from this process into the server's registry and store (the way a
    training job does), and time from each registration's commit to the server's first answer with it."""
    catalog = bench_catalog(work, source, arch)
    folder = work / "pickup"
    write_lora(folder, arch, source.model_id, rank=8, targets=ATTN, seed=99)
    delays = []
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            for _ in range(n):
                record = catalog.register_dir("pickup", folder, source="bench")
                t0 = time.perf_counter()
                while c.post("/v1/completions", json={"model": record.key, "prompt": "hi", "max_tokens": 1}
                             ).status_code != 200:
                    if time.perf_counter() - t0 > 60:
                        raise RuntimeError(f"the server did not serve {record.key} within 60 s of its registration")
                    time.sleep(0.01)
                delays.append((time.perf_counter() - t0) * 1000)
    finally:
        catalog.close()
    return {"registrations": n, "served_after_ms": [round(d, 1) for d in delays],
            "p50_ms": round(float(np.median(delays)), 1), "max_ms": round(max(delays), 1)}


def read_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large read (a sum over 512 MiB; on CUDA 2 GiB), best of several."""
    n = (2 << 30 if device.type == "cuda" else 512 << 20) // 4
    x = torch.ones(n, dtype=torch.float32, device=device)
    best = 0.0
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        x.sum()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, n * 4 / (time.perf_counter() - t))
    del x
    return best


def interleaved(url: str, runs: dict[str, list[str]], args: argparse.Namespace) -> dict:
    """(b), (c), (d), (i), (j) in interleaved rounds: a machine whose speed drifts affects all alike."""
    n = args.clients
    extras = {"i": [{"structured_outputs": {"json": NOTES_SCHEMA}} if k % 2 else None for k in range(n)],
              "j": [{"logprobs": 5}] * n}
    got = {k: ([], 0.0) for k in runs}
    for r in range(args.rounds):
        for key, models in runs.items():
            print(f"({key}) round {r + 1}/{args.rounds}: {n} streams on {len(set(models))} model(s) ...", flush=True)
            samples, wall = asyncio.run(drive_samples(url, models, args.duration / args.rounds, args.max_tokens,
                                                      extras.get(key)))
            got[key] = (got[key][0] + samples, got[key][1] + wall)
    return {key: summarize(samples, wall) for key, (samples, wall) in got.items()}


# ---- the run -------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    from transformers import AutoConfig

    home = Path(args.home).expanduser()
    source = resolve_model(args.model, home)
    arch = Architecture.from_config(AutoConfig.from_pretrained(source.path))
    device = default_device() if args.device == "auto" else torch.device(args.device)
    dtype = pick_dtype(args.dtype, device)
    quantization = None if args.quantize == "auto" else args.quantize
    work = Path(tempfile.mkdtemp(prefix="hotpeft-bench-"))
    sets = write_bench_adapters(work / "adapters", arch, source.model_id, n_cold=args.cold)
    n = args.clients
    mix = [sets["mix"][i % len(sets["mix"])] for i in range(n)]
    result: dict = {"machine": machine(), "settings": {
        "model": source.model_id, "quantize": args.quantize, "dtype": str(dtype).removeprefix("torch."),
        "device": str(device), "clients": n, "duration_s": args.duration, "rounds": args.rounds,
        "max_tokens": args.max_tokens, "compile": args.compile,
    }, "scenarios": {}}
    sc = result["scenarios"]
    serve_args = ["--model", args.model, "--quantize", args.quantize, "--dtype", args.dtype, "--device", args.device,
                  "--compile", args.compile, "--adapters-dir", str(work / "adapters"), "--max-num-seqs", str(max(n, 1)), "--log-level", "warning",
                  # its own registry and store: the bench's synthetic adapters never enter the user's catalogue
                  "--registry-url", f"sqlite:///{work / 'registry.db'}", "--store-dir", str(work / "store")]
    print(f"starting the server ({source.model_id}, quantize={args.quantize}) ...", flush=True)
    server = LocalServer(serve_args, work / "server.log", env={"HOTPEFT_HOME": str(home)}, start_timeout=600)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            card = c.get("/v1/models/base").json()
            for name in sets["mix"]:  # make every adapter of the mix resident; the cold ones stay untouched
                c.post("/v1/completions", json={"model": name, "prompt": "warm up", "max_tokens": 2}).raise_for_status()
            for name in sets["cold"]:  # registration leaves them in the CPU tier: (f) starts from disk
                c.post(f"/v1/adapters/{name}/unload").raise_for_status()
        result["settings"]["resident_bytes"] = card["resident_bytes"]
        result["settings"]["precision"] = card["precision"]
        print("(f) cold adapter ...", flush=True)
        sc["f"] = cold_adapter(server.url, sets["cold"], sets["single"][0])
        print("(g) pick-up of versions registered by another process ...", flush=True)
        sc["g"] = pickup(server.url, work, source, arch, args.pickups)
        print(f"(h) /metrics with {args.metrics_adapters} more adapters ...", flush=True)
        sc["h"] = metrics_render(server.url, work, source, arch, args.metrics_adapters)
        print("(e) batch-1 decode ...", flush=True)
        sc["e"] = single_stream_decode(server.url, args.duration / 2, args.max_tokens)
        bw = read_bandwidth(device)
        roofline = bw / card["resident_bytes"]
        sc["e"] |= {"read_bandwidth_gb_s": round(bw / 1e9, 1), "roofline_tok_s": round(roofline, 1),
                    "of_roofline": round(sc["e"]["decode_tok_s"] / roofline, 3) if sc["e"]["decode_tok_s"] else None}
        runs = {"b": ["base"] * n, "c": mix, "d": sets["single"] * n, "i": ["base"] * n, "j": ["base"] * n}
        sc |= interleaved(server.url, runs, args)
    finally:
        server.stop()
    if is_synthetic(source.model_id):  # (a) reads weights with transformers; a synthetic base has none on disk
        sc["a"] = None
    else:
        print("(a) naive generate + PEFT set_adapter, one request after another ...", flush=True)
        sc["a"] = naive(source, quantization, device, dtype, work / "adapters", mix, args.duration, args.max_tokens)
    ratio = lambda x, y: round(x / y, 3) if x and y else None  # noqa: E731
    result["results"] = {
        "(c)/(b)": ratio(sc["c"]["tok_s"], sc["b"]["tok_s"]),
        "(c)/(a)": ratio(sc["c"]["tok_s"], sc["a"]["tok_s"]) if sc["a"] else None,
        "(e) of roofline": sc["e"]["of_roofline"],
        "(d)/(b)": ratio(sc["d"]["tok_s"], sc["b"]["tok_s"]),
        "(f) ms": sc["f"]["cold_minus_warm_ms"],
        "(g) max ms": sc["g"]["max_ms"],
        "(h) p50 ms": sc["h"]["p50_ms"],
        "(i)/(b)": ratio(sc["i"]["tok_s"], sc["b"]["tok_s"]),
        "(j)/(b)": ratio(sc["j"]["tok_s"], sc["b"]["tok_s"]),
    }
    result["targets"] = TARGETS
    shutil.rmtree(work, ignore_errors=True)  # kept only when a run fails, for its server log
    return result


def table(result: dict) -> str:
    sc = result["scenarios"]
    rows = ["| scenario | tok/s | TTFT p50 / p95 ms | ITL p50 / p95 ms | requests |", "|---|---:|---:|---:|---:|"]
    names = {"a": "(a) naive generate + PEFT, serial", "b": "(b) engine, base", "c": "(c) engine, 8 LoRA + 2 soft",
             "d": "(d) engine, one LoRA", "i": "(i) engine, base, half JSON-schema constrained",
             "j": "(j) engine, base, top-5 logprobs", "e": "(e) engine, one stream"}
    f = lambda v: "-" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.1f}"  # noqa: E731
    for key, label in names.items():
        m = sc[key]
        if m is None:
            rows.append(f"| {label} | not run (synthetic base) | | | |")
            continue
        rows.append(f"| {label} | {f(m['tok_s'])} | {f(m['ttft_p50_ms'])} / {f(m['ttft_p95_ms'])} | "
                    f"{f(m['itl_p50_ms'])} / {f(m['itl_p95_ms'])} | {m['requests']} |")
    e, cold = sc["e"], sc["f"]
    rows.append("")
    rows.append(f"(e) batch-1 decode {e['decode_tok_s']} tok/s; read bandwidth {e['read_bandwidth_gb_s']} GB/s / "
                f"{result['settings']['resident_bytes'] / 2**20:.0f} MiB resident = roofline {e['roofline_tok_s']} tok/s")
    rows.append(f"(f) cold adapter TTFT {cold['cold_ttft_ms']} ms vs resident {cold['warm_ttft_ms']} ms")
    rows.append(f"(g) served {sc['g']['served_after_ms']} ms after another process registered it "
                f"(median {sc['g']['p50_ms']} ms)")
    h = sc["h"]
    rows.append(f"(h) GET /metrics with {h['adapters']} more adapters: {h['bytes']} bytes, p50 {h['p50_ms']} ms, "
                f"max {h['max_ms']} ms")
    rows.append("")
    rows.append("| ratio | measured | target |")
    rows.append("|---|---:|---:|")
    for k, v in result["results"].items():
        t = result["targets"][k]
        lower = k.endswith(" ms")  # times: lower is better
        ok = v is not None and (v <= t if lower else v >= t)
        rows.append(f"| {k} | {v} | {'<=' if lower else '>='} {t} {'met' if ok else 'NOT met'} |")
    return "\n".join(rows)


def run_and_report(args: argparse.Namespace) -> int:
    args.model = args.model or DEFAULT_MODEL_ID
    if args.smoke:
        args.clients, args.duration, args.max_tokens, args.cold, args.rounds = min(args.clients, 4), 2.0, 8, 1, 1
        args.pickups, args.metrics_adapters = 2, 3
    if args.clients < 1 or args.duration <= 0 or args.max_tokens < 2 or args.rounds < 1 or args.pickups < 1:
        print("hotpeft bench: --clients >= 1, --duration > 0, --max-tokens >= 2, --rounds >= 1 and --pickups >= 1 "
              "are required",
              file=sys.stderr)
        return 2
    result = run(args)
    print(table(result))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0
