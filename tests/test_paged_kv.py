"""The paged KV cache: preemption when blocks run out, the prefix cache and its isolation between
weights, block accounting, and the limits a request meets at the API — on the tiny model, float32."""
from __future__ import annotations

import asyncio
from dataclasses import replace

import httpx
import pytest
import torch

import tiny
from hotpeft.model.load import eos_ids
from hotpeft.server.engine.blocks import BlockPool, chain_hashes
from hotpeft.server.engine.kv import PagedKVCache
from hotpeft.server.engine.lora import LoraBank
from hotpeft.server.engine.scheduler import BatchEngine, EngineLimits
from test_engine import ADAPTERS, _tokens, make_request, make_runtime, reference_tokens

CPU = torch.device("cpu")


def with_pool(tiny_dirs, tmp_path_factory, n_blocks: int, prefix_cache: bool = True, **limits):
    """A runtime whose engine has a pool of `n_blocks` 16-token blocks (null block included)."""
    rt = make_runtime(tiny_dirs, tmp_path_factory)
    base = rt.base
    kv = PagedKVCache(base.arch, n_blocks, 16, torch.float32, CPU, prefix_cache)
    rt.engine = BatchEngine(base.model, base.arch, base.tokenizer, LoraBank(base.arch, torch.float32, CPU), kv,
                            eos_ids(base), EngineLimits(max_batch_tokens=16, **limits), base.max_model_len)
    rt.engine.start()
    return rt


def gather(rt, requests):
    async def scenario():
        return await asyncio.gather(*(_tokens(rt, r) for r in requests))

    return asyncio.run(scenario())


def assert_pool_whole(rt):
    pool = rt.engine.kv.pool
    pool.check()
    stats = rt.engine.stats()
    assert stats.kv_blocks_free == stats.kv_blocks == pool.usable and stats.running == 0 and stats.preempted == 0


@pytest.fixture(scope="module")
def prompts(tiny_dirs):
    tok = tiny.make_tokenizer()
    texts = ["a pool too small for all of us", "preempt the newest first", "resume with the same tokens",
             "four rows and a little memory"]
    return [tok(t)["input_ids"] for t in texts]


def test_a_pool_too_small_preempts_and_resumes_with_the_same_tokens(tiny_dirs, tmp_path_factory, prompts):
    # 4 rows x (about 30 prompt + 40 generated tokens) need about 20 blocks; the pool has 10.
    rt = with_pool(tiny_dirs, tmp_path_factory, n_blocks=11)
    try:
        adapters = ADAPTERS
        requests = [make_request(rt, a, p, 40) for a, p in zip(adapters, prompts)]
        got = gather(rt, requests)
        expected = [reference_tokens(tiny_dirs, a, p, 40) for a, p in zip(adapters, prompts)]
        assert got == expected
        assert rt.engine.stats().preemptions > 0
        assert_pool_whole(rt)
    finally:
        rt.engine.stop()


def test_prefix_cache_reuses_only_the_kv_of_the_same_weights(tiny_dirs, tmp_path_factory):
    """The same long prompt to the base, two LoRAs, a soft prompt, and 'another version' of a LoRA
    (same name, other weights): each answer equals that model's own answer with the cache off."""
    tok = tiny.make_tokenizer()
    prompt = tok("a shared system prompt that is long enough to fill several blocks of sixteen tokens, " * 2)["input_ids"]
    cached = with_pool(tiny_dirs, tmp_path_factory, n_blocks=64)
    plain = with_pool(tiny_dirs, tmp_path_factory, n_blocks=64, prefix_cache=False)
    try:
        def ask(rt, adapter, version_of=None):
            request = make_request(rt, adapter, prompt, 12)
            if version_of is not None:  # the weights of `version_of` under the key of a new version of `adapter`
                other = make_request(rt, version_of, prompt, 12).adapter
                request = replace(request, adapter=replace(other, key=request.adapter.key.split("@")[0] + "@99"))
            return asyncio.run(_tokens(rt, request))

        order = [(None, None), ("lora-attn", None), ("lora-mlp", None), ("lora-attn", "lora-mlp"), ("soft", None),
                 (None, None), ("lora-attn", None)]
        answers = [ask(cached, a, v) for a, v in order]
        expected = [ask(plain, a, v) for a, v in order]
        assert answers == expected
        assert answers[0] != answers[1] != answers[2] and answers[3] == answers[2]
        stats = cached.engine.stats()
        # Hits only for the repeats of the base and lora-attn: full blocks of the prompt, twice.
        full = (len(prompt) - 1) // 16 * 16
        assert stats.prefix_hit_tokens == 2 * full, stats
        assert plain.engine.stats().prefix_hit_tokens == 0
        assert_pool_whole(cached)
        assert cached.engine.stats().kv_blocks_cached > 0  # freed, still cached for later prompts
    finally:
        cached.engine.stop()
        plain.engine.stop()


