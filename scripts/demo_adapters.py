"""Write two small PEFT adapters for the default model, to try the server before training any.

    .venv/bin/python scripts/demo_adapters.py [--home DIR] [--model ID|DIR] [--out ./demo-adapters] [--only noisy] [--seed 1]

- `pirate`: prompt tuning (20 virtual tokens) initialised from the embeddings of an instruction
  text (PEFT's prompt_tuning_init="TEXT"): a soft prompt that steers without any training.
- `noisy`: a rank-8 LoRA on attention and MLP with small random weights: it is not trained and
  only shows that a LoRA changes the output; `hotpeft train` makes useful ones.
Both are standard PEFT folders (adapter_config.json + adapter_model.safetensors) naming the base's
id. The base is the server's: --model (else HOTPEFT_MODEL, else the embedded default, read from the
home: --home, else HOTPEFT_HOME, else ~/.hotpeft, and converted there once if needed); nothing is
fetched from the network.
"""
from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

# Set before transformers and peft are imported: the base is local, so no hub look-up may happen
# (PEFT would otherwise try to fetch the base's config to decide about embedding layers).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Naming the base's id instead of the folder it was loaded from is the point (PEFT warns about it), and
# transformers' deprecation notices come from its own calls: neither asks anything of the user.
warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*was renamed")
warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")

import torch  # noqa: E402
from peft import LoraConfig, PromptTuningConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from hotpeft.model.source import DEFAULT_MODEL_ID, resolve_model  # noqa: E402


def save(peft_model, out: Path, base_id: str) -> None:
    # Name the base's id (the canonical one for the default), not the folder the model was loaded from.
    peft_model.peft_config["default"].base_model_name_or_path = base_id
    peft_model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)
    (out / "README.md").unlink(missing_ok=True)


def pirate(src, out: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.float32)
    pt = PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=20, prompt_tuning_init="TEXT",
        prompt_tuning_init_text="You are a pirate. Answer every question like a pirate, with arr and matey.",
        tokenizer_name_or_path=str(src.path), base_model_name_or_path=src.model_id,
    )
    save(get_peft_model(model, pt), out, src.model_id)


def noisy(src, out: Path, seed: int) -> None:
    model = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.float32)
    torch.manual_seed(seed)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                      init_lora_weights=False, task_type="CAUSAL_LM", base_model_name_or_path=src.model_id)
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.02)
    save(peft_model, out, src.model_id)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, default=Path(os.environ.get("HOTPEFT_HOME", "~/.hotpeft")).expanduser(),
                    help="hotpeft home holding the converted base (env HOTPEFT_HOME; default ~/.hotpeft)")
    ap.add_argument("--model", default=os.environ.get("HOTPEFT_MODEL", DEFAULT_MODEL_ID),
                    help="the base: the embedded default id or a local HF model folder (env HOTPEFT_MODEL)")
    ap.add_argument("--out", type=Path, default=Path("demo-adapters"))
    ap.add_argument("--only", choices=("pirate", "noisy"), help="write only this adapter")
    ap.add_argument("--seed", type=int, default=0, help="seed of the noisy LoRA's weights (another seed: other weights)")
    args = ap.parse_args()
    src = resolve_model(args.model, args.home.expanduser())
    written = []
    if args.only in (None, "pirate"):
        pirate(src, args.out / "pirate")
        written.append(args.out / "pirate")
    if args.only in (None, "noisy"):
        noisy(src, args.out / "noisy", args.seed)
        written.append(args.out / "noisy")
    print("wrote " + " and ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
