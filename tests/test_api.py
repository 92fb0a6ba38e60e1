"""The OpenAI-compatible API, driven by the official `openai` client against `hotpeft serve` on 127.0.0.1."""
from __future__ import annotations

import httpx
import openai
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny
from conftest import ADAPTER_TEMPLATE

MSGS = [{"role": "user", "content": "Tell me about foxes."}]


@pytest.fixture(scope="module")
def tok(tiny_dirs):
    return AutoTokenizer.from_pretrained(tiny_dirs["base"])


def reference_text(tiny_dirs, tok, adapter, prompt_ids, n):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["base"], dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, tiny_dirs["adapters"] / adapter)
    return tok.decode(tiny.greedy_reference(model, prompt_ids, n), skip_special_tokens=True)


def test_models_lists_base_and_adapters(client):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"tiny-llama", "lora-attn", "lora-mlp", "soft", "lora-tmpl"}
    base = models["tiny-llama"]
    assert base.owned_by == "hotpeft" and base.model_extra["precision"] == "float32"
    assert base.model_extra["resident_bytes"] > 0 and base.model_extra["device"] == "cpu"
    for name in ("lora-attn", "soft"):
        assert models[name].model_extra["parent"] == "tiny-llama" and models[name].created > 0
    assert models["soft"].model_extra["kind"] == "prompt_tuning"
    assert client.models.retrieve("lora-attn@1").model_extra["version"] == 1