def test_prefix_hit_equals_peft_with_chunked_prefill(tiny_dirs, tmp_path_factory):
    tok = tiny.make_tokenizer()
    system = tok("You are a terse assistant. Answer in one word, always, whatever the question is. ")["input_ids"]
    rt = with_pool(tiny_dirs, tmp_path_factory, n_blocks=64)
    try:
        for adapter in ADAPTERS:
            first = asyncio.run(_tokens(rt, make_request(rt, adapter, system + tok("Why?")["input_ids"], 10)))
            hits = rt.engine.stats().prefix_hit_tokens
            prompt = system + tok("Where to?")["input_ids"]
            second = asyncio.run(_tokens(rt, make_request(rt, adapter, prompt, 10)))
            assert rt.engine.stats().prefix_hit_tokens > hits, adapter
            assert second == reference_tokens(tiny_dirs, adapter, prompt, 10), adapter
            assert first
    finally:
        rt.engine.stop()


def test_blocks_return_to_the_pool_after_finish_cancel_preemption_and_failure(tiny_dirs, tmp_path_factory, prompts,
                                                                              monkeypatch):
    rt = with_pool(tiny_dirs, tmp_path_factory, n_blocks=11)
    try:
        async def scenario():
            streams = [rt.engine.generate(make_request(rt, a, p, 40)) for a, p in zip(ADAPTERS, prompts)]
            first = await streams[1].__anext__()
            await streams[1].aclose()  # a client that goes away mid-stream cancels its request
            rest = await asyncio.gather(*(_drain(s) for i, s in enumerate(streams) if i != 1))
            return first, rest

        first, rest = asyncio.run(scenario())
        assert first.token_ids and all(len(r) == 40 for r in rest)
        assert_pool_whole(rt)

        calls = {"n": 0}
        forward = rt.engine.runner.step_fn.forward

        def failing(step):
            calls["n"] += 1
            if calls["n"] == 5:
                raise RuntimeError("injected")
            return forward(step)

        monkeypatch.setattr(rt.engine.runner.step_fn, "forward", failing)
        results = asyncio.run(_settle(rt, [make_request(rt, a, p, 30) for a, p in zip(ADAPTERS, prompts)]))
        assert any(isinstance(r, Exception) for r in results)
        assert_pool_whole(rt)
    finally:
        rt.engine.stop()


async def _drain(stream):
    return [t async for ev in stream for t in ev.token_ids]


async def _settle(rt, requests):
    return await asyncio.gather(*(_tokens(rt, r) for r in requests), return_exceptions=True)


