"""The engine against plain transformers `generate` + PEFT, on the tiny model."""
from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import tiny
from hotpeft.server.config import Settings
from hotpeft.server.engine import lora_plan
from hotpeft.server.engine.interface import EngineFailure, GenerationRequest, Overloaded, SamplingParams
from hotpeft.server.engine.lora import LoraBank
from hotpeft.server.runtime import build_runtime

ADAPTERS = [None, "lora-attn", "lora-mlp", "soft"]


@pytest.fixture(scope="module")
def rt(tiny_dirs, tmp_path_factory):
    runtime = make_runtime(tiny_dirs, tmp_path_factory, max_batch_tokens=16)
    runtime.engine.start()
    yield runtime
    runtime.engine.stop()


def make_runtime(tiny_dirs, tmp_path_factory, **settings):
    # max_batch_tokens=16: prompts longer than that are prefilled in chunks, next to decoding rows.
    return build_runtime(Settings(model=str(tiny_dirs["base"]), adapters_dir=tiny_dirs["adapters"], dtype="float32",
                                  home=tmp_path_factory.mktemp("engine-home"), **settings))


def reference_tokens(tiny_dirs, adapter: str | None, prompt: list[int], n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["base"], dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, tiny_dirs["adapters"] / adapter)
    return tiny.greedy_reference(model, prompt, n)


async def _tokens(rt, request: GenerationRequest) -> list[int]:
    toks = []
    async for ev in rt.engine.generate(request):
        toks += ev.token_ids
    return toks


def make_request(rt, adapter: str | None, prompt: list[int], n: int, **sampling) -> GenerationRequest:
    av = rt.catalog.load(rt.catalog.resolve(adapter).record) if adapter else None
    return GenerationRequest(prompt, SamplingParams(max_tokens=n, **({"temperature": 0.0} | sampling)), av)


def run_tokens(rt, adapter: str | None, prompt: list[int], n: int, **sampling) -> list[int]:
    return asyncio.run(_tokens(rt, make_request(rt, adapter, prompt, n, **sampling)))


def run_together(rt, requests: list[GenerationRequest]) -> list[list[int]]:
    async def scenario():
        return await asyncio.gather(*(_tokens(rt, r) for r in requests))

    return asyncio.run(scenario())


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


def test_same_seed_same_sample(rt):
    prompt = rt.tokenizer("seeded")["input_ids"]
    a = run_tokens(rt, "lora-attn", prompt, 16, temperature=1.0, seed=7)
    b = run_tokens(rt, "lora-attn", prompt, 16, temperature=1.0, seed=7)
    c = run_tokens(rt, "lora-attn", prompt, 16, temperature=1.0, seed=8)
    assert a == b and a != c


def test_cancelled_request_frees_the_engine(rt):
    """A client that goes away after its first token: its row stops within a few steps and is freed."""
    prompt = rt.tokenizer("cancel me")["input_ids"]
    tokens_before = rt.engine.stats().tokens

    async def scenario():
        gen = rt.engine.generate(GenerationRequest(prompt, SamplingParams(max_tokens=200, temperature=0.0)))
        await gen.__anext__()
        await gen.aclose()  # the client went away
        nxt = [t async for ev in rt.engine.generate(GenerationRequest(prompt, SamplingParams(max_tokens=3, temperature=0.0)))
               for t in ev.token_ids]
        return nxt

    assert len(asyncio.run(scenario())) == 3
    stats = rt.engine.stats()
    assert stats.running == 0 and stats.waiting == 0 and stats.kv_tokens == 0 and stats.alive
    # 200 tokens were asked for; the cancelled row stopped long before (3 of these are the next request's)
    assert stats.tokens - tokens_before < 100


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


PROMPTS = ["The quick brown fox", "A much longer prompt that needs several prefill chunks of sixteen tokens", "hi",
           "Once upon a time, in a land far away"]


