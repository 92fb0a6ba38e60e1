"""Decode steps at fixed shapes (`graphs.py`): the code a CUDA graph captures, run on the CPU,
gives the dynamic step's tokens."""
from __future__ import annotations

import torch

import tiny
from hotpeft.model.load import eos_ids
from hotpeft.server.engine.graphs import DecodeGraphs, buckets
from hotpeft.server.engine.kv import PagedKVCache
from hotpeft.server.engine.lora import LoraBank
from hotpeft.server.engine.scheduler import BatchEngine, EngineLimits
from test_engine import ADAPTERS, make_request, make_runtime, reference_tokens
from test_paged_kv import assert_pool_whole, gather

CPU = torch.device("cpu")


def engine_with(tiny_dirs, tmp_path_factory, graphs: str | None, n_blocks: int = 64):
    rt = make_runtime(tiny_dirs, tmp_path_factory)
    base = rt.base
    kv = PagedKVCache(base.arch, n_blocks, 16, torch.float32, CPU)
    rt.engine = BatchEngine(base.model, base.arch, base.tokenizer, LoraBank(base.arch, torch.float32, CPU), kv,
                            eos_ids(base), EngineLimits(max_batch_tokens=16, max_num_seqs=8, graphs=graphs),
                            base.max_model_len)
    rt.engine.start()
    return rt


def count_static_steps(rt, monkeypatch) -> list[int]:
    sizes = []
    graphs: DecodeGraphs = rt.engine.runner.graphs
    real = graphs._forward
    monkeypatch.setattr(graphs, "_forward", lambda ints: sizes.append(ints.shape[0]) or real(ints))
    return sizes


def test_buckets_cover_every_batch_size():
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert buckets(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 100]


def test_fixed_shape_decode_gives_the_dynamic_steps_tokens(tiny_dirs, tmp_path_factory, monkeypatch):
    tok = tiny.make_tokenizer()
    prompts = [tok(t)["input_ids"] for t in ("a captured step", "pads its rows up to a bucket of eight",
                                             "and reads the null block", "for the rows that are not there")]
    rt = engine_with(tiny_dirs, tmp_path_factory, "static")
    try:
        sizes = count_static_steps(rt, monkeypatch)
        # three rows (a bucket of 4 with one padded row), then mixed adapters in one batch
        got = gather(rt, [make_request(rt, a, p, 24) for a, p in zip(ADAPTERS[:3], prompts)])
        assert got == [reference_tokens(tiny_dirs, a, p, 24) for a, p in zip(ADAPTERS[:3], prompts)]
        mixed = gather(rt, [make_request(rt, a, p, 20) for a, p in zip(ADAPTERS, prompts)])
        assert mixed == [reference_tokens(tiny_dirs, a, p, 20) for a, p in zip(ADAPTERS, prompts)]
        assert sizes, "no decode step ran at a fixed shape"
        width = rt.engine.runner.graphs.width
        assert {n // (3 + width) for n in sizes} <= {1, 2, 4}  # rows padded up to the buckets
        assert_pool_whole(rt)
    finally:
        rt.engine.stop()


def test_fixed_shape_decode_follows_adapters_loaded_between_steps(tiny_dirs, tmp_path_factory):
    tok = tiny.make_tokenizer()
    prompt = tok("the stacks change under the graphs")["input_ids"]
    rt = engine_with(tiny_dirs, tmp_path_factory, "static")
    try:
        before = rt.engine.runner.bank.generation
        for adapter in ("lora-attn", "lora-mlp", None, "lora-attn"):
            assert gather(rt, [make_request(rt, adapter, prompt, 12)])[0] == reference_tokens(tiny_dirs, adapter,
                                                                                               prompt, 12)
        assert rt.engine.runner.bank.generation > before  # the layout changed between those requests
    finally:
        rt.engine.stop()


def test_compiled_fixed_shape_decode_gives_peft_tokens(tiny_dirs, tmp_path_factory, monkeypatch):
    """--compile on the CPU: the fixed-shape step through torch.compile (about 20 s on the tiny model)."""
    tok = tiny.make_tokenizer()
    prompt = tok("compiled once per bucket")["input_ids"]
    rt = engine_with(tiny_dirs, tmp_path_factory, "compile")
    try:
        assert rt.engine.runner.graphs.compiled is not None
        got = gather(rt, [make_request(rt, a, prompt, 8) for a in (None, "lora-attn")])
        assert got == [reference_tokens(tiny_dirs, a, prompt, 8) for a in (None, "lora-attn")]
    finally:
        rt.engine.stop()
