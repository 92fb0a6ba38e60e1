"""The engine against plain transformers `generate` + PEFT, on the tiny model."""
from __future__ import annotations

import asyncio

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from hotpeft.server.config import Settings
from hotpeft.server.engine.base import GenerationRequest, SamplingParams
from hotpeft.server.runtime import build_runtime

ADAPTERS = [None, "lora-attn", "lora-mlp", "soft"]


@pytest.fixture(scope="module")
def rt(tiny_dirs, tmp_path_factory):
    settings = Settings(model=str(tiny_dirs["base"]), adapters_dir=tiny_dirs["adapters"], dtype="float32",
                        home=tmp_path_factory.mktemp("engine-home"))
    runtime = build_runtime(settings)
    runtime.engine.start()
    yield runtime
    runtime.engine.stop()


def reference_tokens(tiny_dirs, adapter: str | None, prompt: list[int], n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["base"], dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, tiny_dirs["adapters"] / adapter)
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


async def _tokens(rt, request: GenerationRequest) -> list[int]:
    toks = []
    async for ev in rt.engine.generate(request):
        toks += ev.token_ids
    return toks


def run_tokens(rt, adapter: str | None, prompt: list[int], n: int, **sampling) -> list[int]:
    av = rt.catalog.resolve(adapter).adapter if adapter else None
    params = SamplingParams(max_tokens=n, **({"temperature": 0.0} | sampling))
    return asyncio.run(_tokens(rt, GenerationRequest(prompt, params, av)))


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_greedy_tokens_equal_generate_with_peft(rt, tiny_dirs, adapter):
    prompt = rt.tokenizer("The quick brown fox")["input_ids"]
    ours = run_tokens(rt, adapter, prompt, 24)
    assert ours == reference_tokens(tiny_dirs, adapter, prompt, 24)


def test_each_adapter_changes_the_output(rt):
    prompt = rt.tokenizer("The quick brown fox")["input_ids"]
    outs = {a: tuple(run_tokens(rt, a, prompt, 12)) for a in ADAPTERS}
    assert len(set(outs.values())) == len(ADAPTERS)


def test_serving_adapters_leaves_the_base_untouched(rt, tiny_dirs):
    prompt = rt.tokenizer("hello")["input_ids"]
    before = run_tokens(rt, None, prompt, 16)
    for a in ADAPTERS[1:]:
        run_tokens(rt, a, prompt, 4)
    assert run_tokens(rt, None, prompt, 16) == before == reference_tokens(tiny_dirs, None, prompt, 16)


def test_rows_of_different_adapters_in_one_forward_equal_each_alone(rt):
    """The gathered-bmm LoRA path: one batch with base, two LoRAs; each row as if run alone."""
    runner = rt.engine.runner
    for name in ("lora-attn", "lora-mlp"):
        runner.make_resident(rt.catalog.resolve(name).adapter)
    keys = [None, rt.catalog.resolve("lora-attn").adapter.key, rt.catalog.resolve("lora-mlp").adapter.key]
    ids = torch.tensor([rt.tokenizer("same prompt here")["input_ids"]] * 3)
    with torch.inference_mode():
        runner.bank.set_rows(keys)
        together = runner.model(input_ids=ids).logits
        for i, k in enumerate(keys):
            runner.bank.set_rows([k])
            alone = runner.model(input_ids=ids[i:i + 1]).logits
            torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-5, atol=1e-5)
        runner.bank.set_rows([None])
    assert not torch.allclose(together[0], together[1]) and not torch.allclose(together[1], together[2])


def test_same_seed_same_sample(rt):
    prompt = rt.tokenizer("seeded")["input_ids"]
    a = run_tokens(rt, "lora-attn", prompt, 16, temperature=1.0, seed=7)
    b = run_tokens(rt, "lora-attn", prompt, 16, temperature=1.0, seed=7)
    c = run_tokens(rt, "lora-attn", prompt, 16, temperature=1.0, seed=8)
    assert a == b and a != c


def test_cancelled_request_frees_the_engine(rt):
    prompt = rt.tokenizer("cancel me")["input_ids"]

    async def scenario():
        gen = rt.engine.generate(GenerationRequest(prompt, SamplingParams(max_tokens=200, temperature=0.0)))
        await gen.__anext__()
        await gen.aclose()  # the client went away
        # The next request can only run once the engine has dropped the cancelled one.
        nxt = [t async for ev in rt.engine.generate(GenerationRequest(prompt, SamplingParams(max_tokens=3, temperature=0.0)))
               for t in ev.token_ids]
        return nxt

    assert len(asyncio.run(scenario())) == 3
    stats = rt.engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["alive"]


def test_failure_in_one_request_does_not_stop_the_engine(rt):
    prompt = rt.tokenizer("ok")["input_ids"]
    bad = GenerationRequest([10**9], SamplingParams(max_tokens=2, temperature=0.0))  # id beyond the vocabulary

    async def scenario():
        with pytest.raises(Exception, match="generation failed"):
            async for _ in rt.engine.generate(bad):
                pass
        return [t async for ev in rt.engine.generate(GenerationRequest(prompt, SamplingParams(max_tokens=2, temperature=0.0)))
                for t in ev.token_ids]

    assert len(asyncio.run(scenario())) == 2