@pytest.mark.parametrize("adapter", [None, "lora-attn", "lora-mlp", "soft"])
def test_chat_greedy_equals_generate_with_peft(client, tiny_dirs, tok, adapter):
    r = client.chat.completions.create(model=adapter or "tiny-llama", messages=MSGS, max_tokens=20, temperature=0)
    prompt = tok(tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
    assert r.choices[0].message.content == reference_text(tiny_dirs, tok, adapter, prompt, 20)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.total_tokens == len(prompt) + r.usage.completion_tokens


@pytest.mark.parametrize("adapter", [None, "lora-mlp", "soft"])
def test_completion_greedy_equals_generate_with_peft(client, tiny_dirs, tok, adapter):
    r = client.completions.create(model=adapter or "base", prompt="Once upon a time", max_tokens=16, temperature=0)
    expected = reference_text(tiny_dirs, tok, adapter, tok("Once upon a time")["input_ids"], 16)
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason in ("length", "stop")


def test_adapter_chat_template_is_used(client, tiny_dirs, tok):
    r = client.chat.completions.create(model="lora-tmpl", messages=MSGS, max_tokens=12, temperature=0)
    text = tok.apply_chat_template(MSGS, chat_template=ADAPTER_TEMPLATE, add_generation_prompt=True, tokenize=False)
    assert text.startswith("### user: Tell me")
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    assert r.choices[0].message.content == reference_text(tiny_dirs, tok, "lora-tmpl", prompt, 12)


def test_streamed_text_equals_whole_text(client):
    for model in ("lora-mlp", "soft"):
        whole = client.chat.completions.create(model=model, messages=MSGS, max_tokens=24, temperature=0)
        stream = client.chat.completions.create(model=model, messages=MSGS, max_tokens=24, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant"
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == [whole.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_streamed_completion_ends_with_done(tiny_server):
    body = {"model": "soft", "prompt": "abc", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", tiny_server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_seed_gives_the_same_sample(client):
    kw = dict(model="lora-attn", messages=MSGS, max_tokens=20, temperature=1.0, top_p=0.95)
    a = client.chat.completions.create(seed=11, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=11, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=12, **kw).choices[0].message.content
    assert a == b and a != c


def test_logit_bias_and_penalties_through_the_client(client, tok):
    """OpenAI's logit_bias forces a token; a penalty changes nothing else about the response."""
    forced = client.completions.create(model="lora-attn", prompt="hello", max_tokens=4, temperature=0,
                                       logit_bias={"65": 100})
    assert forced.choices[0].text == tok.decode([65] * 4) and forced.usage.completion_tokens == 4
    chat = client.chat.completions.create(model="soft", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                          temperature=0, presence_penalty=-2.0, frequency_penalty=1.0,
                                          extra_body={"repetition_penalty": 1.2, "min_tokens": 2})
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens >= 2
    off = {"presence_penalty": None, "frequency_penalty": None, "logit_bias": None, "repetition_penalty": None,
           "min_tokens": None, "stop_token_ids": None}  # null is "off", as OpenAI allows
    plain = client.completions.create(model="lora-attn", prompt="hello", max_tokens=4, temperature=0)
    nulls = client.completions.create(model="lora-attn", prompt="hello", max_tokens=4, temperature=0, extra_body=off)
    assert nulls.choices[0].text == plain.choices[0].text


def test_stop_strings_end_the_text(client):
    full = client.completions.create(model="base", prompt="Once upon a time", max_tokens=30, temperature=0).choices[0].text
    stop = full[5:7]
    assert stop and full.find(stop) == 5, "pick a stop that first occurs at position 5"
    r = client.completions.create(model="base", prompt="Once upon a time", max_tokens=30, temperature=0, stop=[stop, "@@"])
    assert r.choices[0].text == full[:5] and r.choices[0].finish_reason == "stop"


def test_n_choices_and_length_finish(client):
    r = client.chat.completions.create(model="soft", messages=MSGS, max_tokens=5, temperature=1.0, seed=3, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 15
    assert len({c.message.content for c in r.choices}) > 1  # seeds seed, seed+1, seed+2


def test_version_pin_and_unknown_model(client):
    assert client.chat.completions.create(model="lora-attn@1", messages=MSGS, max_tokens=2).choices
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="lora-attn@2", messages=MSGS, max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "no version 2" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-adapter", messages=MSGS, max_tokens=2)
    msg = e.value.body["message"]
    assert e.value.body["param"] == "model"
    assert all(name in msg for name in ("tiny-llama", "lora-attn", "lora-mlp", "soft"))


GOOD = {"model": "lora-attn", "messages": MSGS, "max_tokens": 4}

BAD_INPUTS = [
    # (body, param named, words in the message)
    ({k: v for k, v in GOOD.items() if k != "model"}, "model", "Missing required parameter"),
    ({k: v for k, v in GOOD.items() if k != "messages"}, "messages", "Missing required parameter"),
    ({**GOOD, "messages": []}, "messages", "at least 1"),
    ({**GOOD, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role", "'user'"),
    ({**GOOD, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({**GOOD, "max_tokens": 100000}, "max_tokens", "maximum context length is 256 tokens"),
    ({**GOOD, "max_completion_tokens": 100000, "max_tokens": None}, "max_completion_tokens", "maximum context length"),
    ({**GOOD, "temperature": -0.5}, "temperature", "greater than or equal to 0"),
    ({**GOOD, "top_p": 0}, "top_p", "greater than 0"),
    ({**GOOD, "top_p": 1.5}, "top_p", "less than or equal to 1"),
    ({**GOOD, "n": 5}, "n", "above this server's limit of 4"),
    ({**GOOD, "functions": [{"name": "f"}]}, "functions", "'functions' is not supported"),
    ({**GOOD, "audio": {"voice": "alloy"}}, "audio", "'audio' is not supported"),
    ({**GOOD, "frobnicate": 1}, "frobnicate", "Unrecognized request argument supplied: frobnicate"),
    ({**GOOD, "stop": ["a"] * 20}, "stop", "limit is 8"),
    ({**GOOD, "presence_penalty": 3}, "presence_penalty", "less than or equal to 2"),
    ({**GOOD, "frequency_penalty": -2.5}, "frequency_penalty", "greater than or equal to -2"),
    ({**GOOD, "repetition_penalty": 0}, "repetition_penalty", "greater than or equal to 0.01"),
    ({**GOOD, "logit_bias": {"5": 101}}, "logit_bias.5", "less than or equal to 100"),
    ({**GOOD, "logit_bias": {"999999": 1}}, "logit_bias", "outside this model's vocabulary of 259 ids"),
    ({**GOOD, "logit_bias": {"token": 1}}, "logit_bias.token.[key]", "should match pattern"),
    ({**GOOD, "stop_token_ids": [300]}, "stop_token_ids", "outside this model's vocabulary"),
    ({**GOOD, "min_tokens": 10}, "min_tokens", "min_tokens (10) is more than max_tokens (4)"),
]


@pytest.mark.parametrize("body,param,words", BAD_INPUTS, ids=[b[2][:30] for b in BAD_INPUTS])
def test_bad_chat_input_is_a_400_in_openai_shape(tiny_server, body, param, words):
    r = httpx.post(tiny_server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and words in err["message"]


def test_context_error_carries_both_numbers(tiny_server):
    r = httpx.post(tiny_server.url + "/v1/completions", json={"model": "soft", "prompt": "hi", "max_tokens": 300}, timeout=30)
    msg = r.json()["error"]["message"]
    # 2 prompt tokens + 6 virtual tokens of the soft prompt + 300 asked, against a context of 256
    assert r.status_code == 400 and "256 tokens" in msg and "308 tokens" in msg


def test_malformed_json_is_a_400_and_the_server_keeps_serving(tiny_server, client):
    r = httpx.post(tiny_server.url + "/v1/chat/completions", content=b'{"model": "x", ',
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "could not parse the JSON body" in r.json()["error"]["message"]
    r = httpx.post(tiny_server.url + "/v1/completions", json={"model": "soft", "prompt": []}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert client.chat.completions.create(model="soft", messages=MSGS, max_tokens=2).choices[0].message is not None
    assert httpx.get(tiny_server.url + "/v1/nowhere", timeout=5).json()["error"]["message"] == "Not Found"


def test_full_queue_is_429_with_retry_after_and_nothing_is_lost(tiny_dirs, tmp_path):
    """One KV slot and a queue of one: the third concurrent request is refused, the other two complete."""
    import httpx
    from conftest import ServerProcess

    server = ServerProcess(["--model", str(tiny_dirs["base"]), "--dtype", "float32", "--max-num-seqs", "1",
                            "--max-queue", "1"], tmp_path / "home")
    body = {"model": "base", "prompt": "hold the slot", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "stream": True}
    try:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            with c.stream("POST", "/v1/completions", json=body) as first:
                lines = first.iter_lines()
                next(line for line in lines if line.startswith("data: "))  # running: it holds the only slot
                with c.stream("POST", "/v1/completions", json=body) as second:  # submitted: waits in the queue
                    assert second.status_code == 200
                    third = c.post("/v1/completions", json=body | {"stream": False})
                    assert third.status_code == 429
                    assert int(third.headers["retry-after"]) >= 1
                    err = third.json()["error"]
                    assert err["code"] == "server_overloaded" and "--max-queue 1" in err["message"]
                    rest = [line for line in second.iter_lines() if line.startswith("data: ")]
                assert rest[-1] == "data: [DONE]"
            # Both accepted requests ran to the end, and the server is idle and still serving.
            done = c.post("/v1/completions", json=body | {"stream": False, "max_tokens": 5}).json()
            assert done["usage"]["completion_tokens"] == 5 and done["choices"][0]["finish_reason"] == "length"
    finally:
        server.stop()
