"""Reading and checking PEFT adapter folders against the tiny base."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hotpeft.adapters import AdapterIncompatible, AdapterInvalid, BaseSpec, InvalidName
from hotpeft.adapters.format import load_adapter_dir
from hotpeft.adapters.names import parse_model_ref
from hotpeft.model.arch import Architecture

import tiny


@pytest.fixture(scope="module")
def spec(tiny_dirs):
    model = tiny.make_model()
    return BaseSpec.of(tiny.TINY_ID, Architecture.from_config(model.config))


@pytest.fixture
def copy(tiny_dirs, tmp_path):
    def _copy(name: str):
        dst = tmp_path / name
        shutil.copytree(tiny_dirs["adapters"] / name, dst)
        return dst
    return _copy


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def test_lora_is_read_with_ranks_and_scales(tiny_dirs, spec):
    a = load_adapter_dir(tiny_dirs["adapters"] / "lora-attn", spec, max_lora_rank=64)
    assert a.kind == "lora" and a.rank == 8
    assert set(a.lora) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    assert all(m.scale == pytest.approx(16 / 8) for m in a.lora.values())  # alpha / r
    b = load_adapter_dir(tiny_dirs["adapters"] / "lora-mlp", spec, max_lora_rank=64)
    assert len(b.lora) == 14 and b.rank == 16
    assert all(m.scale == pytest.approx(32 / 16 ** 0.5) for m in b.lora.values())  # rslora: alpha / sqrt(r)


def test_rank_and_alpha_patterns_follow_peft(copy, spec):
    folder = copy("lora-attn")
    _edit_config(folder, alpha_pattern={"v_proj": 4})
    a = load_adapter_dir(folder, spec, max_lora_rank=64)
    assert a.lora["model.layers.0.self_attn.v_proj"].scale == pytest.approx(4 / 8)
    assert a.lora["model.layers.0.self_attn.q_proj"].scale == pytest.approx(16 / 8)


def test_prompt_tuning_is_read(tiny_dirs, spec):
    a = load_adapter_dir(tiny_dirs["adapters"] / "soft", spec, max_lora_rank=64)
    assert a.kind == "prompt_tuning" and a.num_virtual_tokens == 6 and a.soft_prompt.shape == (6, 64)


def test_adapter_chat_template_is_picked_up(tiny_dirs, spec):
    a = load_adapter_dir(tiny_dirs["adapters"] / "lora-tmpl", spec, max_lora_rank=64)
    assert a.chat_template.startswith("{% for m in messages %}")


@pytest.mark.parametrize("peft_type", ["IA3", "PREFIX_TUNING", "LOHA", "P_TUNING"])
def test_unsupported_types_are_refused_with_what_is_supported(copy, spec, peft_type):
    folder = copy("lora-attn")
    _edit_config(folder, peft_type=peft_type)
    with pytest.raises(AdapterInvalid, match=rf"unsupported adapter type peft_type='{peft_type}'.*LoRA.*prompt tuning"):
        load_adapter_dir(folder, spec, max_lora_rank=64)


def test_dora_is_refused(copy, spec):
    folder = copy("lora-attn")
    _edit_config(folder, use_dora=True)
    with pytest.raises(AdapterInvalid, match="DoRA"):
        load_adapter_dir(folder, spec, max_lora_rank=64)


def test_pickle_weights_are_never_loaded(copy, spec, tmp_path):
    folder = copy("lora-attn")
    (folder / "adapter_model.safetensors").unlink()
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    import pickle
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(AdapterInvalid, match="pickle weights .*adapter_model.bin.*never loads"):
        load_adapter_dir(folder, spec, max_lora_rank=64)
    assert not canary.exists()


def test_truncated_safetensors_is_refused(copy, spec):
    folder = copy("lora-attn")
    f = folder / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(AdapterInvalid, match="not a readable safetensors file"):
        load_adapter_dir(folder, spec, max_lora_rank=64)


def test_shape_mismatch_names_key_and_both_shapes(copy, spec):
    folder = copy("lora-attn")
    f = folder / "adapter_model.safetensors"
    t = load_file(f)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    t[key] = torch.zeros(8, 32)
    save_file(t, f)
    with pytest.raises(AdapterInvalid, match=r"shape mismatch at base_model.model.model.layers.0.self_attn.q_proj: "
                                             r"lora_A \(8, 32\).*needs lora_A \(r, 64\)"):
        load_adapter_dir(folder, spec, max_lora_rank=64)


def test_missing_and_extra_keys_are_refused(copy, spec):
    folder = copy("lora-attn")
    f = folder / "adapter_model.safetensors"
    t = load_file(f)
    del t["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]
    del t["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(t, f)
    with pytest.raises(AdapterInvalid, match="missing weights for base_model.model.model.layers.1.self_attn.v_proj"):
        load_adapter_dir(folder, spec, max_lora_rank=64)
    t["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"] = torch.zeros(8, 64)
    t["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"] = torch.zeros(32, 8)
    t["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(8, 64)
    save_file(t, f)
    with pytest.raises(AdapterInvalid, match="targets 'model.layers.0.mlp.up_proj', which the config's target_modules do not select"):
        load_adapter_dir(folder, spec, max_lora_rank=64)


def test_rank_above_limit_names_the_flag(tiny_dirs, spec):
    with pytest.raises(AdapterInvalid, match="LoRA rank 16 is greater than max_lora_rank 8; start the server with --max-lora-rank 16"):
        load_adapter_dir(tiny_dirs["adapters"] / "lora-mlp", spec, max_lora_rank=8)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_weights_are_refused(copy, spec, value):
    folder = copy("soft")
    f = folder / "adapter_model.safetensors"
    t = load_file(f)
    t["prompt_embeddings"][0, 0] = value
    save_file(t, f)
    with pytest.raises(AdapterInvalid, match="'prompt_embeddings' contains NaN or Inf"):
        load_adapter_dir(folder, spec, max_lora_rank=64)


def test_huge_finite_weights_are_not_mistaken_for_inf(copy, spec):
    """The fast scan sums each tensor; a sum that overflows must not refuse finite weights."""
    folder = copy("soft")
    f = folder / "adapter_model.safetensors"
    t = load_file(f)
    t["prompt_embeddings"][:2] = 3e38
    save_file(t, f)
    assert load_adapter_dir(folder, spec, max_lora_rank=64).soft_prompt.max() == 3e38


def test_foreign_base_is_incompatible_unless_allowed(copy, spec):
    folder = copy("lora-attn")
    _edit_config(folder, base_model_name_or_path="meta-llama/Llama-3.1-8B")
    with pytest.raises(AdapterIncompatible, match="trained for base 'meta-llama/Llama-3.1-8B'.*--allow-foreign-base"):
        load_adapter_dir(folder, spec, max_lora_rank=64)
    a = load_adapter_dir(folder, spec, max_lora_rank=64, allow_foreign_base=True)
    assert a.warnings and "Llama-3.1-8B" in a.warnings[0]


def test_soft_prompt_of_wrong_width_is_refused(copy, spec):
    folder = copy("soft")
    save_file({"prompt_embeddings": torch.zeros(6, 32)}, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterInvalid, match=r"prompt_embeddings: \(6, 32\), but this base needs \(6, 64\)"):
        load_adapter_dir(folder, spec, max_lora_rank=64)


@pytest.mark.parametrize("name", ["", "Upper", "-x", "a/b", "a..b", "a\x00b", "x" * 65, "é"])
def test_bad_names_are_refused(name):
    with pytest.raises(InvalidName, match="invalid adapter name"):
        parse_model_ref(name)
