"""The engine on a CUDA device (skipped without one; `scripts/gpu-check.sh` runs these on a GPU).

Greedy tokens equal transformers + PEFT on the same device and dtype: in float32 exactly, alone and
in a mixed batch, with a prefix-cache hit and with a pool small enough to preempt; in bfloat16 the
first tokens (kernels differ between the two paths, so long greedy runs may part on near-ties); on
nf4 and int8 bases the engine runs every adapter kind and a LoRA on them equals PEFT's on the same
quantized base.
"""
from __future__ import annotations

import asyncio

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import tiny
from hotpeft.model.load import eos_ids, load_base
from hotpeft.model.source import ModelSource
from hotpeft.server.config import Settings
from hotpeft.server.engine.kv import PagedKVCache
from hotpeft.server.engine.lora import LoraBank
from hotpeft.server.engine.scheduler import BatchEngine, EngineLimits
from hotpeft.server.runtime import build_runtime
from test_engine import ADAPTERS, _tokens, make_request

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def runtime(tiny_dirs, tmp_path, dtype: str, quantize: str = "none", **settings):
    rt = build_runtime(Settings(model=str(tiny_dirs["base"]), adapters_dir=tiny_dirs["adapters"], dtype=dtype,
                                quantize=quantize, device="cuda", home=tmp_path, max_batch_tokens=16, **settings))
    rt.engine.start()
    return rt


def reference(tiny_dirs, adapter, prompt, n, dtype):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["base"], dtype=dtype).to(CUDA)
    if adapter:
        model = PeftModel.from_pretrained(model, tiny_dirs["adapters"] / adapter).to(CUDA)
    return tiny.greedy_reference(model, prompt, n)


def gather(rt, requests):
    async def scenario():
        return await asyncio.gather(*(_tokens(rt, r) for r in requests))

    return asyncio.run(scenario())


@pytest.fixture(scope="module")
def prompts():
    tok = tiny.make_tokenizer()
    return [tok(t)["input_ids"] for t in ("on the gpu, a longer prompt than one chunk", "second", "a third prompt",
                                          "and the fourth one here")]


def test_float32_equals_peft_alone_mixed_and_with_a_prefix_hit(tiny_dirs, tmp_path, prompts):
    rt = runtime(tiny_dirs, tmp_path, "float32")
    try:
        expected = [reference(tiny_dirs, a, p, 16, torch.float32) for a, p in zip(ADAPTERS, prompts)]
        alone = [gather(rt, [make_request(rt, a, p, 16)])[0] for a, p in zip(ADAPTERS, prompts)]
        mixed = gather(rt, [make_request(rt, a, p, 16) for a, p in zip(ADAPTERS, prompts)])
        again = gather(rt, [make_request(rt, a, p, 16) for a, p in zip(ADAPTERS, prompts)])  # cached prefixes
        assert alone == expected and mixed == expected and again == expected
        assert rt.engine.stats().prefix_hit_tokens > 0
    finally:
        rt.engine.stop()


def test_float32_with_preemption_equals_peft(tiny_dirs, tmp_path, prompts):
    rt = runtime(tiny_dirs, tmp_path, "float32")
    rt.engine.stop()
    base = rt.base
    kv = PagedKVCache(base.arch, 11, 16, torch.float32, CUDA)
    rt.engine = BatchEngine(base.model, base.arch, base.tokenizer, LoraBank(base.arch, torch.float32, CUDA), kv,
                            eos_ids(base), EngineLimits(max_batch_tokens=16), base.max_model_len)
    rt.engine.start()
    try:
        got = gather(rt, [make_request(rt, a, p, 40) for a, p in zip(ADAPTERS, prompts)])
        assert got == [reference(tiny_dirs, a, p, 40, torch.float32) for a, p in zip(ADAPTERS, prompts)]
        assert rt.engine.stats().preemptions > 0 and rt.engine.stats().kv_blocks_free == kv.pool.usable
    finally:
        rt.engine.stop()


def test_bfloat16_first_tokens_equal_peft(tiny_dirs, tmp_path, prompts):
    rt = runtime(tiny_dirs, tmp_path, "bfloat16")
    try:
        for a, p in zip(ADAPTERS, prompts):
            ours = gather(rt, [make_request(rt, a, p, 4)])[0]
            assert ours == reference(tiny_dirs, a, p, 4, torch.bfloat16), a
    finally:
        rt.engine.stop()


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_quantized_bases_serve_every_kind_and_a_lora_equals_peft(tiny_dirs, tmp_path, prompts, quantize):
    rt = runtime(tiny_dirs, tmp_path, "float32", quantize)
    try:
        outs = gather(rt, [make_request(rt, a, prompts[0], 8) for a in ADAPTERS])
        assert len({tuple(t) for t in outs}) == len(ADAPTERS)
        model = load_base(ModelSource("tiny-llama", tiny_dirs["base"]), quantize, device=CUDA,
                          dtype=torch.float32).model
        model = PeftModel.from_pretrained(model, tiny_dirs["adapters"] / "lora-mlp")
        assert outs[ADAPTERS.index("lora-mlp")][:4] == tiny.greedy_reference(model, prompts[0], 4)
    finally:
        rt.engine.stop()


