"""What the benchmarks serve and send: synthetic adapters for any base, streaming clients that
drive a server for a bounded time, and the summary of what they saw."""
from __future__ import annotations

import asyncio
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

from hotpeft.model.arch import ATTENTION, PROJECTIONS, Architecture

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
ATTN = list(ATTENTION)
ALL_LINEAR = list(PROJECTIONS)


# ---- adapters ----------------------------------------------------------------------------------
def write_lora(folder: Path, arch: Architecture, model_id: str, rank: int, targets: list[str], seed: int) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(arch.num_layers):
        for t in targets:
            out_f, in_f = arch.projection_shape(t)
            prefix = f"base_model.model.{arch.module_name(layer, t)}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": targets, "bias": "none", "base_model_name_or_path": model_id,
    }))


def write_soft_prompt(folder: Path, arch: Architecture, model_id: str, n_virtual: int, seed: int) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"prompt_embeddings": torch.randn(n_virtual, arch.hidden_size, generator=g) * 0.02},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": n_virtual,
        "token_dim": arch.hidden_size, "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM",
        "base_model_name_or_path": model_id,
    }))


def write_bench_adapters(folder: Path, arch: Architecture, model_id: str, n_cold: int) -> dict[str, list[str]]:
    mix = []
    for i in range(8):  # ranks 8 and 16 x attention / attention + MLP
        write_lora(folder / f"lora-{i}", arch, model_id, rank=(8, 16)[i % 2], targets=(ATTN, ALL_LINEAR)[i // 2 % 2],
                   seed=i)
        mix.append(f"lora-{i}")
    for i in range(2):
        write_soft_prompt(folder / f"soft-{i}", arch, model_id, n_virtual=20, seed=100 + i)
        mix.append(f"soft-{i}")
    cold = []
    for i in range(n_cold):
        write_lora(folder / f"cold-{i}", arch, model_id, rank=16, targets=ALL_LINEAR, seed=200 + i)
        cold.append(f"cold-{i}")
    return {"mix": mix, "single": ["lora-1"], "cold": cold}  # lora-1: rank 16 on attention + MLP


# ---- clients -----------------------------------------------------------------------------------
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


async def stream_one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int,
                     extra: dict | None = None) -> Sample:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}, **(extra or {})}
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


async def drive_samples(url: str, models: list[str], duration: float, max_tokens: int,
                        extras: list[dict | None] | None = None) -> tuple[list[Sample], float]:
    """One client per entry of `models`, each sending requests back to back until `duration` has passed;
    `extras[i]`: more fields of client i's requests."""
    samples: list[Sample] = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()

        async def client_loop(i: int, model: str):
            k = 0
            while time.perf_counter() - t0 < duration:
                samples.append(await stream_one(client, model, PROMPTS[(i + k) % len(PROMPTS)], max_tokens,
                                                extras[i] if extras else None))
                k += 1

        await asyncio.gather(*(client_loop(i, m) for i, m in enumerate(models)))
        wall = time.perf_counter() - t0
    return samples, wall


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


