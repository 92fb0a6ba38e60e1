"""Synthetic bases: a real model's shapes with random weights, for benchmarks without downloads.

    --model synthetic:llama-3.1-8b

Throughput does not depend on the weights' values, only on their shapes, so a GPU run measures
realistic matrix sizes without fetching anything. The folder written under the home holds the
config and the embedded default model's tokenizer (so prompts tokenize as usual); the vocabulary
is that tokenizer's (49,152 ids) instead of the real model's, so the embedding and the output
projection are smaller than the real ones (for llama-3.1-8b: 7.4 B parameters instead of 8.0 B).
The weights are drawn on the device at load time (normal, std 0.02): nothing is written to disk.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

PREFIX = "synthetic:"
MARKER = "hotpeft-synthetic.json"

# The shapes of published models (their config.json), with the tokenizer's vocabulary.
SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, rope_theta=100000.0, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=False),
}
CONTEXT = 8192  # enough for every benchmark workload; the real models' longer contexts change no shape


class UnknownSynthetic(ValueError):
    """`synthetic:<name>` names no known shape."""


def is_synthetic(model: str) -> bool:
    return model.startswith(PREFIX)


def check_name(model: str) -> str:
    """The shape name of `synthetic:<name>`; raises with the accepted ones."""
    name = model[len(PREFIX):]
    if name not in SHAPES:
        raise UnknownSynthetic(f"unknown synthetic model {model!r}; choose one of "
                               + ", ".join(PREFIX + n for n in SHAPES))
    return name


def synthetic_folder(model: str, home: Path) -> Path:
    return home / "models" / f"synthetic--{check_name(model)}"


def write_synthetic(model: str, home: Path, tokenizer_dir: Path) -> Path:
    """The synthetic model's folder (config + tokenizer, no weights), written once under the home."""
    name = check_name(model)
    folder = synthetic_folder(model, home)
    if (folder / MARKER).is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy2(f, folder / f.name)
    tokenizer = json.loads((tokenizer_dir / "config.json").read_text())
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **SHAPES[name],
              "vocab_size": tokenizer["vocab_size"], "max_position_embeddings": CONTEXT, "rms_norm_eps": 1e-5,
              "hidden_act": "silu", "bos_token_id": tokenizer.get("bos_token_id"),
              "eos_token_id": tokenizer.get("eos_token_id"), "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / MARKER).write_text(json.dumps({"model": model, "weights": "random normal(0, 0.02), drawn at load"}))
    return folder


def is_synthetic_dir(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def random_weights(model) -> None:
    """Draw every weight where it lives (normal, std 0.02; norms at 1), in place."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