@pytest.mark.parametrize("lora_path", ["span", "bmm"])
def test_mixed_batch_equals_each_request_alone_and_generate(rt, tiny_dirs, monkeypatch, lora_path):
    """Every adapter kind and the base in one batch, prompts of different lengths, long ones chunked;
    the LoRA deltas computed by either of the bank's two paths."""
    monkeypatch.setattr(lora_plan, "BMM_MIN_SAVING", float("inf") if lora_path == "span" else -1.0)
    counts = Counter()
    real_plan = rt.engine.runner.bank.plan

    def plan(*args):
        real_plan(*args)
        counts.update("bmm" if lo.plan.gather is not None else "span" for lo in rt.engine.runner.bank.layouts if lo.plan)

    monkeypatch.setattr(rt.engine.runner.bank, "plan", plan)
    cases = [(a, rt.tokenizer(p)["input_ids"]) for p in PROMPTS for a in ADAPTERS]  # 16 rows at once
    together = run_together(rt, [make_request(rt, a, ids, 20) for a, ids in cases])
    for (adapter, ids), toks in zip(cases, together):
        assert toks == reference_tokens(tiny_dirs, adapter, ids, 20), (adapter, ids)
    assert rt.engine.stats().running == 0
    assert counts[lora_path] > 0  # the path under test did run


def test_requests_joining_a_running_batch_do_not_disturb_it(rt):
    first_prompt = rt.tokenizer(PROMPTS[3])["input_ids"]
    late = [("lora-mlp", rt.tokenizer(PROMPTS[1])["input_ids"]), ("soft", rt.tokenizer(PROMPTS[0])["input_ids"])]
    alone = [run_tokens(rt, "lora-attn", first_prompt, 40)] + [run_tokens(rt, a, ids, 20) for a, ids in late]

    async def scenario():
        first = rt.engine.generate(make_request(rt, "lora-attn", first_prompt, 40))
        toks, others = [], None
        async for ev in first:
            toks += ev.token_ids
            if len(toks) == 5:  # mid-decode: two more requests join the running batch
                others = [asyncio.ensure_future(_tokens(rt, make_request(rt, a, ids, 20))) for a, ids in late]
        return [toks] + [await o for o in others], rt.engine.stats().steps

    steps_before = rt.engine.stats().steps
    got, steps_after = asyncio.run(scenario())
    assert got == alone
    # They joined: 40 decode steps for the first request cover (nearly) all of the others' work.
    assert steps_after - steps_before < 40 + 20


def test_cancelled_requests_release_their_rows(rt):
    prompt = rt.tokenizer("cancel me")["input_ids"]

    async def scenario():
        streams = [rt.engine.generate(make_request(rt, a, prompt, 200)) for a in ADAPTERS]
        for s in streams:
            await s.__anext__()
        busy = rt.engine.stats()
        for s in streams:
            await s.aclose()  # the clients went away
        # The next request can only finish once the engine has seen the cancels.
        nxt = await _tokens(rt, make_request(rt, None, prompt, 3))
        return busy, nxt

    busy, nxt = asyncio.run(scenario())
    assert busy.running == 4 and busy.kv_tokens > 0
    assert len(nxt) == 3
    stats = rt.engine.stats()
    assert (stats.running, stats.waiting, stats.kv_tokens) == (0, 0, 0) and stats.alive


def test_a_lora_released_while_in_use_leaves_when_its_last_request_ends(rt):
    """A deleted (or unloaded) version that running requests use stays for them, then goes: it
    is not left in the engine until some later eviction."""
    prompt = rt.tokenizer("release me")["input_ids"]
    request = make_request(rt, "lora-attn", prompt, 12)
    key = request.adapter.key

    async def scenario():
        stream = rt.engine.generate(request)
        first = await stream.__anext__()
        released = await rt.engine.unload({key})
        during = key in rt.engine.residency().device
        rest = [ev async for ev in stream]
        await _tokens(rt, make_request(rt, None, prompt, 2))  # a later step: the finished row is gone
        return first, released, during, rest

    first, released, during, rest = asyncio.run(scenario())
    assert released == set() and during  # in use: it stays for the running request
    assert sum(len(ev.token_ids) for ev in [first, *rest]) == 12  # which finishes on it
    assert key not in rt.engine.residency().device and key not in rt.engine.residency().pinned


