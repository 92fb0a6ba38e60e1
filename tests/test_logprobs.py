"""Log-probabilities through the official client: chat (`logprobs`, `top_logprobs`), completions'
legacy shape and `echo`, for the base, a LoRA, a soft prompt and a mix, against log_softmax of the
PEFT model's own logits."""
from __future__ import annotations

from collections import Counter

import openai
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from hotpeft.server.api.logprobs import byte_chars

MSGS = [{"role": "user", "content": "Name three colours."}]
MIX = [{"name": "lora-attn", "weight": 0.6}, {"name": "lora-mlp", "weight": 0.4}]
CASES = {"base": ("tiny-llama", None), "lora": ("lora-attn", None), "soft": ("soft", None),
         "mix": ("base", {"adapters": MIX, "merge_strategy": "cat"})}
_CHAR = byte_chars()


@pytest.fixture(scope="module")
def tok(tiny_dirs):
    return AutoTokenizer.from_pretrained(tiny_dirs["base"])


@pytest.fixture(scope="module")
def models(tiny_dirs):
    """case -> the PEFT (or plain) model that answers it, in float32."""
    def load(adapters=()):
        model = AutoModelForCausalLM.from_pretrained(tiny_dirs["base"], dtype=torch.float32)
        if not adapters:
            return model.eval()
        peft = PeftModel.from_pretrained(model, tiny_dirs["adapters"] / adapters[0], adapter_name="a0")
        for i, name in enumerate(adapters[1:], 1):
            peft.load_adapter(tiny_dirs["adapters"] / name, adapter_name=f"a{i}")
        return peft.eval()

    mixed = load([m["name"] for m in MIX])
    mixed.add_weighted_adapter(["a0", "a1"], [m["weight"] for m in MIX], "mix", combination_type="cat")
    mixed.set_adapter("mix")
    return {"base": load(), "lora": load(["lora-attn"]), "soft": load(["soft"]), "mix": mixed}


def reference(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), V) log_softmax of the logits at each position of `ids` (soft prompt positions cut)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -len(ids):]
    return torch.log_softmax(logits.float(), dim=-1)


def ids_of(tok, pieces) -> list[int]:
    """The tiny tokenizer's tokens are single bytes: each piece's bytes name its id."""
    return [tok.convert_tokens_to_ids(_CHAR[p.bytes[0]]) for p in pieces]


def chat_prompt(tok) -> list[int]:
    text = tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("case", list(CASES))
def test_chat_logprobs_equal_log_softmax_of_the_peft_model(client, tok, models, case):
    model, extra = CASES[case]
    r = client.chat.completions.create(model=model, messages=MSGS, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=5, extra_body=extra)
    content = r.choices[0].logprobs.content
    assert b"".join(bytes(c.bytes) for c in content).decode(errors="replace") == r.choices[0].message.content
    prompt = chat_prompt(tok)
    out = ids_of(tok, content)
    ref = reference(models[case], prompt + out)
    for j, c in enumerate(content):
        row = ref[len(prompt) - 1 + j]  # the logits before output token j
        assert c.token == c.top_logprobs[0].token  # greedy: the chosen token is the most likely
        assert len(c.top_logprobs) == 5
        assert abs(c.logprob - row[out[j]].item()) < 1e-3
        values, top = row.topk(5)
        assert [t.logprob for t in c.top_logprobs] == pytest.approx(values.tolist(), abs=1e-3)
        assert ids_of(tok, c.top_logprobs) == top.tolist()


