"""Penalties, logit_bias, min_tokens and stop_token_ids: the formulas on logits, then greedy
decoding in the engine against a loop that applies them to the PEFT model's logits."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import tiny
from hotpeft.server.engine.interface import GenerationRequest, SamplingParams
from hotpeft.server.engine.processors import process
from test_engine import _tokens, make_request, rt  # noqa: F401 - rt: the tiny engine fixture


@dataclass
class Row:  # what `process` reads of a running sequence
    request: GenerationRequest
    ids: list[int]
    generated: int = 0


def row(prompt: list[int], output: list[int], n_virtual: int = 0, **params) -> Row:
    request = GenerationRequest(prompt, SamplingParams(max_tokens=50, **params))
    return Row(request, list(range(-n_virtual, 0)) + prompt + output, len(output))


def test_the_formulas_row_by_row():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 10, generator=gen)
    rows = [row([1, 2], [3, 3, 4], presence_penalty=0.5, frequency_penalty=0.25),
            row([1, 2], [3]),  # asks for nothing: untouched
            row([5, 6], [6, 7], n_virtual=3, repetition_penalty=2.0),
            row([1], [], logit_bias=((8, 100.0), (9, -3.0)), min_tokens=2, stop_token_ids=(4,))]
    got = process(logits, rows, eos_ids={0})
    want = logits.clone()
    want[0, 3] -= 2 * 0.25 + 0.5
    want[0, 4] -= 1 * 0.25 + 0.5
    for t in (5, 6, 7):  # prompt and output tokens, not the soft prompt's virtual ids
        want[2, t] = want[2, t] / 2.0 if want[2, t] > 0 else want[2, t] * 2.0
    want[3, 8] += 100.0
    want[3, 9] -= 3.0
    want[3, 0] = want[3, 4] = float("-inf")  # EOS and the stop token, before min_tokens
    torch.testing.assert_close(got, want)


def test_parameters_cross_a_process_boundary_whole():
    import json

    p = SamplingParams(max_tokens=5, temperature=0.5, stop=("x",), presence_penalty=1.0, frequency_penalty=-0.5,
                       repetition_penalty=1.3, logit_bias=((3, -100.0), (7, 2.5)), min_tokens=2, stop_token_ids=(9,))
    assert SamplingParams.from_wire(json.loads(json.dumps(p.to_wire()))) == p


def test_rows_that_ask_nothing_cost_nothing():
    logits = torch.randn(2, 10)
    assert process(logits, [row([1], [2]), row([3], [])], eos_ids={0}) is logits


def reference(model, prompt: list[int], n: int, p: SamplingParams, eos: set[int]) -> list[int]:
    """Greedy decoding with the processors written out on the model's own logits."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            for t in set(ids):
                if p.repetition_penalty != 1.0:
                    logits[t] = logits[t] / p.repetition_penalty if logits[t] > 0 else logits[t] * p.repetition_penalty
            for t in set(out):
                logits[t] -= out.count(t) * p.frequency_penalty + p.presence_penalty
            for t, b in p.logit_bias:
                logits[t] += b
            if len(out) < p.min_tokens:
                for t in eos | set(p.stop_token_ids):
                    logits[t] = float("-inf")
            token = int(logits.argmax())
            out.append(token)
            ids.append(token)
            if token in p.stop_token_ids:
                break
    return out


CASES = {
    "penalties": dict(presence_penalty=-2.0, frequency_penalty=-1.0),  # negative: repeat more
    "repetition": dict(repetition_penalty=1.8),
    "bias": dict(logit_bias=((65, 30.0), (66, -100.0))),
    "all": dict(presence_penalty=-0.5, frequency_penalty=2.0, repetition_penalty=0.7, logit_bias=((70, 1.5),)),
}


@pytest.mark.parametrize("adapter", [None, "lora-attn"])
def test_greedy_with_processors_equals_the_reference_in_a_mixed_batch(rt, tiny_dirs, adapter):
    tok = tiny.make_tokenizer()
    prompt = tok("the the the repeated words repeat")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["base"], dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, tiny_dirs["adapters"] / adapter)
    requests = [make_request(rt, adapter, prompt, 16, **params) for params in CASES.values()]
    requests.append(make_request(rt, adapter, prompt, 16))  # rows that ask nothing, in the same batch
    requests.append(make_request(rt, "lora-mlp", prompt, 16))

    async def together():
        return await asyncio.gather(*(_tokens(rt, r) for r in requests))

    got = asyncio.run(together())
    for name, tokens, request in zip(CASES, got, requests):
        assert tokens == reference(model, prompt, 16, request.params, set()), name
    plain = got[len(CASES)]
    for name, tokens in zip(CASES, got):
        assert tokens != plain, f"{name} did not change the greedy answer {plain}"


def test_stop_token_ids_end_the_choice_and_min_tokens_holds_them_back(rt):
    tok = tiny.make_tokenizer()
    prompt = tok("stop when you see it")["input_ids"]
    plain = asyncio.run(_tokens(rt, make_request(rt, None, prompt, 12)))
    stop = plain[2]
    first = plain.index(stop)
    stopped = asyncio.run(_tokens(rt, make_request(rt, None, prompt, 12, stop_token_ids=(stop,))))
    assert stopped == plain[:first + 1]  # the stop token ends the choice (its id is reported, no text)
    held = asyncio.run(_tokens(rt, make_request(rt, None, prompt, 12, stop_token_ids=(stop,), min_tokens=first + 2)))
    assert stop not in held[:first + 2] and len(held) > first + 1
