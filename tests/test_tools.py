"""Tool calling through the official client: required and named calls (grammar-constrained),
parallel calls, `none`, history with calls and tool results, streaming deltas, bad input."""
from __future__ import annotations

import json
import shutil

import openai
import pytest

from conftest import ServerProcess
from hotpeft.model.chat import parse_tool_calls
from hotpeft.server.toolcalls import ToolStream

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "pattern": "^[A-Za-z]{1,8}$"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12,
                                                                                 "maximum": 14}},
                                       "required": ["zone"], "additionalProperties": False}}}
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(tiny_dirs, tool_lora, tmp_path_factory):
    """The tiny model with room for a tool prompt (1,024 positions; the same weights, so the same adapters),
    the test adapters and `tool-weather`, a LoRA trained to call get_weather (tool_adapter.py)."""
    from openai import OpenAI

    base, trained = tool_lora
    adapters = tmp_path_factory.mktemp("tool-adapters")
    for folder in [*tiny_dirs["adapters"].iterdir(), trained]:
        shutil.copytree(folder, adapters / folder.name)
    server = ServerProcess(["--model", str(base), "--adapters-dir", str(adapters), "--dtype", "float32"],
                           tmp_path_factory.mktemp("tools-home"))
    yield OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    server.stop()


def valid_call(call) -> bool:
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        return set(args) == {"city", "unit"} and len(args["city"]) <= 8 and args["unit"] in ("c", "f")
    return call.function.name == "get_time" and set(args) == {"zone"} and -12 <= args["zone"] <= 14


@pytest.mark.parametrize("model", ["tiny-llama", "lora-attn", "soft"])
def test_required_gives_valid_calls_for_every_seed(client, model):
    for seed in range(8):
        # One call: the grammar ends after it. Parallel calls (the default): as many as the model
        # makes; a random tiny model may go on calling until max_tokens.
        parallel = seed % 2 == 1
        r = client.chat.completions.create(model=model, messages=MSGS, tools=[WEATHER, CLOCK], tool_choice="required",
                                           temperature=1.0, seed=seed, max_tokens=250, parallel_tool_calls=parallel)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" or parallel and choice.finish_reason == "length", choice.message
        calls = choice.message.tool_calls
        assert calls and all(valid_call(c) and c.id.startswith("call_") and c.type == "function" for c in calls)
        assert parallel or len(calls) == 1


def test_named_function_and_no_parallel_calls(client):
    for seed in range(5):
        r = client.chat.completions.create(model="lora-mlp", messages=MSGS, tools=[WEATHER, CLOCK], seed=seed,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           temperature=1.0, max_tokens=120, parallel_tool_calls=False)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls"
        assert len(calls) == 1 and calls[0].function.name == "get_time" and valid_call(calls[0])


def test_auto_parses_the_calls_of_a_trained_tool_adapter(client):
    """`auto`: the trained adapter calls get_weather with the question's city; the base answers in text."""
    from tool_adapter import HELD_OUT, TOOLS

    for question, city in HELD_OUT[:6]:
        kw = dict(messages=[{"role": "user", "content": question}], tools=TOOLS, max_tokens=80, temperature=0)
        r = client.chat.completions.create(model="tool-weather", **kw)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice.message
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": city}
        base = client.chat.completions.create(model="base", **kw).choices[0]
        assert base.message.tool_calls is None and base.finish_reason in ("stop", "length")
    streamed, finish = [], None
    for chunk in client.chat.completions.create(model="tool-weather", stream=True, **kw):
        if chunk.choices:
            assert not chunk.choices[0].delta.content  # the call is not leaked as text
            streamed += chunk.choices[0].delta.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and [(d.index, d.function.name) for d in streamed] == [(0, "get_weather")]
    assert json.loads(streamed[0].function.arguments) == {"city": HELD_OUT[5][1]}


