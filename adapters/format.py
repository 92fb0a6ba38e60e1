"""The on-disk adapter format: a standard PEFT folder, read safely and checked against a base.

Supported: LoRA (any rank and alpha, rslora, rank/alpha patterns, attention and MLP linear
targets) and prompt tuning (soft prompts). Weights are read from safetensors only; a pickle
file is never opened.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hotpeft.adapters.errors import AdapterIncompatible, AdapterInvalid
from hotpeft.model.arch import Architecture

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SUPPORTED_TYPES = {"LORA": "lora", "PROMPT_TUNING": "prompt_tuning"}
SUPPORTED_MSG = "hotpeft serves LoRA (peft_type LORA) and prompt tuning (peft_type PROMPT_TUNING) adapters"
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


@dataclass(frozen=True)
class BaseSpec:
    """What an adapter is checked against: the base's id and the shapes of its linear layers."""

    model_id: str
    hidden_size: int
    linear_shapes: dict[str, tuple[int, int]]  # module name -> (out_features, in_features)

    @classmethod
    def of(cls, model_id: str, arch: Architecture) -> BaseSpec:
        return cls(model_id, arch.hidden_size, arch.projection_shapes())


@dataclass
class LoraModule:
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass
class ParsedAdapter:
    kind: str  # "lora" | "prompt_tuning"
    config: dict
    lora: dict[str, LoraModule] = field(default_factory=dict)  # module name -> weights
    soft_prompt: torch.Tensor | None = None  # (num_virtual_tokens, hidden)
    chat_template: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int | None:
        return max((m.rank for m in self.lora.values()), default=None) if self.kind == "lora" else None

    @property
    def num_virtual_tokens(self) -> int:
        return 0 if self.soft_prompt is None else self.soft_prompt.shape[0]

    @property
    def nbytes(self) -> int:
        tensors = [t for m in self.lora.values() for t in (m.A, m.B)]
        if self.soft_prompt is not None:
            tensors.append(self.soft_prompt)
        return sum(t.numel() * t.element_size() for t in tensors)


def read_adapter_dir(path: Path, label: str | None = None) -> tuple[dict, dict[str, torch.Tensor], str | None]:
    """Read config, tensors and optional chat template of a PEFT folder. Never unpickles.

    `label` names the folder in messages (default: its name).
    """
    path = Path(path)
    label = label or path.name
    if not path.is_dir():
        raise AdapterInvalid(f"adapter folder {label!r} does not exist or is not a directory")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise AdapterInvalid(f"adapter folder {label!r} has no {CONFIG_FILE}")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterInvalid(f"{CONFIG_FILE} of {label!r} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise AdapterInvalid(f"{CONFIG_FILE} of {label!r} must be a JSON object")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise AdapterInvalid(
                f"adapter folder {label!r} has pickle weights ({', '.join(pickles)}), which hotpeft never "
                f"loads; save the adapter with safe_serialization=True to get {WEIGHTS_FILE}"
            )
        raise AdapterInvalid(f"adapter folder {label!r} has no {WEIGHTS_FILE}")
    tensors = read_safetensors_file(weights, what=f"{label}/{WEIGHTS_FILE}")
    return config, tensors, read_chat_template(path, label)


