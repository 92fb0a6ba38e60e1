"""Merged adapters against PEFT's own add_weighted_adapter, module by module."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from hotpeft.adapters import AdapterInvalid, BaseSpec, load_adapter_dir
from hotpeft.adapters.format import parse_adapter
from hotpeft.adapters.merge import Source, check_recipe, merge
from hotpeft.model.arch import Architecture

import tiny


@pytest.fixture(scope="module")
def spec():
    model = tiny.make_model()
    return BaseSpec.of(tiny.TINY_ID, Architecture.from_config(model.config))


def _deltas(parsed) -> dict[str, torch.Tensor]:
    return {m: (mod.B @ mod.A) * mod.scale for m, mod in parsed.lora.items()}


def _peft_deltas(tiny_dirs, folders, weights, strategy, density) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["base"], dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, folders[0], adapter_name="s0")
    for i, f in enumerate(folders[1:], 1):
        peft.load_adapter(f, adapter_name=f"s{i}")
    peft.add_weighted_adapter([f"s{i}" for i in range(len(folders))], weights, "merged", combination_type=strategy,
                              density=density)
    out = {}
    for name, module in peft.named_modules():
        if hasattr(module, "lora_A") and "merged" in module.lora_A:
            key = name.removeprefix("base_model.model.")
            out[key] = module.get_delta_weight("merged").detach()
    return out


CASES = [
    ("linear", ["lora-attn", "lora-qk"], [0.7, 0.3], None),
    ("linear", ["lora-attn", "lora-qk"], [1.0, -0.5], None),
    ("cat", ["lora-attn", "lora-mlp"], [0.6, 0.4], None),
    ("svd", ["lora-attn", "lora-r4"], [0.5, 0.5], None),
    ("ties", ["lora-attn", "lora-qk"], [0.5, 0.5], 0.5),
    ("dare_linear", ["lora-attn", "lora-qk"], [0.5, 0.5], 1.0),
    ("dare_ties", ["lora-attn", "lora-qk"], [0.5, 0.5], 1.0),
]


@pytest.mark.parametrize("strategy,names,weights,density", CASES)
def test_merge_equals_peft_add_weighted_adapter(tiny_dirs, extra_adapters, spec, strategy, names, weights, density):
    folders = [extra_adapters.get(n) or tiny_dirs["adapters"] / n for n in names]
    sources = [Source(n, load_adapter_dir(f, spec, max_lora_rank=64), w) for n, f, w in zip(names, folders, weights)]
    check_recipe(sources, strategy, density, param="adapters")
    config, tensors = merge(sources, strategy, density=density, all_modules=spec.linear_shapes)
    ours = _deltas(parse_adapter(config, tensors, spec, max_lora_rank=1024))
    theirs = _peft_deltas(tiny_dirs, folders, weights, strategy, density)
    assert set(ours) == {m for m, d in theirs.items() if d.abs().sum() > 0} | set(ours)
    for module, delta in ours.items():
        torch.testing.assert_close(delta, theirs[module], rtol=1e-4, atol=1e-5)


def test_merge_is_deterministic_and_a_weight_of_one_is_the_adapter(tiny_dirs, spec):
    attn = load_adapter_dir(tiny_dirs["adapters"] / "lora-attn", spec, max_lora_rank=64)
    config, tensors = merge([Source("a", attn, 1.0)], "cat", all_modules=spec.linear_shapes)
    merged = parse_adapter(config, tensors, spec, max_lora_rank=64)
    for module, delta in _deltas(merged).items():
        torch.testing.assert_close(delta, _deltas(attn)[module])
    again = merge([Source("a", attn, 1.0)], "cat", all_modules=spec.linear_shapes)[1]
    assert all(torch.equal(tensors[k], again[k]) for k in tensors)


def test_bad_recipes_are_refused(tiny_dirs, extra_adapters, spec):
    attn = load_adapter_dir(tiny_dirs["adapters"] / "lora-attn", spec, max_lora_rank=64)
    r4 = load_adapter_dir(extra_adapters["lora-r4"], spec, max_lora_rank=64)
    soft = load_adapter_dir(tiny_dirs["adapters"] / "soft", spec, max_lora_rank=64)
    with pytest.raises(AdapterInvalid, match="one rank everywhere.*a=8, b=4.*'cat' or 'svd'"):
        check_recipe([Source("a", attn, 0.5), Source("b", r4, 0.5)], "linear", None, param="adapters")
    with pytest.raises(AdapterInvalid, match="'s' is a prompt_tuning adapter"):
        check_recipe([Source("a", attn, 0.5), Source("s", soft, 0.5)], "cat", None, param="adapters")
    with pytest.raises(AdapterInvalid, match="'ties' needs a density in \\(0, 1\\]"):
        check_recipe([Source("a", attn, 0.5)], "ties", None, param="adapters")
    with pytest.raises(AdapterInvalid, match="listed twice"):
        check_recipe([Source("a", attn, 0.5), Source("a", attn, 0.5)], "cat", None, param="adapters")