def test_block_pool_lru_and_chain_hashes():
    pool = BlockPool(5, 4)
    a = chain_hashes("base", list(range(8)), 4)
    b = chain_hashes("lora@1", list(range(8)), 4)
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]  # the same tokens under other weights: other names
    assert chain_hashes("base", list(range(8)), 4, 1, a[0]) == a[1:]
    blocks = pool.allocate(2)
    for blk, h in zip(blocks, a):
        pool.commit(blk, h)
    pool.release(blocks)
    assert pool.n_free == 4 and pool.match(b) == [] and pool.match(a) == blocks
    pool.release(blocks)
    # Reuse takes uncached blocks first, then the cached ones, the sequence's last block before its first.
    taken = pool.allocate(3)
    assert taken[:2] == [3, 4] and taken[2] == blocks[1] and pool.counters.evictions == 1
    assert pool.match(a) == [blocks[0]]  # the first block is still cached; the chain breaks after it
    pool.release([blocks[0]])
    pool.release(taken)
    pool.check()
    with pytest.raises(MemoryError):
        pool.allocate(5)


def test_a_request_larger_than_the_kv_pool_is_a_400_naming_both_numbers(tmp_path):
    from hotpeft.server.tools.localserver import LocalServer

    base = tiny.save_tiny_model(tmp_path / "tiny-2k", max_positions=2048)
    # 1 MiB holds 127 blocks of 16 tokens (8 KiB each in float32) beside the null block: 2032 tokens < 2048.
    with LocalServer(["--model", str(base), "--dtype", "float32", "--kv-cache-mib", "1"], tmp_path / "log",
                     {"HOTPEFT_HOME": str(tmp_path / "home")}) as server:
        log = server.log_text()
        assert "less than one sequence of --max-model-len 2048" in log
        r = httpx.post(server.url + "/v1/completions", json={"model": "tiny-2k", "prompt": "x" * 40, "max_tokens": 2000},
                       timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert "holds 2032 tokens" in err["message"] and "--kv-cache-mib" in err["message"]
        assert err["param"] == "max_tokens"
        ok = httpx.post(server.url + "/v1/completions", json={"model": "tiny-2k", "prompt": "x" * 40, "max_tokens": 5},
                        timeout=60)
        assert ok.status_code == 200, ok.text
        metrics = httpx.get(server.url + "/metrics", timeout=30).text
        assert "hotpeft_kv_cache_blocks 127.0" in metrics and "hotpeft_preemptions_total 0.0" in metrics


@pytest.mark.parametrize("graphs", [None, "static"])
def test_a_step_copies_device_to_host_once(tiny_dirs, tmp_path_factory, prompts, monkeypatch, graphs):
    """Mixed rows (LoRAs, a soft prompt, prefill chunks and decode, greedy and sampled, with logits
    processors): the step's
    only device -> host read is the sampled tokens' one `tolist()`; also when decode steps run at
    fixed shapes (the code CUDA graphs capture)."""
    rt = with_pool(tiny_dirs, tmp_path_factory, n_blocks=64, graphs=graphs)
    rt.engine.stop()  # steps are driven by hand below, on this thread
    engine, reads, fixed = rt.engine, [], []
    if graphs:
        real = engine.runner.graphs._forward
        monkeypatch.setattr(engine.runner.graphs, "_forward", lambda ints: fixed.append(1) or real(ints))
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **k):
            reads.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    with torch.inference_mode():
        for i, (a, p) in enumerate(zip(ADAPTERS, prompts)):
            sampling = {"temperature": 0.8, "seed": 1} if i % 2 else {}
            if i == 2:  # logits processors too: penalties with their device state, a bias
                sampling |= {"frequency_penalty": 0.5, "repetition_penalty": 1.2, "logit_bias": ((5, 1.0),)}
            request = make_request(rt, a, p, 8, **sampling)
            assert engine._admit(request, _Sink())
        per_step = []
        for _ in range(12):
            reads.clear()
            takes = engine._reserve()
            engine.runner.run(list(engine._running), takes)
            per_step.append(list(reads))
    # Steps where no row finished its prompt sample nothing and read nothing back.
    assert all(r in ([], ["tolist"]) for r in per_step), per_step
    assert per_step[-1] == ["tolist"] and per_step[0] == []
    assert bool(fixed) == bool(graphs)  # with graphs, the decode-only steps ran at fixed shapes


class _Sink:
    def put(self, event):
        pass
