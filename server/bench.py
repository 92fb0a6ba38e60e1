"""`hotpeft bench`: the engine against what people write today, in one reproducible run.

    hotpeft bench [--model ID|DIR] [--quantize auto] [--clients 16] [--duration 30] [--out bench.json]
    hotpeft bench --smoke          # seconds, for the test suite: every scenario, figures not meaningful

It writes synthetic adapters for the chosen base (8 LoRA of ranks 8 and 16 on attention or on
attention + MLP, 2 soft prompts, 3 "cold" rank-16 LoRA), starts `hotpeft serve` on 127.0.0.1,
drives it with concurrent streaming clients for a bounded time per scenario, stops it, then
runs the naive baseline in this process, and prints a table and writes JSON:

(a) naive: transformers `generate` + PEFT `set_adapter`, requests served one after another
(b) engine, base only, N concurrent streams
(c) engine, N streams over the 8 LoRA and 2 soft-prompt adapters
(d) engine, N streams all on one rank-16 LoRA
(e) batch-1 decode rate against the memory-bandwidth roofline (read bandwidth / resident bytes)
(f) cold adapter: TTFT of the first request to an adapter not yet resident, minus a resident one's
(g) pick-up: this process registers a new version in the server's registry (as `hotpeft train` or
    another server does); time until the server answers a request naming that version
(h) GET /metrics: render time with 200 more adapters registered, each with traffic
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

from hotpeft.server.localserver import LocalServer

PROMPTS = [
    "The history of the printing press begins",
    "Write a short note to a neighbour about a lost cat.",
    "In a distant valley there was a village where",
    "Explain why the sky is blue in simple words:",
    "Three tips for learning a new language are",
    "The recipe for a simple tomato soup is",
    "Once upon a time a small robot",
    "A good way to start the morning is",
]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = ATTN + ["gate_proj", "up_proj", "down_proj"]
TARGETS = {"(c)/(b)": 0.90, "(c)/(a)": 8.0, "(e) of roofline": 0.60, "(d)/(b)": 0.95, "(f) ms": 30.0,
           "(g) max ms": 2000.0, "(h) p50 ms": 100.0}


# ---- adapters ----------------------------------------------------------------------------------
def _linear_shapes(config) -> dict[str, tuple[int, int]]:
    h, i = config.hidden_size, config.intermediate_size
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def write_lora(folder: Path, config, model_id: str, rank: int, targets: list[str], seed: int) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    shapes = _linear_shapes(config)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for t in targets:
            out_f, in_f = shapes[t]
            part = "self_attn" if t in ATTN else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{t}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": targets, "bias": "none", "base_model_name_or_path": model_id,
    }))


def write_soft_prompt(folder: Path, config, model_id: str, n_virtual: int, seed: int) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"prompt_embeddings": torch.randn(n_virtual, config.hidden_size, generator=g) * 0.02},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": n_virtual,
        "token_dim": config.hidden_size, "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM",
        "base_model_name_or_path": model_id,
    }))


def write_bench_adapters(folder: Path, config, model_id: str, n_cold: int) -> dict[str, list[str]]:
    mix = []
    for i in range(8):  # ranks 8 and 16 x attention / attention + MLP
        write_lora(folder / f"lora-{i}", config, model_id, rank=(8, 16)[i % 2], targets=(ATTN, ALL_LINEAR)[i // 2 % 2],
                   seed=i)
        mix.append(f"lora-{i}")
    for i in range(2):
        write_soft_prompt(folder / f"soft-{i}", config, model_id, n_virtual=20, seed=100 + i)
        mix.append(f"soft-{i}")
    cold = []
    for i in range(n_cold):
        write_lora(folder / f"cold-{i}", config, model_id, rank=16, targets=ALL_LINEAR, seed=200 + i)
        cold.append(f"cold-{i}")
    return {"mix": mix, "single": ["lora-1"], "cold": cold}  # lora-1: rank 16 on attention + MLP


# ---- measurement -------------------------------------------------------------------------------
@dataclass
class Sample:
    submitted: float
    first: float | None = None
    chunks: list[float] = field(default_factory=list)
    tokens: int = 0


def summarize(samples: list[Sample], wall: float) -> dict:
    done = [s for s in samples if s.first is not None]
    ttft = [s.first - s.submitted for s in done]
    itl = [b - a for s in done for a, b in zip(s.chunks, s.chunks[1:])]
    pct = lambda xs, q: float(np.percentile(xs, q) * 1000) if xs else None  # noqa: E731
    tokens = sum(s.tokens for s in done)
    return {"requests": len(done), "output_tokens": tokens, "wall_s": round(wall, 2),
            "tok_s": round(tokens / wall, 1) if wall > 0 else None,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p95_ms": pct(ttft, 95),
            "itl_p50_ms": pct(itl, 50), "itl_p95_ms": pct(itl, 95)}


async def _stream_one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> Sample:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    s = Sample(time.perf_counter())
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{model}: {chunk['error']['message']}")
            if chunk.get("usage"):
                s.tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                now = time.perf_counter()
                s.first = s.first or now
                s.chunks.append(now)
    return s


async def drive(url: str, models: list[str], duration: float, max_tokens: int) -> dict:
    samples, wall = await drive_samples(url, models, duration, max_tokens)
    return summarize(samples, wall)


async def drive_samples(url: str, models: list[str], duration: float, max_tokens: int) -> tuple[list[Sample], float]:
    """One client per entry of `models`, each sending requests back to back until `duration` has passed."""
    samples: list[Sample] = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()

        async def client_loop(i: int, model: str):
            k = 0
            while time.perf_counter() - t0 < duration:
                samples.append(await _stream_one(client, model, PROMPTS[(i + k) % len(PROMPTS)], max_tokens))
                k += 1

        await asyncio.gather(*(client_loop(i, m) for i, m in enumerate(models)))
        wall = time.perf_counter() - t0
    return samples, wall


def single_stream_decode(url: str, duration: float, max_tokens: int) -> dict:
    """(e): one stream on the base; decode rate from the first to the last token of each request."""
    out = asyncio.run(drive(url, ["base"], duration, max_tokens))
    rate = 1000.0 / out["itl_p50_ms"] if out["itl_p50_ms"] else None
    return out | {"decode_tok_s": round(rate, 1) if rate else None}


def cold_adapter(url: str, cold: list[str], warm: str) -> dict:
    async def ttft(model: str) -> float:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            s = await _stream_one(client, model, PROMPTS[0], 2)
        return (s.first - s.submitted) * 1000

    warm_ms = sorted(asyncio.run(ttft(warm)) for _ in range(5))[2]
    cold_ms = [asyncio.run(ttft(c)) for c in cold]
    return {"warm_ttft_ms": round(warm_ms, 1), "cold_ttft_ms": [round(c, 1) for c in cold_ms],
            "cold_minus_warm_ms": round(float(np.median(cold_ms)) - warm_ms, 1)}


def _catalog(work: Path, source, config):
    """The bench server's catalogue, opened from this process (as a training job opens it)."""
    from transformers import AutoModelForCausalLM

    from hotpeft.adapters import AdapterCatalog, AdapterRegistry, AdapterStore, BaseSpec
    from hotpeft.server import basemodel

    with torch.device("meta"):  # module names and shapes only, no weights
        skeleton = AutoModelForCausalLM.from_config(config)
    spec = BaseSpec(source.model_id, int(config.hidden_size), basemodel.linear_shapes(skeleton))
    return AdapterCatalog(AdapterRegistry(f"sqlite:///{work / 'registry.db'}"), AdapterStore(work / "store"), spec,
                          basemodel.fingerprint(source.path, source.model_id), max_lora_rank=1024)