def test_requests_wait_for_a_free_slot_and_a_full_queue_refuses(rt, tiny_dirs, tmp_path_factory):
    rt2 = make_runtime(tiny_dirs, tmp_path_factory, max_num_seqs=2, max_queue=5)
    assert rt2.engine.stats().slots == 2
    prompt = rt2.tokenizer("queue")["input_ids"]
    requests = [make_request(rt2, a, prompt, 8) for a in ADAPTERS + ["lora-attn"]]
    expected = [run_tokens(rt, a, prompt, 8) for a in ADAPTERS + ["lora-attn"]]

    async def scenario():
        # The engine is not started yet: everything waits, and the sixth request is refused.
        streams = [rt2.engine.generate(r) for r in requests]
        with pytest.raises(Overloaded, match="--max-queue 5"):
            rt2.engine.generate(make_request(rt2, None, prompt, 8))
        waiting = rt2.engine.stats().waiting
        rt2.engine.start()

        async def drain(s):
            return [t async for ev in s for t in ev.token_ids]

        return waiting, await asyncio.gather(*(drain(s) for s in streams))

    try:
        waiting, outs = asyncio.run(scenario())
    finally:
        rt2.engine.stop()
    assert waiting == 5
    assert outs == expected  # two slots, five requests: the rest waited, nothing was lost or mixed up


def fail_forward_once(rt, monkeypatch, at_call: int, error: BaseException) -> None:
    """The engine's forward pass raises `error` on its `at_call`-th call, and works otherwise."""
    real = rt.engine.runner.step_fn.forward
    calls = {"n": 0}

    def flaky(step):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise error
        return real(step)

    monkeypatch.setattr(rt.engine.runner.step_fn, "forward", flaky)


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(rt, monkeypatch):
    prompt = rt.tokenizer("fault")["input_ids"]
    fail_forward_once(rt, monkeypatch, 3, RuntimeError("injected fault"))
    failed_before = rt.engine.stats().failed_steps

    async def one(adapter):
        try:
            return await _tokens(rt, make_request(rt, adapter, prompt, 10))
        except EngineFailure as e:
            return str(e)

    async def scenario():
        return await asyncio.gather(one(None), one("lora-attn"))

    outs = asyncio.run(scenario())
    assert all(isinstance(o, str) and "injected fault" in o for o in outs)
    assert rt.engine.stats().failed_steps == failed_before + 1
    assert len(run_tokens(rt, "lora-mlp", prompt, 5)) == 5
    assert rt.engine.stats().running == 0


@pytest.mark.parametrize("oom", [torch.OutOfMemoryError, MemoryError])
def test_out_of_memory_in_a_step_is_a_retryable_503_for_its_requests_only(rt, monkeypatch, oom):
    from hotpeft.server.engine.interface import OutOfMemory
    from hotpeft.server.errors import describe

    prompt = rt.tokenizer("memory")["input_ids"]
    fail_forward_once(rt, monkeypatch, 2, oom("injected: out of memory"))

    async def one():
        try:
            return await _tokens(rt, make_request(rt, "lora-attn", prompt, 10))
        except OutOfMemory as e:
            return e

    async def scenario():
        return await asyncio.wait_for(asyncio.gather(one(), one()), 120)

    outs = asyncio.run(scenario())
    assert all(isinstance(o, OutOfMemory) for o in outs)
    status, body = describe(outs[0])
    assert status == 503 and body["error"]["code"] == "out_of_memory" and outs[0].retry_after >= 1
    assert len(run_tokens(rt, "lora-attn", prompt, 5)) == 5  # the engine lives on
    assert rt.engine.stats().alive