def test_none_leaves_the_tools_out(client):
    kw = dict(model="base", messages=MSGS, tools=[WEATHER], max_tokens=5, temperature=0)
    none = client.chat.completions.create(**kw, tool_choice="none")
    auto = client.chat.completions.create(**kw)
    plain = client.chat.completions.create(model="base", messages=MSGS, max_tokens=5, temperature=0)
    assert none.choices[0].message.tool_calls is None
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < auto.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content


def test_a_conversation_with_calls_and_results_goes_on(client):
    first = client.chat.completions.create(model="base", messages=MSGS, tools=[WEATHER], tool_choice="required",
                                           max_tokens=250, temperature=0, parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    history = MSGS + [first.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    r = client.chat.completions.create(model="base", messages=history, tools=[WEATHER], max_tokens=5, temperature=0)
    assert r.usage.prompt_tokens > first.usage.prompt_tokens + 10 and r.choices[0].finish_reason in ("stop", "length",
                                                                                                     "tool_calls")


def test_streamed_calls_equal_the_whole_answer(client):
    kw = dict(model="soft", messages=MSGS, tools=[WEATHER, CLOCK], tool_choice="required", max_tokens=250,
              temperature=0, parallel_tool_calls=False)
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls
    calls, finish = {}, None
    for chunk in client.chat.completions.create(**kw, stream=True):
        if not chunk.choices:
            continue
        for d in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
            entry["name"] += d.function.name or ""
            entry["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [calls[k] for k in sorted(calls)] == [{"name": c.function.name, "arguments": c.function.arguments}
                                                for c in whole]


def test_stream_splitting_equals_parsing_the_whole_text():
    text = 'Let me look. <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>\n<tool_call>{"name": "g", ' \
           '"arguments": {}}</tool_call><tool_call>{"name": "nope", "arguments": {}}</tool_call> bye <tool_ca'
    content, calls = parse_tool_calls(text, {"f", "g"})
    for size in (1, 3, 7, len(text)):
        stream = ToolStream({"f", "g"})
        out, got = "", []
        for k in range(0, len(text), size):
            piece, new = stream.feed(text[k:k + size])
            out, got = out + piece, got + new
        out += stream.finish()
        assert out.strip() == content and [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                                           for c in got] == calls
        assert [c["index"] for c in got] == [0, 1]
    assert parse_tool_calls("no calls <tool_call>oops</tool_call>", {"f"}) == ("no calls <tool_call>oops</tool_call>",
                                                                               [])
    # the closing tag inside an argument's string does not end the call, whole or streamed
    tricky = '<tool_call>{"name": "f", "arguments": {"s": "a</tool_call>b"}}</tool_call>'
    assert parse_tool_calls(tricky, {"f"}) == (None, [{"name": "f", "arguments": '{"s": "a</tool_call>b"}'}])
    stream = ToolStream({"f"})
    got = [c for ch in tricky for c in stream.feed(ch)[1]]
    assert [c["function"]["arguments"] for c in got] == ['{"s": "a</tool_call>b"}'] and stream.finish() == ""
    # parallel_tool_calls false: the first call only
    stream = ToolStream({"f", "g"}, parallel=False)
    assert [c["function"]["name"] for c in stream.feed(text)[1]] == ["f"]


BAD = [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice",
     "not in tools"),
    ({"tool_choice": "required"}, "tool_choice", "requires tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     "tools.0.function.parameters", "schema of an object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}]}, "tools.0.function.parameters", "Invalid type"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "given twice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name", "pattern"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "constrains the answer already"),
    ({"messages": MSGS + [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{not json"}}]}]}, "messages.1.tool_calls.0.function.arguments",
     "JSON object"),
]


@pytest.mark.parametrize("body,param,words", BAD, ids=[b[2][:24] for b in BAD])
def test_bad_tool_input_is_a_400(client, body, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{"model": "base", "messages": MSGS, "max_tokens": 4, **body})
    assert e.value.body["param"] == param and words in e.value.body["message"], e.value.body
