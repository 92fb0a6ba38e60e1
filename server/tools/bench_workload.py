"""`hotpeft bench --workload`: one of the field's workloads (traffic.py) against a server on 127.0.0.1.

The adapters are rank-`--rank` LoRAs on q_proj and v_proj of the chosen base (S-LoRA's and Punica's
setting); eight weight files are written and registered under `--adapters` names, so every name is
its own version to the engine (its own residency, loads and KV namespace) while the store keeps
eight objects. `--smoke` runs every popularity, open and closed loop, in seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import tempfile
from pathlib import Path

import httpx
from transformers import AutoConfig

from hotpeft.model.arch import Architecture
from hotpeft.model.source import resolve_model
from hotpeft.server.tools import traffic
from hotpeft.server.tools.bench import bench_catalog
from hotpeft.server.tools.localserver import LocalServer
from hotpeft.server.tools.workload import machine, write_lora


def register_adapters(work: Path, source, arch: Architecture, n: int, rank: int) -> list[str]:
    folders = []
    for i in range(min(8, n)):
        folders.append(work / "weights" / f"w{i}")
        write_lora(folders[-1], arch, source.model_id, rank=rank, targets=["q_proj", "v_proj"], seed=i)
    catalog = bench_catalog(work, source, arch)
    try:
        return [catalog.register_dir(f"wl-{i:04d}", folders[i % len(folders)], source="bench").name for i in range(n)]
    finally:
        catalog.close()


def plan(args: argparse.Namespace, names: list[str], popularity: str) -> list[tuple[str, str, int]]:
    rng = random.Random(args.seed)
    prompt_len, output_len = traffic.Lengths(args.prompt_len), traffic.Lengths(args.output_len)
    models = traffic.pick_adapters(popularity, names, args.requests, args.zipf_alpha, rng)
    return [(m, traffic.prompt_of(prompt_len.draw(rng), rng), output_len.draw(rng)) for m in models]


def run(args: argparse.Namespace, popularities: list[str], loops: list[float]) -> dict:
    home = Path(args.home).expanduser()
    source = resolve_model(args.model, home)
    arch = Architecture.from_config(AutoConfig.from_pretrained(source.path))
    work = Path(tempfile.mkdtemp(prefix="hotpeft-workload-"))
    names = register_adapters(work, source, arch, args.adapters, args.rank)
    serve_args = ["--model", args.model, "--quantize", args.quantize, "--dtype", args.dtype, "--device", args.device,
                  "--max-num-seqs", str(args.max_num_seqs), "--compile", args.compile, "--log-level", "warning",
                  "--registry-url", f"sqlite:///{work / 'registry.db'}", "--store-dir", str(work / "store")]
    if args.kv_cache_mib:
        serve_args += ["--kv-cache-mib", str(args.kv_cache_mib)]
    result: dict = {"machine": machine(), "settings": {
        k: getattr(args, k) for k in ("model", "quantize", "dtype", "adapters", "rank", "requests", "rate", "cv",
                                      "clients", "zipf_alpha", "prompt_len", "output_len", "slo_ttft_ms",
                                      "slo_itl_ms", "kv_cache_mib", "max_num_seqs", "compile", "seed")}, "runs": []}
    print(f"starting the server ({source.model_id}, {len(names)} adapters) ...", flush=True)
    with LocalServer(serve_args, work / "server.log", env={"HOTPEFT_HOME": str(home)}, start_timeout=900) as server:
        for popularity in popularities:
            for rate in loops:
                loop = f"open loop, {rate} req/s, cv {args.cv}" if rate > 0 else f"closed loop, {args.clients} clients"
                print(f"{popularity}, {loop} ...", flush=True)
                before = traffic.counters(httpx.get(server.url + "/metrics", timeout=60).text)
                results, wall, peak = asyncio.run(traffic.drive(server.url, plan(args, names, popularity), rate,
                                                                args.cv, args.clients, args.seed))
                after = traffic.counters(httpx.get(server.url + "/metrics", timeout=60).text)
                moved = {k: after[k] - before[k] for k in after if k != "kv_blocks"}
                hit = moved["prefix_hit_tokens"] / moved["prefix_query_tokens"] if moved["prefix_query_tokens"] else 0.0
                result["runs"].append({"popularity": popularity, "rate": rate, **traffic.report(
                    results, wall, args.slo_ttft_ms, args.slo_itl_ms), "kv": {
                    "blocks": after["kv_blocks"], "peak_blocks_used": peak["kv_blocks_used"],
                    "peak_running": peak["running"], "preemptions": moved["preemptions"],
                    "prefix_hit_rate": round(hit, 3)}, "adapter_loads": moved["adapter_loads_device"]})
    shutil.rmtree(work, ignore_errors=True)
    return result


def table(result: dict) -> str:
    rows = ["| popularity | arrivals | done | tok/s (all / out) | TTFT p50/p95/p99 ms | ITL p50/p95/p99 ms | SLO | "
            "KV peak blocks | preempt | prefix hit | loads |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        t, i, kv = r["ttft_ms"], r["itl_ms"], r["kv"]
        arrivals = f"{r['rate']} req/s" if r["rate"] > 0 else "closed"
        rows.append(f"| {r['popularity']} | {arrivals} | {r['completed']}/{r['requests']} | {r['total_tok_s']} / "
                    f"{r['output_tok_s']} | {t['p50']}/{t['p95']}/{t['p99']} | {i['p50']}/{i['p95']}/{i['p99']} | "
                    f"{r['slo']['attainment']} | {kv['peak_blocks_used']}/{kv['blocks']:.0f} | {kv['preemptions']:.0f} "
                    f"| {kv['prefix_hit_rate']} | {r['adapter_loads']:.0f} |")
    return "\n".join(rows)