def test_stopping_the_engine_fails_what_is_left_instead_of_hanging(tiny_dirs, tmp_path_factory):
    rt3 = make_runtime(tiny_dirs, tmp_path_factory, max_num_seqs=1)
    prompt = rt3.tokenizer("shutdown")["input_ids"]

    async def scenario():
        rt3.engine.start()
        running = rt3.engine.generate(make_request(rt3, None, prompt, 200, ignore_eos=True))
        await running.__anext__()
        waiting = rt3.engine.generate(make_request(rt3, "lora-attn", prompt, 5))
        await asyncio.to_thread(rt3.engine.stop)
        outcomes = []
        for stream in (running, waiting):
            try:
                async for _ in stream:
                    pass
                outcomes.append("finished")
            except EngineFailure as e:
                outcomes.append(str(e))
        with pytest.raises(EngineFailure, match="stopped"):
            rt3.engine.generate(make_request(rt3, None, prompt, 5))
        return outcomes

    outcomes = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert outcomes == ["the server is shutting down"] * 2


def test_resident_loras_stay_within_their_byte_budget_lru_never_evicting_a_running_one(rt, tiny_dirs,
                                                                                       tmp_path_factory):
    modules = {a: make_request(rt, a, [1], 1).adapter.adapter.lora for a in ("lora-attn", "lora-mlp")}
    scratch = LoraBank(rt.base.arch, torch.float32, torch.device("cpu"))
    for a, lora_modules in modules.items():
        scratch.load(a, lora_modules)
    # Room for the stacks of lora-mlp and one lora-attn-sized adapter, not for a third.
    budget = scratch.stack_bytes()
    sizes = {a: scratch.stack_bytes_alone(m) for a, m in modules.items()}
    rt4 = make_runtime(tiny_dirs, tmp_path_factory, max_resident_adapter_bytes=budget)
    rt4.engine.start()
    try:
        prompt = rt4.tokenizer("budget")["input_ids"]
        expected = {a: run_tokens(rt, a, prompt, 6) for a in ("lora-attn", "lora-mlp", "lora-tmpl")}
        seen = []
        for a in ["lora-mlp", "lora-attn", "lora-tmpl", "lora-mlp", "lora-attn"]:
            assert run_tokens(rt4, a, prompt, 6) == expected[a]  # evicted and reloaded: same tokens
            stats = rt4.engine.stats()
            assert stats.resident_lora_bytes <= budget
            seen.append(sorted(k.split("@")[0] for k in rt4.engine.residency().device))
        # Each load evicts the least recently used adapter, and only as many as it must.
        assert seen == [["lora-mlp"], ["lora-attn", "lora-mlp"], ["lora-attn", "lora-tmpl"],
                        ["lora-mlp", "lora-tmpl"], ["lora-attn", "lora-mlp"]]

        async def scenario():
            # lora-mlp runs a long request: loading the two others must not evict it; they take turns.
            long = rt4.engine.generate(make_request(rt4, "lora-mlp", prompt, 60, ignore_eos=True))
            await long.__anext__()
            others = await asyncio.gather(*(_tokens(rt4, make_request(rt4, a, prompt, 6))
                                            for a in ("lora-attn", "lora-tmpl")))
            rest = [t async for ev in long for t in ev.token_ids]
            return others, rest

        others, rest = asyncio.run(scenario())
        assert others == [expected["lora-attn"], expected["lora-tmpl"]] and len(rest) == 59
        assert rt4.engine.stats().resident_lora_bytes <= budget

        too_small = make_runtime(tiny_dirs, tmp_path_factory, max_resident_adapter_bytes=sizes["lora-mlp"] - 1)
        too_small.engine.start()
        with pytest.raises(EngineFailure, match="max-resident-adapter-bytes"):
            run_tokens(too_small, "lora-mlp", prompt, 2)
        too_small.engine.stop()
    finally:
        rt4.engine.stop()
