"""Every architecture the engine serves, as tiny random models made in code: greedy tokens of the
engine equal transformers' (with PEFT for a LoRA and a soft prompt), and an unsupported one is
refused at start-up with the list of supported ones."""
from __future__ import annotations

import asyncio

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import tiny
from hotpeft.model.arch import SUPPORTED_MODEL_TYPES, Architecture, UnsupportedModel
from hotpeft.server.config import Settings
from hotpeft.server.runtime import build_runtime
from test_engine import _tokens, make_request

SHAPE = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
             initializer_range=0.4)


def make(model_type: str):
    from transformers import GemmaConfig, GemmaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    if model_type == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**SHAPE, head_dim=16, tie_word_embeddings=False))
    else:
        model = GemmaForCausalLM(GemmaConfig(**SHAPE, head_dim=16))
    with torch.no_grad():  # random norm weights: a forward that ignored them, or their offset, would differ
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.fixture(scope="module", params=["qwen3", "gemma"])
def arch_rt(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    base = root / f"tiny-{request.param}"
    model = make(request.param)
    model.config._name_or_path = base.name
    model.save_pretrained(base, safe_serialization=True)
    tiny.make_tokenizer().save_pretrained(base)
    adapters = root / "adapters"
    tiny.save_lora(base, adapters / "lora", r=8, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"], seed=4)
    tiny.save_prompt_tuning(base, adapters / "soft", n_virtual=5, seed=5)
    rt = build_runtime(Settings(model=str(base), adapters_dir=adapters, dtype="float32",
                                home=tmp_path_factory.mktemp("home"), max_batch_tokens=16))
    rt.engine.start()
    yield rt, base, adapters
    rt.engine.stop()


@pytest.mark.parametrize("adapter", [None, "lora", "soft"])
def test_greedy_tokens_equal_transformers(arch_rt, adapter):
    rt, base, adapters = arch_rt
    prompt = tiny.make_tokenizer()("a prompt longer than one chunk of sixteen tokens")["input_ids"]
    got = asyncio.run(_tokens(rt, make_request(rt, adapter, prompt, 12)))
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter:
        reference = PeftModel.from_pretrained(reference, adapters / adapter)
    assert got == tiny.greedy_reference(reference, prompt, 12)


def test_the_architecture_description_reads_the_model_specific_parts():
    qwen3 = Architecture.from_config(make("qwen3").config)
    gemma = Architecture.from_config(make("gemma").config)
    assert (qwen3.qk_norm, qwen3.norm_offset, qwen3.head_dim) == (True, 0.0, 16)
    assert (gemma.qk_norm, gemma.norm_offset, gemma.hidden_act) == (False, 1.0, "gelu_pytorch_tanh")


def test_an_unsupported_architecture_is_refused_naming_the_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModel) as e:
        Architecture.from_config(GPT2Config())
    assert "'gpt2'" in str(e.value) and all(t in str(e.value) for t in SUPPORTED_MODEL_TYPES)
