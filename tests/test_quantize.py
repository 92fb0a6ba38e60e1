"""The resident base in int8 and nf4 (bitsandbytes): smaller than unquantized, and still serving adapters."""
import pytest
import torch

from hotpeft.model.load import load_base
from hotpeft.model.source import ModelSource
from hotpeft.server.config import Settings
from hotpeft.server.runtime import build_runtime

from test_engine import run_tokens


@pytest.fixture(scope="module")
def sizes(tiny_dirs):
    src = ModelSource("tiny-llama", tiny_dirs["base"])
    return {q: load_base(src, q, device=torch.device("cpu"), dtype=torch.float32).resident_bytes
            for q in ("none", "int8", "nf4")}


def test_quantized_bases_take_fewer_bytes(sizes):
    assert sizes["nf4"] < sizes["int8"] < sizes["none"]


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_quantized_base_serves_lora_and_soft_prompts(tiny_dirs, tmp_path, quantize):
    rt = build_runtime(Settings(model=str(tiny_dirs["base"]), adapters_dir=tiny_dirs["adapters"], quantize=quantize,
                                dtype="float32", home=tmp_path))
    rt.engine.start()
    try:
        assert rt.base.quantization == quantize
        prompt = rt.tokenizer("quantized")["input_ids"]
        outs = {a: run_tokens(rt, a, prompt, 8) for a in (None, "lora-mlp", "soft")}
        assert all(len(t) == 8 or t[-1] == 2 for t in outs.values())
        assert len({tuple(t) for t in outs.values()}) == 3
    finally:
        rt.engine.stop()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_serves_an_nf4_base_by_default(tiny_dirs, tmp_path):
    """On a GPU the default precision is nf4: the projections are 4-bit bitsandbytes layers on the
    device, and LoRA and soft prompts are served on top of them."""
    import bitsandbytes as bnb

    rt = build_runtime(Settings(model=str(tiny_dirs["base"]), adapters_dir=tiny_dirs["adapters"], home=tmp_path))
    rt.engine.start()
    try:
        assert rt.base.quantization == "nf4" and rt.base.device.type == "cuda"
        q_proj = rt.base.model.model.layers[0].self_attn.q_proj
        assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.device.type == "cuda"
        prompt = rt.tokenizer("on the gpu")["input_ids"]
        outs = {a: run_tokens(rt, a, prompt, 8) for a in (None, "lora-mlp", "soft")}
        assert len({tuple(t) for t in outs.values()}) == 3
    finally:
        rt.engine.stop()


def test_quantized_base_applies_a_lora_that_targets_only_down_proj(tiny_dirs, tmp_path):
    """Without fused gate|up (int8 base), a LoRA on down_proj alone must still change the output, as PEFT's does."""
    import tiny
    from peft import PeftModel

    adapters = tmp_path / "adapters"
    tiny.save_lora(tiny_dirs["base"], adapters / "down-only", r=8, targets=["down_proj"], seed=5)
    rt = build_runtime(Settings(model=str(tiny_dirs["base"]), adapters_dir=adapters, quantize="int8",
                                dtype="float32", home=tmp_path / "home"))
    rt.engine.start()
    try:
        prompt = rt.tokenizer("only the down projection")["input_ids"]
        ours = run_tokens(rt, "down-only", prompt, 12)
        assert ours != run_tokens(rt, None, prompt, 12)
    finally:
        rt.engine.stop()
    src = ModelSource("tiny-llama", tiny_dirs["base"])
    model = load_base(src, "int8", device=torch.device("cpu"), dtype=torch.float32).model
    model = PeftModel.from_pretrained(model, adapters / "down-only")
    reference = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):]
    assert ours == reference.tolist()
