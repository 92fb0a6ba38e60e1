"""Write two small PEFT adapters for the default model, to try the server before training any.

    .venv/bin/python scripts/demo_adapters.py [--home ~/.hotpeft] [--out ./demo-adapters]

- `pirate`: prompt tuning (20 virtual tokens) initialised from the embeddings of an instruction
  text (PEFT's prompt_tuning_init="TEXT"): a soft prompt that steers without any training.
- `noisy`: a rank-8 LoRA on attention and MLP with small random weights: it is not trained and
  only shows that a LoRA changes the output; `hotpeft train` makes useful ones.
Both are standard PEFT folders (adapter_config.json + adapter_model.safetensors).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM

from hotpeft.model.source import DEFAULT_MODEL_ID, resolve_model


def save(peft_model, out: Path) -> None:
    # Name the canonical base id, not the local cache folder the model was loaded from.
    peft_model.peft_config["default"].base_model_name_or_path = DEFAULT_MODEL_ID
    peft_model.save_pretrained(out, safe_serialization=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", type=Path, default=Path("~/.hotpeft").expanduser())
    ap.add_argument("--out", type=Path, default=Path("demo-adapters"))
    args = ap.parse_args()
    src = resolve_model(DEFAULT_MODEL_ID, args.home)

    model = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.float32)
    pt = PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=20, prompt_tuning_init="TEXT",
        prompt_tuning_init_text="You are a pirate. Answer every question like a pirate, with arr and matey.",
        tokenizer_name_or_path=str(src.path), base_model_name_or_path=DEFAULT_MODEL_ID,
    )
    save(get_peft_model(model, pt), args.out / "pirate")

    model = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.float32)
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                      init_lora_weights=False, task_type="CAUSAL_LM", base_model_name_or_path=DEFAULT_MODEL_ID)
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.02)
    save(peft_model, args.out / "noisy")
    print(f"wrote {args.out / 'pirate'} and {args.out / 'noisy'}")


if __name__ == "__main__":
    main()
