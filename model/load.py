"""Load the resident base model with a precision (dtype; int8 or nf4 through bitsandbytes).

    base = load_base(resolve_model("default", home), "nf4", device=torch.device("cuda"))

Shared by the server and the trainer; imports nothing of hotpeft's outside this package.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from hotpeft.model.arch import Architecture
from hotpeft.model.fingerprint import fingerprint
from hotpeft.model.source import ModelSource, quiet_transformers
from hotpeft.model.synthetic import is_synthetic_dir, random_weights

log = logging.getLogger("hotpeft.model")

QUANTIZATIONS = ("none", "int8", "nf4")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedBase:
    model_id: str
    path: Path
    model: torch.nn.Module
    tokenizer: object
    quantization: str
    device: torch.device
    dtype: torch.dtype
    resident_bytes: int
    fingerprint: str
    max_model_len: int
    arch: Architecture

    @property
    def precision(self) -> str:
        """How the weights are held: the quantization (int8, nf4), or the dtype of unquantized ones."""
        return self.quantization if self.quantization != "none" else str(self.dtype).removeprefix("torch.")


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_quantization(device: torch.device) -> str:
    # nf4 on CUDA (bandwidth-bound decode, fast kernels). On the CPU the unquantized base: with the
    # default 135M model nf4 decodes ~30% faster but costs ~15% perplexity, and memory is not the
    # constraint at this size (measurements in the README; `python -m hotpeft.server.tools.precision`).
    return "nf4" if device.type == "cuda" else "none"


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    """`--dtype`: a name, or auto = bfloat16 on CUDA and on CPUs with native bf16, else float32."""
    if setting != "auto":
        return DTYPES[setting]
    if device.type == "cuda":
        return torch.bfloat16
    # bf16 halves the bytes read per token; without native bf16 it is emulated and slower.
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def _quantization_config(quantization: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=True,
        )
    return None


def load_base(
    source: ModelSource,
    quantization: str | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    max_model_len: int | None = None,
    weights: bool = True,
) -> LoadedBase:
    """`weights=False`: the architecture on the meta device, no memory (what a front end that never runs
    the model needs: its shapes for adapter checks, its tokenizer, its context length)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    device = device or default_device()
    synthetic = is_synthetic_dir(source.path)
    if synthetic and quantization not in (None, "none"):
        raise ValueError(f"{source.model_id} has random weights and runs unquantized: use --quantize none (or auto)")
    quantization = quantization or ("none" if synthetic else default_quantization(device))
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # Never code from the model folder, never pickle weights (a .bin-only model is refused: convert it).
    kwargs: dict = {"dtype": dtype, "trust_remote_code": False, "use_safetensors": True}
    qconfig = _quantization_config(quantization, dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    config = AutoConfig.from_pretrained(source.path, trust_remote_code=False)
    arch = Architecture.from_config(config)  # an architecture the engine cannot serve fails before any weight is read
    if not weights:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    elif synthetic:  # random weights with the real shapes, drawn where they live
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        random_weights(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    if qconfig is None and weights:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=False)
    context = int(getattr(model.config, "max_position_embeddings", 2048))
    if max_model_len is not None:
        if max_model_len > context:
            raise ValueError(f"--max-model-len {max_model_len} is beyond the model's context of {context} tokens")
        context = max_model_len
    return LoadedBase(
        model_id=source.model_id, path=source.path, model=model, tokenizer=tokenizer,
        quantization=quantization, device=device, dtype=dtype,
        resident_bytes=resident_bytes(model) if weights else 0, fingerprint=fingerprint(source.path, source.model_id),
        max_model_len=context, arch=arch,
    )


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers as stored (quantized weights count at their packed size)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)
        if qs is not None and getattr(qs, "absmax", None) is not None:
            total += qs.absmax.numel() * qs.absmax.element_size()
    return total


def eos_ids(base: LoadedBase) -> set[int]:
    """Every token id that ends a generation: the generation config's and the tokenizer's."""
    ids: set[int] = set()
    gen = getattr(base.model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), base.tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