def test_cuda_graphs_give_the_eager_tokens(tiny_dirs, tmp_path, prompts):
    """--compile on (decode steps replayed from CUDA graphs) against --compile off, mixed adapters,
    bfloat16: the first tokens (the two paths split the attention's reduction differently, so long
    greedy runs may part on near-ties)."""
    outs = {}
    for mode in ("off", "on"):
        rt = runtime(tiny_dirs, tmp_path / mode, "bfloat16", compile=mode)
        try:
            outs[mode] = gather(rt, [make_request(rt, a, p, 6) for a, p in zip(ADAPTERS, prompts)])
            if mode == "on":
                graphs = rt.engine.runner.graphs
                attention = rt.engine.runner.step_fn.attention.name
                assert graphs is not None, f"no CUDA graphs: the attention kernel here is {attention}"
                assert graphs.mode == "cuda-graphs" and graphs.captures > 0, "capturing failed (see the log)"
        finally:
            rt.engine.stop()
    assert outs["on"] == outs["off"]


def test_fixed_shape_decode_equals_peft_in_float32(tiny_dirs, tmp_path, prompts):
    """The code the graphs capture, run eagerly on the GPU in float32: PEFT's tokens exactly."""
    rt = runtime(tiny_dirs, tmp_path, "float32")
    base = rt.base
    kv = PagedKVCache(base.arch, 64, 16, torch.float32, CUDA)
    rt.engine.stop()
    rt.engine = BatchEngine(base.model, base.arch, base.tokenizer, LoraBank(base.arch, torch.float32, CUDA), kv,
                            eos_ids(base), EngineLimits(max_batch_tokens=16, graphs="static"), base.max_model_len)
    rt.engine.start()
    try:
        got = gather(rt, [make_request(rt, a, p, 16) for a, p in zip(ADAPTERS, prompts)])
        assert got == [reference(tiny_dirs, a, p, 16, torch.float32) for a, p in zip(ADAPTERS, prompts)]
    finally:
        rt.engine.stop()


def test_logprobs_grammar_and_penalty_rows_beside_plain_ones_on_the_gpu(tiny_dirs, tmp_path, prompts):
    """float32 on CUDA, with decode steps captured: plain rows keep PEFT's tokens beside constrained,
    logprob and penalized rows; logprobs equal log_softmax of PEFT's logits; the JSON parses."""
    import json

    from hotpeft.server.structured import from_schema

    rt = runtime(tiny_dirs, tmp_path, "float32", compile="on")
    try:
        schema = from_schema({"type": "object", "properties": {"a": {"type": "integer", "maximum": 99}},
                              "required": ["a"], "additionalProperties": False}, "schema", 1 << 15)
        plain = [make_request(rt, a, p, 12) for a, p in zip(ADAPTERS, prompts)]
        asking = make_request(rt, "lora-attn", prompts[1], 12, logprobs=3)
        others = [make_request(rt, "lora-mlp", prompts[2], 30, grammar=schema), asking,
                  make_request(rt, "soft", prompts[3], 12, presence_penalty=1.0, frequency_penalty=0.5)]
        events = []

        async def collect(request):
            async for ev in rt.engine.generate(request):
                events.append((request.request_id, ev))

        async def scenario():
            return await asyncio.gather(*(_tokens(rt, r) for r in plain), *(collect(r) for r in others))

        got = asyncio.run(scenario())[:len(plain)]
        assert got == [reference(tiny_dirs, a, p, 12, torch.float32) for a, p in zip(ADAPTERS, prompts)]
        constrained = [t for rid, ev in events if rid == others[0].request_id for t in ev.token_ids]
        assert json.loads(rt.tokenizer.decode(constrained, skip_special_tokens=True))["a"] <= 99
        entries = [e for rid, ev in events if rid == asking.request_id for e in ev.logprobs or []]
        model = AutoModelForCausalLM.from_pretrained(tiny_dirs["base"], dtype=torch.float32).to(CUDA)
        model = PeftModel.from_pretrained(model, tiny_dirs["adapters"] / "lora-attn").to(CUDA)
        ids = prompts[1] + [e[0] for e in entries]
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=torch.tensor([ids], device=CUDA)).logits[0].float(), -1)
        for j, (token, lp, top) in enumerate(entries):
            assert abs(lp - ref[len(prompts[1]) - 1 + j, token].item()) < 1e-3 and top[0][0] == token
    finally:
        rt.engine.stop()
