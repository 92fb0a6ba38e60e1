"""A tiny Llama and a byte-level tokenizer made in code, and PEFT adapters for it.

Everything here is random and seeded: no download, a few MB, and seconds to build. The
adapters are made with PEFT itself, so they are exactly what users bring from elsewhere.
"""
from __future__ import annotations

from pathlib import Path

import torch

TINY_ID = "tiny-llama"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(seed: int = 0, vocab_size: int = 259, max_positions: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        # A wide init gives peaked logits: greedy choices are far from ties and vary with the input.
        initializer_range=0.4,
    )
    return LlamaForCausalLM(config).eval()


def save_tiny_model(path: Path, max_positions: int = 256) -> Path:
    path = Path(path)
    model = make_model(max_positions=max_positions)
    model.config._name_or_path = TINY_ID
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer().save_pretrained(path)
    return path


def save_lora(base_dir: Path, out: Path, *, r: int, targets: list[str], seed: int, rslora: bool = False,
              alpha: int | None = None) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=targets, use_rslora=rslora,
                     init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # make the delta large enough to change greedy tokens
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(4.0)
    peft_model.save_pretrained(out, safe_serialization=True)
    return Path(out)


def save_prompt_tuning(base_dir: Path, out: Path, *, n_virtual: int, seed: int) -> Path:
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.normal_(0, 1.0)
    peft_model.save_pretrained(out, safe_serialization=True)
    return Path(out)


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of `model` (a transformers or PEFT model), as `generate` would give them.

    Prompt tuning is decoded by calling the PEFT model's own forward on the whole sequence at every
    step: PEFT's `generate` for prompt tuning disagrees with that forward from the second token on
    with transformers 5.24 and peft 0.21 (its KV-cached positions), so it is no reference."""
    if getattr(model, "peft_type", None) != "PROMPT_TUNING":  # PeftType is a str enum
        return model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
            if token in eos:
                break
    return out
