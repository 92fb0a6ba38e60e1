"""The engine's device tier: its budget counts the bytes the LoRA stacks really hold (every slot
padded to its group's largest rank), and its stats can be read from any thread while it changes."""
from __future__ import annotations

import asyncio
import sys
import threading

import pytest

import tiny
from hotpeft.server.config import Settings
from hotpeft.server.engine.interface import EngineFailure
from hotpeft.server.runtime import build_runtime

from test_engine import make_request, run_tokens

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL = [f"r8-{i}" for i in range(4)]


@pytest.fixture(scope="module")
def ranked(tiny_dirs, tmp_path_factory):
    """Four rank-8 LoRAs and one rank-64 LoRA on every projection."""
    folder = tmp_path_factory.mktemp("ranked")
    for i, name in enumerate(SMALL):
        tiny.save_lora(tiny_dirs["base"], folder / name, r=8, targets=ALL, seed=40 + i)
    tiny.save_lora(tiny_dirs["base"], folder / "r64", r=64, targets=ALL, seed=50)
    return folder


def runtime(tiny_dirs, ranked, tmp_path_factory, budget: int):
    rt = build_runtime(Settings(model=str(tiny_dirs["base"]), adapters_dir=ranked, dtype="float32",
                                home=tmp_path_factory.mktemp("tier-home"), max_resident_adapter_bytes=budget))
    rt.engine.start()
    return rt


def tensor_bytes(rt) -> int:
    """What the stacks' tensors take, measured on the tensors themselves."""
    return sum(t.numel() * t.element_size() for g in rt.engine.runner.bank.groups.values() for t in (g.A, g.Bt))


def resident(rt) -> list[str]:
    return sorted(k.split("@")[0] for k in rt.engine.residency().device)


@pytest.fixture(scope="module")
def unit(tiny_dirs, ranked, tmp_path_factory):
    """The stack bytes of one rank-8 adapter alone, and of the rank-64 one alone."""
    rt = runtime(tiny_dirs, ranked, tmp_path_factory, 1 << 30)
    try:
        bank = rt.engine.runner.bank
        return {a: bank.stack_bytes_alone(make_request(rt, a, [1], 1).adapter.adapter.lora) for a in ("r8-0", "r64")}
    finally:
        rt.engine.stop()


def test_the_stacks_hold_every_slot_at_the_largest_rank(unit):
    assert unit["r64"] == 8 * unit["r8-0"]


def test_a_rank_64_adapter_beyond_the_budget_is_refused_and_the_small_ones_stay(tiny_dirs, ranked, tmp_path_factory,
                                                                               unit):
    budget = 4 * unit["r8-0"]  # exactly four rank-8 adapters' stacks
    rt = runtime(tiny_dirs, ranked, tmp_path_factory, budget)
    try:
        prompt = rt.tokenizer("budget")["input_ids"]
        for a in SMALL:
            assert len(run_tokens(rt, a, prompt, 3)) == 3
            assert tensor_bytes(rt) <= budget
        assert resident(rt) == SMALL and tensor_bytes(rt) == budget
        with pytest.raises(EngineFailure, match=f"--max-resident-adapter-bytes {budget}"):
            run_tokens(rt, "r64", prompt, 3)
        assert resident(rt) == SMALL and tensor_bytes(rt) <= budget
        stats = rt.engine.stats()
        assert stats.resident_lora_bytes == tensor_bytes(rt) and stats.max_resident_lora_bytes == budget
        assert stats.adapters.load_failures == 1
    finally:
        rt.engine.stop()


def test_a_rank_64_adapter_evicts_as_many_small_ones_as_its_padding_needs(tiny_dirs, ranked, tmp_path_factory, unit):
    budget = unit["r64"]  # one rank-64 slot, or eight rank-8 ones
    rt = runtime(tiny_dirs, ranked, tmp_path_factory, budget)
    try:
        prompt = rt.tokenizer("padding")["input_ids"]
        for a in SMALL:
            run_tokens(rt, a, prompt, 3)
        assert resident(rt) == SMALL and tensor_bytes(rt) == 4 * unit["r8-0"]
        # Next to any rank-8 adapter its slot would be padded to rank 64 too: all four must go.
        expected = run_tokens(rt, "r64", prompt, 6)
        assert resident(rt) == ["r64"] and tensor_bytes(rt) == budget
        # And back: a rank-8 adapter beside it would take a second rank-64 slot, so it goes, and the stacks shrink.
        run_tokens(rt, "r8-0", prompt, 3)
        assert resident(rt) == ["r8-0"] and tensor_bytes(rt) == unit["r8-0"]
        assert run_tokens(rt, "r64", prompt, 6) == expected  # evicted and reloaded: the same tokens
        assert rt.engine.stats().adapters.evictions == 6
        listed = rt.engine.stats()
        assert listed.resident_lora_bytes == tensor_bytes(rt) <= budget
    finally:
        rt.engine.stop()


class Watched(dict):
    """A dict that notes the name of every thread that reads or writes it."""

    def __init__(self, *args):
        super().__init__(*args)
        self.threads: set[str] = set()

    def _seen(name):  # noqa: N805 - builds the methods below
        def method(self, *args, **kwargs):
            self.threads.add(threading.current_thread().name)
            return getattr(dict, name)(self, *args, **kwargs)
        return method

    for _name in ("__iter__", "__len__", "__contains__", "__getitem__", "__setitem__", "__delitem__", "get", "pop",
                  "keys", "values", "items"):
        locals()[_name] = _seen(_name)
    del _name, _seen


def test_stats_are_read_safely_while_the_engine_loads_and_unloads(tiny_dirs, ranked, tmp_path_factory):
    """`/metrics` and `/dashboard/data` read the engine's stats from other threads while its worker
    changes what is resident: every read succeeds, and none of them touches the worker's own
    state (the resident-adapter table is only ever used by the engine's thread)."""
    rt = runtime(tiny_dirs, ranked, tmp_path_factory, 1 << 30)
    bank = rt.engine.runner.bank
    bank.adapters = Watched(bank.adapters)
    versions = [make_request(rt, a, [1], 1).adapter for a in SMALL]
    errors: list[BaseException] = []
    reads = [0]
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                stats = rt.engine.stats()
                held = rt.engine.residency()
                assert 0 <= stats.resident_loras <= len(SMALL) and held.pinned <= held.device | held.pinned
                rt.metrics.render()
                reads[0] += 1
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    async def churn():
        for _ in range(25):
            for v in versions:
                await rt.engine.load(v, pin=True)
            await rt.engine.unload({v.key for v in versions})

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    threads = [threading.Thread(target=reader, name=f"reader-{i}") for i in range(2)]
    try:
        for t in threads:
            t.start()
        asyncio.run(churn())
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(old)
        rt.engine.stop()
    assert not errors, errors[0]
    assert reads[0] > 0 and rt.engine.residency().device == frozenset()
    assert bank.adapters.threads == {"hotpeft-engine"}
