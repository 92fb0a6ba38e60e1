"""Structured outputs through the official client: `response_format` (json_object, json_schema,
`parse()` with a pydantic model), the `structured_outputs` extension (regex, choice, Lark grammar),
cut answers, bad schemas; and a mixed batch where constrained, logprob, penalized and plain rows
run together."""
from __future__ import annotations

import asyncio
import json
import re
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from hotpeft.server.structured import from_schema
from test_engine import _tokens, make_request, rt  # noqa: F401 - rt: the tiny engine fixture

MSGS = [{"role": "user", "content": "Describe a pet as JSON."}]


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)
    name: str = Field(max_length=6)
    indoor: bool


@pytest.mark.parametrize("model", ["tiny-llama", "lora-attn", "soft"])
def test_parse_returns_a_valid_object_for_every_seed(client, model):
    for seed in range(20):
        r = client.chat.completions.parse(model=model, messages=MSGS, response_format=Pet, temperature=1.0,
                                          seed=seed, max_tokens=60)
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, Pet)
        assert Pet.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_object_is_a_json_object(client):
    r = client.chat.completions.create(model="lora-mlp", messages=MSGS, max_tokens=60, temperature=0.7, seed=1,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: said so, and a prefix of an object
        assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")


def test_a_cut_answer_finishes_with_length_never_stop(client):
    r = client.chat.completions.create(model="base", messages=MSGS, max_tokens=4, temperature=0,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "pet", "schema": Pet.model_json_schema(), "strict": True}})
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith('{"')
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(model="base", messages=MSGS, response_format=Pet, max_tokens=4)


@pytest.mark.parametrize("constraint,check", [
    ({"regex": r"[0-9]{3}-[a-z]{2,4}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
    ({"choice": ["alpha", "beta", "gamma"]}, lambda t: t in ("alpha", "beta", "gamma")),
    ({"grammar": 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[1-9]/'}, lambda t: re.fullmatch(r"\([1-9](\+[1-9])*\)", t)),
    ({"json": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3}},
     lambda t: all(0 <= x <= 9 for x in json.loads(t))),
])
def test_completions_follow_regex_choice_grammar_and_json(client, constraint, check):
    for seed in range(5):
        r = client.completions.create(model="lora-attn", prompt="Answer:", max_tokens=40, temperature=1.0, seed=seed,
                                      extra_body={"structured_outputs": constraint})
        assert r.choices[0].finish_reason == "stop" and check(r.choices[0].text), r.choices[0].text


def test_streamed_constrained_text_equals_the_whole(client):
    kw = dict(model="soft", messages=MSGS, max_tokens=60, temperature=0, response_format={"type": "json_schema",
              "json_schema": {"name": "pet", "schema": Pet.model_json_schema()}})
    whole = client.chat.completions.create(**kw).choices[0].message.content
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    assert "".join(parts) == whole and Pet.model_validate_json(whole)


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema", "Invalid type: strin"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "dependentSchemas": {}}}}}, "response_format.json_schema.schema", "dependentSchemas"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "enum": ["x" * 40000]}}}}, "response_format.json_schema.schema", "at most 32768 (--max-schema-bytes)"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema is required"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "'json_schema'"),
    ({"structured_outputs": {"regex": "(a"}}, "structured_outputs.regex", "unclosed group"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"grammar": "start: foo"}}, "structured_outputs.grammar", "unknown name"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs",
     "not both"),
]


@pytest.mark.parametrize("body,param,words", BAD, ids=[b[2][:24] for b in BAD])
def test_bad_constraints_are_400s_and_the_server_keeps_serving(client, body, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="base", messages=MSGS, max_tokens=4, extra_body=body)
    assert e.value.body["param"] == param and words in e.value.body["message"], e.value.body
    assert client.chat.completions.create(model="base", messages=MSGS, max_tokens=2).choices[0].finish_reason


def test_plain_rows_are_unchanged_beside_grammar_logprob_and_penalty_rows(rt):  # noqa: F811 - the fixture
    prompt = rt.tokenizer("The quick brown fox")["input_ids"]
    schema = from_schema({"type": "object", "properties": {"a": {"type": "integer"}}}, "schema", 1 << 15)
    plain = [make_request(rt, a, prompt, 12) for a in (None, "lora-attn", "soft")]
    alone = [asyncio.run(_tokens(rt, r)) for r in plain]
    others = [make_request(rt, "lora-mlp", prompt, 12, grammar=schema, temperature=1.0, seed=3),
              make_request(rt, None, prompt, 12, grammar=schema),
              make_request(rt, "lora-attn", prompt, 12, logprobs=5),
              make_request(rt, "soft", prompt, 12, presence_penalty=1.5, logit_bias=((65, 5.0),))]
    again = [make_request(rt, a, prompt, 12) for a in (None, "lora-attn", "soft")]

    async def together():
        return await asyncio.gather(*(_tokens(rt, r) for r in others + again))

    got = asyncio.run(together())
    assert got[len(others):] == alone
    text = rt.tokenizer.decode(got[1], skip_special_tokens=True)
    assert isinstance(json.loads(text), dict) or not text.endswith("}")  # valid, unless cut by max_tokens