def metrics_render(url: str, work: Path, source, config, n_adapters: int) -> dict:
    """(h): `n_adapters` more adapters registered, each with traffic (so each has its metric series, up
    to --metrics-max-adapters), then the time to render GET /metrics."""
    catalog = _catalog(work, source, config)
    folder = work / "many"
    write_lora(folder, config, source.model_id, rank=4, targets=["q_proj"], seed=7)
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


def pickup(url: str, work: Path, source, config, n: int) -> dict:
    """(g): register `n` versions from this process into the server's registry and store (the way a
    training job does), and time from each registration's commit to the server's first answer with it."""
    catalog = _catalog(work, source, config)
    folder = work / "pickup"
    write_lora(folder, config, source.model_id, rank=8, targets=ATTN, seed=99)
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


# ---- the naive baseline --------------------------------------------------------------------------
class _Timestamps:
    """A transformers streamer that only notes when each new token arrives."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # generate() hands the prompt over first
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def naive(source, quantization, device, dtype, adapters_dir: Path, models: list[str], duration: float,
          max_tokens: int) -> dict:
    """N clients, each sending its next request when the previous one ends; one `generate` at a time."""
    from peft import PeftModel

    from hotpeft.server.basemodel import load_base

    loras = [m for m in dict.fromkeys(models) if m.startswith("lora")]
    softs = [m for m in dict.fromkeys(models) if m.startswith("soft")]
    base = load_base(source, quantization, device=device, dtype=dtype)
    tok = base.tokenizer
    peft_models = {}
    if loras:
        lm = PeftModel.from_pretrained(base.model, adapters_dir / loras[0], adapter_name=loras[0])
        for name in loras[1:]:
            lm.load_adapter(adapters_dir / name, adapter_name=name)
        peft_models.update({name: lm for name in loras})
    if softs:  # PEFT keeps prompt tuning and LoRA in separate models
        sm = PeftModel.from_pretrained(load_base(source, quantization, device=device, dtype=dtype).model,
                                       adapters_dir / softs[0], adapter_name=softs[0])
        for name in softs[1:]:
            sm.load_adapter(adapters_dir / name, adapter_name=name)
        peft_models.update({name: sm for name in softs})
    samples: list[Sample] = []
    t0 = time.perf_counter()
    ready = [t0] * len(models)  # when each client sent its current request
    k = 0
    while time.perf_counter() - t0 < duration:
        i = k % len(models)  # FIFO of back-to-back clients = round robin
        name = models[i]
        model = peft_models.get(name, base.model)
        if name in peft_models:
            model.set_adapter(name)
        ids = tok(PROMPTS[(i + k // len(models)) % len(PROMPTS)], return_tensors="pt")["input_ids"].to(device)
        stamps = _Timestamps()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                           min_new_tokens=max_tokens, do_sample=False, streamer=stamps, pad_token_id=tok.eos_token_id)
        s = Sample(ready[i], stamps.times[0] if stamps.times else None, stamps.times, len(stamps.times))
        samples.append(s)
        ready[i] = time.perf_counter()
        k += 1
    return summarize(samples, time.perf_counter() - t0)


# ---- the run -------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoConfig

    from hotpeft.server import basemodel
    from hotpeft.server.runtime import pick_dtype

    home = Path(args.home).expanduser()
    source = basemodel.resolve_model(args.model, home)
    config = AutoConfig.from_pretrained(source.path)
    device = basemodel.default_device() if args.device == "auto" else torch.device(args.device)
    dtype = pick_dtype(args.dtype, device)
    quantization = None if args.quantize == "auto" else args.quantize
    work = Path(tempfile.mkdtemp(prefix="hotpeft-bench-"))
    sets = write_bench_adapters(work / "adapters", config, source.model_id, n_cold=args.cold)
    n = args.clients
    mix = [sets["mix"][i % len(sets["mix"])] for i in range(n)]
    result: dict = {"machine": machine(), "settings": {
        "model": source.model_id, "quantize": args.quantize, "dtype": str(dtype).removeprefix("torch."),
        "device": str(device), "clients": n, "duration_s": args.duration, "rounds": args.rounds,
        "max_tokens": args.max_tokens,
    }, "scenarios": {}}
    sc = result["scenarios"]
    serve_args = ["--model", args.model, "--quantize", args.quantize, "--dtype", args.dtype, "--device", args.device,
                  "--adapters-dir", str(work / "adapters"), "--max-num-seqs", str(max(n, 1)), "--log-level", "warning",
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
        sc["g"] = pickup(server.url, work, source, config, args.pickups)
        print(f"(h) /metrics with {args.metrics_adapters} more adapters ...", flush=True)
        sc["h"] = metrics_render(server.url, work, source, config, args.metrics_adapters)
        print("(e) batch-1 decode ...", flush=True)
        sc["e"] = single_stream_decode(server.url, args.duration / 2, args.max_tokens)
        bw = read_bandwidth(device)
        roofline = bw / card["resident_bytes"]
        sc["e"] |= {"read_bandwidth_gb_s": round(bw / 1e9, 1), "roofline_tok_s": round(roofline, 1),
                    "of_roofline": round(sc["e"]["decode_tok_s"] / roofline, 3) if sc["e"]["decode_tok_s"] else None}
        # (b), (c), (d) in interleaved rounds: a machine whose speed drifts affects all three alike.
        runs = {"b": ["base"] * n, "c": mix, "d": sets["single"] * n}
        got = {k: ([], 0.0) for k in runs}
        for r in range(args.rounds):
            for key, models in runs.items():
                print(f"({key}) round {r + 1}/{args.rounds}: {n} streams on {len(set(models))} model(s) ...", flush=True)
                samples, wall = asyncio.run(drive_samples(server.url, models, args.duration / args.rounds,
                                                          args.max_tokens))
                got[key] = (got[key][0] + samples, got[key][1] + wall)
        for key, (samples, wall) in got.items():
            sc[key] = summarize(samples, wall)
    finally:
        server.stop()
    print("(a) naive generate + PEFT set_adapter, one request after another ...", flush=True)
    sc["a"] = naive(source, quantization, device, dtype, work / "adapters", mix, args.duration, args.max_tokens)
    ratio = lambda x, y: round(x / y, 3) if x and y else None  # noqa: E731
    result["results"] = {
        "(c)/(b)": ratio(sc["c"]["tok_s"], sc["b"]["tok_s"]),
        "(c)/(a)": ratio(sc["c"]["tok_s"], sc["a"]["tok_s"]),
        "(e) of roofline": sc["e"]["of_roofline"],
        "(d)/(b)": ratio(sc["d"]["tok_s"], sc["b"]["tok_s"]),
        "(f) ms": sc["f"]["cold_minus_warm_ms"],
        "(g) max ms": sc["g"]["max_ms"],
        "(h) p50 ms": sc["h"]["p50_ms"],
    }
    result["targets"] = TARGETS
    shutil.rmtree(work, ignore_errors=True)  # kept only when a run fails, for its server log
    return result


def table(result: dict) -> str:
    sc = result["scenarios"]
    rows = ["| scenario | tok/s | TTFT p50 / p95 ms | ITL p50 / p95 ms | requests |", "|---|---:|---:|---:|---:|"]
    names = {"a": "(a) naive generate + PEFT, serial", "b": "(b) engine, base", "c": "(c) engine, 8 LoRA + 2 soft",
             "d": "(d) engine, one LoRA", "e": "(e) engine, one stream"}
    f = lambda v: "-" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.1f}"  # noqa: E731
    for key, label in names.items():
        m = sc[key]
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


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the engine against naive generate + PEFT (see BENCHMARKS.md)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base model (default: the embedded default)")
    p.add_argument("--quantize", default="auto", choices=["auto", "none", "int8", "nf4"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--home", default=os.environ.get("HOTPEFT_HOME", "~/.hotpeft"), help="hotpeft home (model cache)")
    p.add_argument("--clients", type=int, default=16, help="concurrent streams in (b), (c), (d) and (a)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per scenario ((e) gets half)")
    p.add_argument("--rounds", type=int, default=3, help="(b), (c), (d) run interleaved in this many rounds")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (EOS ignored)")
    p.add_argument("--cold", type=int, default=3, help="cold adapters measured in (f)")
    p.add_argument("--pickups", type=int, default=10, help="versions registered from outside in (g)")
    p.add_argument("--metrics-adapters", type=int, default=200, help="adapters registered for (h)")
    p.add_argument("--out", default="bench.json", help="where to write the JSON")
    p.add_argument("--smoke", action="store_true", help="a few seconds in all: checks that every scenario runs")
    p.add_argument("--ray", action="store_true", help="instead: 1 vs 2 Ray Serve replicas on Zipf-popular adapters "
                                                      "(server/bench_ray.py; pip install hotpeft[ray])")
    p.add_argument("--adapters", type=int, default=32, help="--ray: adapters in the workload")
    p.add_argument("--zipf", type=float, default=1.1, help="--ray: Zipf exponent of adapter popularity")


def main(args: argparse.Namespace) -> int:
    from hotpeft.server.basemodel import DEFAULT_MODEL_ID

    if args.ray:
        from hotpeft.server import bench_ray

        result = bench_ray.run(args)
        print(bench_ray.table(result))
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
        return 0
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
    text = table(result)
    print(text)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0
