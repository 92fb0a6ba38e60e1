"""Weighted combinations of LoRA adapters, with PEFT's `add_weighted_adapter` semantics.

    linear, ties, dare_linear, dare_ties   same rank r everywhere; A and B combined separately with
                                           weights sqrt(|w * scale|) (A keeps the sign); result rank r
    cat                                    A_i * w_i * scale_i stacked over B_i: exactly the weighted sum
                                           of the deltas; result rank = sum of ranks
    svd                                    sum of w_i * scale_i * B_i A_i, truncated by SVD to the largest rank

The result has lora_alpha = r (and the first source's use_rslora), as PEFT writes it. The
combination rules themselves are PEFT's (`peft.utils.merge_utils`); this module only applies them
to adapters held outside a PEFT model. DARE drops entries at random: the generator is seeded so
the same recipe always gives the same adapter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hotpeft.adapters.errors import AdapterInvalid
from hotpeft.adapters.format import ParsedAdapter

STRATEGIES = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties")
MAX_SOURCES = 16


@dataclass(frozen=True)
class Source:
    label: str  # how the caller named it (for messages): "a@2"
    adapter: ParsedAdapter
    weight: float


def check_recipe(sources: list[Source], strategy: str, density: float | None, *, param: str) -> None:
    if strategy not in STRATEGIES:
        raise AdapterInvalid(f"unknown merge strategy {strategy!r}; use one of {', '.join(STRATEGIES)}", param=param)
    if not 1 <= len(sources) <= MAX_SOURCES:
        raise AdapterInvalid(f"a merge takes 1 to {MAX_SOURCES} adapters, got {len(sources)}", param=param)
    labels = [s.label for s in sources]
    if len(set(labels)) != len(labels):
        raise AdapterInvalid(f"adapter {next(x for x in labels if labels.count(x) > 1)!r} is listed twice", param=param)
    for s in sources:
        if s.adapter.kind != "lora":
            raise AdapterInvalid(f"adapter {s.label!r} is a {s.adapter.kind} adapter; only LoRA adapters can be merged",
                                 param=param)
        if not math.isfinite(s.weight):
            raise AdapterInvalid(f"the weight of {s.label!r} must be a finite number", param=param)
    if strategy in NEEDS_DENSITY and (density is None or not 0.0 < density <= 1.0):
        raise AdapterInvalid(f"strategy {strategy!r} needs a density in (0, 1], got {density!r}", param=param)
    if strategy not in ("cat", "svd"):
        ranks = {s.label: s.adapter.rank for s in sources}
        if len(set(ranks.values())) != 1 or any(
            m.rank != s.adapter.rank for s in sources for m in s.adapter.lora.values()
        ):
            raise AdapterInvalid(
                f"strategy {strategy!r} needs adapters of one rank everywhere (PEFT's rule); ranks: "
                + ", ".join(f"{k}={v}" for k, v in ranks.items()) + "; use 'cat' or 'svd' for different ranks",
                param=param,
            )


def merge(sources: list[Source], strategy: str, *, density: float | None = None, seed: int = 0,
          all_modules: dict[str, tuple[int, int]] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The combined adapter as a PEFT folder's content: (adapter_config, tensors).

    `all_modules` (the base's linear layers) lets the config name targets by their short names
    when every layer of those names is targeted.
    """
    from peft.utils.merge_utils import dare_linear, dare_ties, task_arithmetic, ties

    modules = sorted({m for s in sources for m in s.adapter.lora})
    if strategy == "cat":
        new_rank = sum(s.adapter.rank for s in sources)
    else:
        new_rank = max(s.adapter.rank for s in sources)
    first = sources[0].adapter.config
    tensors: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in modules:
            present = [s for s in sources if module in s.adapter.lora]
            parts = [s.adapter.lora[module] for s in present]
            weights = [s.weight for s in present]
            dtype = parts[0].A.dtype
            if strategy == "cat":
                A = torch.cat([p.A.float() * w * p.scale for p, w in zip(parts, weights)])
                B = torch.cat([p.B.float() for p in parts], dim=1)
                A = torch.nn.functional.pad(A, (0, 0, 0, new_rank - A.shape[0]))  # PEFT's zero rows
                B = torch.nn.functional.pad(B, (0, new_rank - B.shape[1]))
            elif strategy == "svd":
                delta = task_arithmetic([p.B.float() @ p.A.float() * p.scale for p in parts], torch.tensor(weights))
                U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
                B, A = U[:, :new_rank] @ torch.diag(S[:new_rank]), Vh[:new_rank, :]
            else:
                ws = [w * p.scale for p, w in zip(parts, weights)]
                wa = torch.tensor([math.copysign(math.sqrt(abs(w)), w) for w in ws])
                wb = torch.tensor([math.sqrt(abs(w)) for w in ws])
                combine = {
                    "linear": lambda t, w: task_arithmetic(t, w),
                    "ties": lambda t, w: ties(t, w, density, "total"),
                    "dare_linear": lambda t, w: dare_linear(t, w, density),
                    "dare_ties": lambda t, w: dare_ties(t, w, density, "total"),
                }[strategy]
                A = combine([p.A.float() for p in parts], wa)
                B = combine([p.B.float() for p in parts], wb)
            tensors[f"base_model.model.{module}.lora_A.weight"] = A.to(dtype).contiguous()
            tensors[f"base_model.model.{module}.lora_B.weight"] = B.to(dtype).contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": first.get("task_type", "CAUSAL_LM"),
        "base_model_name_or_path": first.get("base_model_name_or_path"),
        "r": new_rank,
        "lora_alpha": new_rank,
        "use_rslora": bool(first.get("use_rslora", False)),
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": _targets(modules, all_modules),
    }
    return config, tensors


def _targets(modules: list[str], all_modules: dict[str, tuple[int, int]] | None) -> list[str]:
    short = sorted({m.rpartition(".")[2] for m in modules})
    if all_modules is not None:
        every = {m for m in all_modules if m.rpartition(".")[2] in short}
        if every == set(modules):
            return short
    return modules