@pytest.mark.parametrize("case", ["base", "lora", "soft"])
def test_echo_scores_the_prompt_as_the_peft_model_does(client, models, case):
    model, extra = CASES[case]
    prompt = [40, 90, 17, 200, 33, 120, 5, 64, 250, 99, 3, 71]
    r = client.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=2, temperature=0,
                                  extra_body=extra)
    lp = r.choices[0].logprobs
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 0
    assert len(lp.tokens) == len(prompt) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = reference(models[case], prompt)
    want = [ref[j - 1, prompt[j]].item() for j in range(1, len(prompt))]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-3)
    assert all(len(d) in (2, 3) and lp.tokens[j] in d for j, d in enumerate(lp.top_logprobs[1:], 1))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_echo_with_a_completion_and_prompt_lists(client):
    r = client.completions.create(model="lora-attn", prompt=["The cat", "A dog"], max_tokens=3, echo=True,
                                  logprobs=1, temperature=0)
    for choice, text in zip(r.choices, ["The cat", "A dog"]):
        lp = choice.logprobs
        assert choice.text.startswith(text)
        assert len(lp.tokens) == len(text) + 3 and lp.token_logprobs[0] is None
        assert all(v <= 0 for v in lp.token_logprobs[1:])
        # greedy: each generated token is the most likely one of its step
        for j in range(len(text), len(lp.tokens)):
            assert max(lp.top_logprobs[j], key=lp.top_logprobs[j].get) == lp.tokens[j]


def test_text_offset_counts_characters_of_the_text(client):
    """A character of several bytes (several byte-level tokens) moves text_offset by one."""
    text = "héllo wörld"
    r = client.completions.create(model="base", prompt=text, max_tokens=0, echo=True, logprobs=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == text and len(lp.tokens) == len(text.encode())
    assert lp.text_offset[:3] == [0, 1, 1] and lp.text_offset[-1] == len(text) - 1  # "h", "é" (2 bytes), "l"


def test_streamed_logprobs_equal_the_whole_answer(client):
    kw = dict(model="soft", messages=MSGS, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = []
    for chunk in client.chat.completions.create(**kw, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(c.token, round(c.logprob, 5)) for c in streamed] == [(c.token, round(c.logprob, 5)) for c in whole]
    legacy = [c.choices[0].logprobs for c in client.completions.create(
        model="soft", prompt="Hi", max_tokens=5, temperature=0, logprobs=1, echo=True, stream=True)
        if c.choices and c.choices[0].logprobs]
    tokens = [t for lp in legacy for t in lp.tokens]
    offsets = [o for lp in legacy for o in lp.text_offset]
    assert len(tokens) == 2 + 5 and offsets == sorted(offsets) and legacy[0].token_logprobs[0] is None


@pytest.mark.parametrize("body,param,words", [
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", "less than or equal to 20"),
    ({"top_logprobs": 3}, "top_logprobs", "needs logprobs"),
])
def test_bad_chat_logprobs_are_400s(client, body, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="base", messages=MSGS, max_tokens=2, extra_body=body)
    err = e.value.body
    assert err["param"] == param and words in err["message"]


@pytest.mark.parametrize("body,param,words", [
    ({"logprobs": 6}, "logprobs", "less than or equal to 5"),
    ({"max_tokens": 0}, "max_tokens", "0 only with echo"),
    ({"prompt": [1, 2, 100000]}, "prompt", "outside this model's vocabulary"),
])
def test_bad_completion_logprobs_are_400s(client, body, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**{"model": "base", "prompt": "Hi", "max_tokens": 2, **body})
    err = e.value.body
    assert err["param"] == param and words in err["message"]


@pytest.mark.parametrize("model", ["tiny-llama", "lora-attn", "soft"])
def test_penalties_change_token_counts_as_defined(client, model):
    """Positive presence/frequency penalties spread the output over more distinct tokens; a negative
    frequency penalty makes it repeat. Tokens are told apart by their bytes (logprobs)."""
    def counts(**extra) -> Counter:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=32,
                                           temperature=0, logprobs=True, extra_body={"ignore_eos": True, **extra})
        return Counter(tuple(t.bytes) for t in r.choices[0].logprobs.content)

    plain = counts()
    assert sum(plain.values()) == 32
    assert len(counts(frequency_penalty=2.0)) > len(plain)
    assert len(counts(presence_penalty=2.0)) > len(plain)
    repeats = counts(frequency_penalty=-2.0)
    assert len(repeats) < len(plain) and max(repeats.values()) > max(plain.values())
    assert len(counts(presence_penalty=-2.0)) < len(plain)