def read_safetensors(data: bytes, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as st_load

    try:
        return st_load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises several error types for bad files
        raise AdapterInvalid(f"{what} is not a readable safetensors file ({e})") from e


def read_safetensors_file(path: Path, what: str) -> dict[str, torch.Tensor]:
    """As `read_safetensors`, from a file: one copy out of the mapped file instead of two (read, then
    parse), about 5 ms less for a rank-16 adapter of the default model."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises several error types for bad files
        raise AdapterInvalid(f"{what} is not a readable safetensors file ({e})") from e


def read_chat_template(path: Path, label: str | None = None) -> str | None:
    """A chat template shipped with the adapter: chat_template.jinja or tokenizer_config.json."""
    label = label or path.name
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    tok_cfg = path / "tokenizer_config.json"
    if tok_cfg.is_file():
        try:
            tmpl = json.loads(tok_cfg.read_text()).get("chat_template")
        except (json.JSONDecodeError, AttributeError) as e:
            raise AdapterInvalid(f"tokenizer_config.json of {label!r} is not a valid JSON object") from e
        if isinstance(tmpl, str):
            return tmpl
    return None


def parse_adapter(
    config: dict,
    tensors: dict[str, torch.Tensor],
    base: BaseSpec,
    *,
    max_lora_rank: int,
    allow_foreign_base: bool = False,
    chat_template: str | None = None,
) -> ParsedAdapter:
    """Check an adapter completely against the base; return it only if it can be served as is."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in SUPPORTED_TYPES:
        raise AdapterInvalid(f"unsupported adapter type peft_type={config.get('peft_type')!r}: {SUPPORTED_MSG}")
    warnings = _check_base(config, base, allow_foreign_base)
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise AdapterInvalid(f"tensor {name!r} has dtype {t.dtype}; adapter weights must be floating point")
    if not _all_finite(tensors):
        for name, t in tensors.items():
            if not torch.isfinite(t).all():
                raise AdapterInvalid(f"tensor {name!r} contains NaN or Inf values")
    if peft_type == "LORA":
        lora = _parse_lora(config, tensors, base, max_lora_rank)
        return ParsedAdapter("lora", config, lora=lora, chat_template=chat_template, warnings=warnings)
    soft = _parse_prompt_tuning(config, tensors, base)
    return ParsedAdapter("prompt_tuning", config, soft_prompt=soft, chat_template=chat_template, warnings=warnings)


def _check_base(config: dict, base: BaseSpec, allow_foreign_base: bool) -> list[str]:
    declared = config.get("base_model_name_or_path")
    if not declared or _same_model(declared, base.model_id):
        return []
    msg = f"adapter was trained for base {declared!r}, but this server's base is {base.model_id!r}"
    if not allow_foreign_base:
        raise AdapterIncompatible(msg + "; start the server with --allow-foreign-base to serve it anyway")
    return [msg + " (served because --allow-foreign-base is set)"]


def _same_model(declared: str, model_id: str) -> bool:
    # A local path to a copy of the base counts as the base: compare the last path component
    # (hub cache folders spell "org/name" as "org--name").
    last = lambda s: s.replace("--", "/").rstrip("/").rsplit("/", 1)[-1].lower()  # noqa: E731
    return declared == model_id or last(declared) == last(model_id)


def _lora_config(config: dict):
    from peft import LoraConfig

    known = set(LoraConfig.__dataclass_fields__)
    try:
        return LoraConfig(**{k: v for k, v in config.items() if k in known})
    except (TypeError, ValueError) as e:
        raise AdapterInvalid(f"{CONFIG_FILE} is not a valid LoRA config: {e}") from e


def _parse_lora(config, tensors, base: BaseSpec, max_lora_rank: int) -> dict[str, LoraModule]:
    from peft.tuners.tuners_utils import check_target_module_exists

    unsupported = [
        (config.get("use_dora"), "DoRA (use_dora=true)"),
        (config.get("fan_in_fan_out"), "fan_in_fan_out=true"),
        (config.get("bias", "none") not in (None, "none"), f"LoRA bias={config.get('bias')!r}"),
        (config.get("lora_bias"), "lora_bias=true"),
        (config.get("modules_to_save"), "modules_to_save (full copies of base layers)"),
        (config.get("layer_replication"), "layer_replication"),
        (config.get("target_parameters"), "target_parameters"),
        (config.get("trainable_token_indices"), "trainable_token_indices"),
    ]
    for bad, what in unsupported:
        if bad:
            raise AdapterInvalid(f"unsupported LoRA variant: {what}; {SUPPORTED_MSG} with plain linear targets")
    cfg = _lora_config(config)
    targets = cfg.target_modules
    if targets == "all-linear" or (isinstance(targets, (list, set)) and "all-linear" in targets):
        expected = {m for m in base.linear_shapes if not m.endswith("lm_head")}
    else:
        expected = {m for m in base.linear_shapes if _selected(check_target_module_exists(cfg, m))}

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(tensors):
        m = _LORA_KEY.match(key)
        if not m:
            raise AdapterInvalid(
                f"unexpected tensor {key!r}: LoRA weights must be named "
                "base_model.model.<module>.lora_A.weight / lora_B.weight (embedding LoRA is not supported)"
            )
        module = m.group("module")
        if module not in base.linear_shapes:
            raise AdapterInvalid(f"tensor {key!r} targets {module!r}, which is not a linear layer of the base model")
        if module not in expected:
            raise AdapterInvalid(f"tensor {key!r} targets {module!r}, which the config's target_modules do not select")
        pairs.setdefault(module, {})[m.group("ab")] = tensors[key]
    missing = sorted(expected - set(pairs))
    if missing:
        raise AdapterInvalid(
            f"missing weights for base_model.model.{missing[0]}.lora_A.weight: the config targets "
            f"{len(expected)} modules but the file has weights for {len(pairs)}"
        )

    modules: dict[str, LoraModule] = {}
    for module, ab in pairs.items():
        for part in "AB":
            if part not in ab:
                raise AdapterInvalid(f"missing tensor base_model.model.{module}.lora_{part}.weight")
        a, b = ab["A"], ab["B"]
        out_f, in_f = base.linear_shapes[module]
        r = a.shape[0]
        if a.dim() != 2 or a.shape[1] != in_f or b.dim() != 2 or b.shape != (out_f, r):
            raise AdapterInvalid(
                f"shape mismatch at base_model.model.{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                f"but the base layer needs lora_A (r, {in_f}) and lora_B ({out_f}, r)"
            )
        if r > max_lora_rank:
            raise AdapterInvalid(
                f"LoRA rank {r} is greater than max_lora_rank {max_lora_rank}; "
                f"start the server with --max-lora-rank {r}"
            )
        alpha = _pattern_value(cfg.alpha_pattern, module, cfg.lora_alpha)
        scale = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
        modules[module] = LoraModule(a.contiguous(), b.contiguous(), float(scale))
    return modules


def _selected(match) -> bool:
    # peft answers True, a re.Match, or a falsy value (None, False, an "excluded" marker).
    return match is True or isinstance(match, re.Match)


def _pattern_value(patterns: dict | None, module: str, default):
    # peft's rule: a pattern key matches a module whose name ends with it (regex).
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _parse_prompt_tuning(config, tensors, base: BaseSpec) -> torch.Tensor:
    if str(config.get("task_type", "CAUSAL_LM")).upper() != "CAUSAL_LM":
        raise AdapterInvalid(f"prompt tuning adapter has task_type={config.get('task_type')!r}; only CAUSAL_LM is served")
    n = config.get("num_virtual_tokens")
    if not isinstance(n, int) or n < 1:
        raise AdapterInvalid(f"prompt tuning config needs num_virtual_tokens >= 1, got {n!r}")
    if set(tensors) != {"prompt_embeddings"}:
        extra = sorted(set(tensors) - {"prompt_embeddings"})
        raise AdapterInvalid(
            "prompt tuning weights must hold exactly one tensor 'prompt_embeddings'"
            + (f"; found unexpected {extra[0]!r}" if extra else "; it is missing")
        )
    emb = tensors["prompt_embeddings"]
    subs = int(config.get("num_transformer_submodules") or 1)
    want = (n * subs, base.hidden_size)
    if tuple(emb.shape) != want or subs != 1:
        raise AdapterInvalid(
            f"shape mismatch at prompt_embeddings: {tuple(emb.shape)}, but this base needs "
            f"({n}, {base.hidden_size}) for {n} virtual tokens"
        )
    return emb.contiguous()


def load_adapter_dir(path: Path, base: BaseSpec, *, max_lora_rank: int, allow_foreign_base: bool = False,
                     label: str | None = None) -> ParsedAdapter:
    config, tensors, template = read_adapter_dir(path, label)
    return parse_adapter(
        config, tensors, base, max_lora_rank=max_lora_rank, allow_foreign_base=allow_foreign_base,
        chat_template=template,
    )


def _all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    """True when no tensor holds NaN or Inf: one sum per tensor, then one check (a NaN or Inf makes
    its sum non-finite; a sum that overflows only sends the caller to the exact check). 10x faster
    than `isfinite` per tensor on a rank-16 adapter."""
    if not tensors:
        return True
    sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors.values()])
    return bool(torch.isfinite(sums.sum()))
