"""Training data and configuration: every bad input is refused with the line or the flag named."""
from __future__ import annotations

import copy
import json

import pytest
import tiny

from hotpeft.model.chat import call_text, parse_tool_calls, render
from hotpeft.trainer.config import TrainConfig, parse_min_improvement
from hotpeft.trainer.data import IGNORE, encode, parse_jsonl, prepare, read_jsonl
from hotpeft.trainer.demo import write_demo
from hotpeft.trainer.errors import ConfigInvalid, DatasetInvalid


@pytest.fixture(scope="module")
def tok():
    return tiny.make_tokenizer()


def lines(*objs) -> str:
    return "\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs)


PAIR = {"prompt": "word: stone\nanswer:", "completion": " STONE"}
CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "name?"},
                     {"role": "assistant", "content": "tiny"}]}


@pytest.mark.parametrize("text, match", [
    (lines(PAIR, "{not json"), r"line 2: not valid JSON"),
    (lines(PAIR, PAIR, {"prompt": "x"}), r"line 3: 'completion' must be a string"),
    (lines({"messages": [{"role": "robot", "content": "x"}]}), r"line 1: messages\[0\] has unknown role 'robot'"),
    (lines({"messages": [{"role": "user", "content": "x"}]}), r"line 1: no assistant message to train on"),
    (lines({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}), r"line 1: .*needs 'content'"),
    (lines(PAIR, CHAT), r"line 2: a chat example in a file of completion examples"),
    (lines([1, 2]), r"line 1: expected a JSON object, got list"),
    (lines({"text": "x"}), r"line 1: expected .*got the field\(s\) text"),
    (lines({"prompt": "a", "completion": ""}), r"line 1: 'completion' is empty"),
    (lines({"messages": [{"role": "user", "content": "x", "weight": 0}, {"role": "assistant", "content": "y"}]}),
     r"weight is allowed on assistant messages only"),
])
def test_bad_lines_name_their_line(text, match):
    with pytest.raises(DatasetInvalid, match=match):
        parse_jsonl(text)


def test_bad_utf8_names_its_line():
    with pytest.raises(DatasetInvalid, match=r"line 2: not valid UTF-8"):
        parse_jsonl(json.dumps(PAIR).encode() + b'\n{"prompt": "\xff"}')


@pytest.mark.parametrize("content, match", [("", r"has 0 example\(s\); at least 2"),
                                            (lines(PAIR), r"has 1 example\(s\); at least 2")])
def test_empty_and_one_line_training_files_are_refused(tmp_path, tok, content, match):
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetInvalid, match=match):
        prepare(path, None, tok, max_length=64, template=lambda p: p, validation_fraction=0.1, seed=0)


def test_pair_loss_covers_completion_and_eos_only(tok):
    rec = parse_jsonl(lines(PAIR))[0]
    enc = encode(rec, tok, 256)
    prompt_ids = tok(PAIR["prompt"])["input_ids"]
    assert enc.input_ids[:len(prompt_ids)] == prompt_ids
    assert enc.labels[:len(prompt_ids)] == [IGNORE] * len(prompt_ids)
    trained = [t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE]
    assert trained == tok(" STONE", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc.prompt_ids == prompt_ids and enc.reference == " STONE"


def test_chat_loss_covers_assistant_turns_as_the_server_renders_them(tok):
    rec = parse_jsonl(lines(CHAT))[0]
    enc = encode(rec, tok, 256)
    full = tok.apply_chat_template([{k: m[k] for k in ("role", "content")} for m in CHAT["messages"]], tokenize=False)
    assert tok.decode(enc.input_ids) == full
    trained = tok.decode([t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE])
    assert trained == "hello<|im_end|>\ntiny<|im_end|>\n"
    # generation starts where the server's chat prompt for the last turn ends
    server_prompt = tok.apply_chat_template([{k: m[k] for k in ("role", "content")} for m in CHAT["messages"][:4]],
                                            add_generation_prompt=True, tokenize=False)
    assert enc.prompt_ids == tok(server_prompt, add_special_tokens=False)["input_ids"]
    assert enc.reference == "tiny"


def test_weight_zero_turns_are_not_trained(tok):
    chat = json.loads(json.dumps(CHAT))
    chat["messages"][2]["weight"] = 0
    enc = encode(parse_jsonl(lines(chat))[0], tok, 256)
    trained = tok.decode([t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE])
    assert trained == "tiny<|im_end|>\n"


def test_template_applies_to_prompts_and_user_messages(tok):
    template = "Q: {prompt}\nA:"
    pair = encode(parse_jsonl(lines({"prompt": "why", "completion": " because"}))[0], tok, 256,
                  lambda p: template.format(prompt=p))
    assert tok.decode(pair.prompt_ids) == "Q: why\nA:"
    chat = encode(parse_jsonl(lines(CHAT))[0], tok, 256, lambda p: template.format(prompt=p))
    assert "Q: name?\nA:" in tok.decode(chat.prompt_ids)


def test_long_examples_are_truncated_and_counted(tmp_path, tok):
    rows = [{"prompt": "p" * 10, "completion": " " + "c" * 100} for _ in range(5)]
    rows += [{"prompt": "p" * 200, "completion": " c"} for _ in range(2)]  # nothing trainable left at 32 tokens
    rows += [{"prompt": "p", "completion": " c"} for _ in range(5)]
    path = tmp_path / "train.jsonl"
    path.write_text(lines(*rows))
    out = prepare(path, None, tok, max_length=32, template=lambda p: p, validation_fraction=0.2, seed=0)
    assert out.truncated == 5 and out.dropped == 2
    assert all(len(e.input_ids) <= 32 for e in out.train + out.valid)
    assert any("5 example(s) longer than --max-length 32" in n for n in out.notes)


def test_held_out_split_is_fixed_by_the_seed(tmp_path, tok):
    path = tmp_path / "train.jsonl"
    path.write_text(lines(*[{"prompt": f"n{i}", "completion": f" {i}"} for i in range(50)]))
    split = lambda seed: [e.reference for e in prepare(path, None, tok, max_length=64, template=lambda p: p,  # noqa: E731
                                                        validation_fraction=0.1, seed=seed).valid]
    assert split(0) == split(0) and len(split(0)) == 5
    assert split(0) != split(1)


# ---- function calling ------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}
TOOL_CHAT = {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                          {"role": "assistant", "content": None, "tool_calls": [CALL]},
                          {"role": "tool", "tool_call_id": "call_1", "content": "{\"celsius\": 3}"},
                          {"role": "assistant", "content": "3 degrees in Oslo."}],
             "tools": [WEATHER], "parallel_tool_calls": False}


def changed(line: dict, edit) -> dict:
    """A deep copy of `line` with `edit(copy)` applied."""
    out = copy.deepcopy(line)
    edit(out)
    return out


def trained_text(tok, enc) -> str:
    return tok.decode([t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE])


def _set(path: str, value):
    """An edit that sets line[k1][k2]... (keys separated by '/', list indices as digits) to `value`."""
    def edit(line):
        *head, last = [int(k) if k.isdigit() else k for k in path.split("/")]
        target = line
        for k in head:
            target = target[k]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return edit


ARGUMENTS = "messages/1/tool_calls/0/function/arguments"


@pytest.mark.parametrize("edit, match", [
    (_set("messages/1/tool_calls/0/function/name", "get_time"),
     r"line 1: messages\[1\].tool_calls\[0\].function.name 'get_time' is not in tools \(get_weather\)"),
    (_set("tools", KeyError), r"messages\[1\].tool_calls\[0\] calls 'get_weather' but the line has no 'tools'"),
    (_set(ARGUMENTS, "{city: Oslo}"), r"tool_calls\[0\].function.arguments must be a JSON object as a string"),
    (_set(ARGUMENTS, {"city": "Oslo"}), r"arguments must be a JSON object as a string, e.g."),
    (_set(ARGUMENTS, "[\"Oslo\"]"), r"arguments must be a JSON object as a string"),
    (_set(ARGUMENTS, "{}"), r"arguments lacks the required argument\(s\) city"),
    (_set("messages/1/tool_calls/0/id", KeyError), r"tool_calls\[0\].id must be a non-empty string"),
    (_set("messages/1/tool_calls", []), r"messages\[1\].tool_calls must be a non-empty list"),
    (_set("messages/1/tool_calls", KeyError), r"messages\[1\] \(assistant\) needs 'content' as a string \(null only "
                                              r"beside tool_calls\)"),
    (_set("messages/2/tool_call_id", "call_9"), r"messages\[2\] \(tool\) answers 'call_9', but no preceding assistant "
                                                r"message has an unanswered tool call with that id"),
    (_set("messages/2/tool_call_id", KeyError), r"messages\[2\] \(tool\) needs 'tool_call_id'"),
    (_set("messages/1", {"role": "user", "content": "and?"}), r"messages\[2\] \(tool\) answers 'call_1', but no "
                                                              r"preceding"),
    (_set("messages/0/tool_calls", [CALL]), r"messages\[0\].tool_calls is allowed on assistant messages only"),
    (_set("messages/3/tool_call_id", "call_1"), r"messages\[3\].tool_call_id is allowed on tool messages only"),
    (_set("messages/2/weight", 0), r"messages\[2\].weight is allowed on assistant messages only"),
    (_set("tools", []), r"'tools' must be a non-empty list"),
    (_set("tools", {"get_weather": {}}), r"'tools' must be a non-empty list"),
    (_set("tools/0/type", "retrieval"), r"tools\[0\] must be \{\"type\": \"function\""),
    (_set("tools/0/function/name", "get weather"), r"tools\[0\].function.name must be 1 to 64 letters"),
    (_set("tools/0/function/parameters", {"type": "array"}), r"tools\[0\].function.parameters must be a JSON schema "
                                                             r"of an object"),
    (_set("tools/0/function/parameters/required", "city"), r"parameters.required must be a list of property names"),
    (_set("tools/0/function/returns", "a forecast"), r"tools\[0\].function has unsupported field\(s\) returns"),
    (lambda t: t["tools"].append(WEATHER), r"tools\[1\]: the function name 'get_weather' is given twice"),
    (_set("parallel_tool_calls", "yes"), r"'parallel_tool_calls' must be true or false"),
    (_set("functions", [WEATHER["function"]]), r"unexpected field\(s\) functions beside 'messages' \(the legacy "
                                               r"'functions' format is not read: give 'tools'\)"),
])
def test_bad_tool_lines_name_the_line_and_field(edit, match):
    text = lines(TOOL_CHAT, changed(TOOL_CHAT, edit))
    with pytest.raises(DatasetInvalid, match=match.replace("line 1", "line 2")) as e:
        parse_jsonl(text)
    assert e.value.line == 2


def test_tool_line_renders_as_the_server_renders_it(tok):
    enc = encode(parse_jsonl(lines(TOOL_CHAT))[0], tok, 2048)
    # the OpenAI messages as a request sends them (content null, arguments as text) -> the same text
    assert tok.decode(enc.input_ids) == render(tok, TOOL_CHAT["messages"], TOOL_CHAT["tools"],
                                               add_generation_prompt=False)
    # the loss covers the call and the answer (each with its end of turn), nothing of the prompt or the result
    call = call_text("get_weather", {"city": "Oslo"})
    assert trained_text(tok, enc) == call + "<|im_end|>\n" + "3 degrees in Oslo.<|im_end|>\n"
    # the last turn is generated from the server's prompt for it; its reference is the answer
    server_prompt = render(tok, TOOL_CHAT["messages"][:3], TOOL_CHAT["tools"])
    assert enc.prompt_ids == tok(server_prompt, add_special_tokens=False)["input_ids"]
    assert "<tool_response>{\"celsius\": 3}</tool_response>" in server_prompt and enc.reference == "3 degrees in Oslo."


def test_a_line_ending_with_calls_is_evaluated_on_the_call_text(tok):
    second = changed(CALL, lambda c: c.update(id="call_2", function={"name": "get_weather",
                                                                     "arguments": "{\"city\": \"Rome\"}"}))
    line = changed(TOOL_CHAT, lambda t: t.update(messages=[t["messages"][0], {
        "role": "assistant", "content": "Checking.", "tool_calls": [CALL, second]}]))
    enc = encode(parse_jsonl(lines(line))[0], tok, 2048)
    calls = call_text("get_weather", {"city": "Oslo"}) + call_text("get_weather", {"city": "Rome"})
    assert enc.reference == "Checking." + calls
    assert trained_text(tok, enc) == "Checking." + calls + "<|im_end|>\n"
    assert parse_tool_calls(enc.reference, {"get_weather"}) == (
        "Checking.", [{"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"},
                      {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}])
    prompt = render(tok, line["messages"][:1], line["tools"])
    assert enc.prompt_ids == tok(prompt, add_special_tokens=False)["input_ids"]


def test_weight_zero_leaves_a_call_untrained_and_tool_results_are_never_trained(tok):
    line = changed(TOOL_CHAT, _set("messages/1/weight", 0))
    enc = encode(parse_jsonl(lines(line))[0], tok, 2048)
    assert trained_text(tok, enc) == "3 degrees in Oslo.<|im_end|>\n"
    assert parse_jsonl(lines(line))[0].messages[1]["tool_calls"][0]["id"] == "call_1"


# A template that knows tools (the shape of Qwen's): it writes the tools and the calls itself.
NATIVE_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n{% for t in tools %}{{ t.function | tojson }}\n{% endfor %}"
    "<|im_end|>\n{% endif %}{% for m in messages %}"
    "{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{% for c in m.tool_calls %}<tool_call>\n"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>{% endfor %}"
    "<|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_knows_tools_writes_the_calls_its_own_way():
    native = tiny.make_tokenizer()
    native.chat_template = NATIVE_TEMPLATE
    line = changed(TOOL_CHAT, lambda t: t.update(messages=t["messages"][:2]))
    enc = encode(parse_jsonl(lines(line))[0], native, 2048)
    text = render(native, line["messages"], line["tools"], add_generation_prompt=False)
    assert native.decode(enc.input_ids) == text and "You can call functions" not in text
    assert enc.reference == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert trained_text(native, enc) == enc.reference + "<|im_end|>\n"


def test_demo_tool_lines_are_valid_and_mix_calls_results_and_answers(tmp_path):
    paths = write_demo(tmp_path)
    again = write_demo(tmp_path / "again")
    records = read_jsonl(paths["tool-calls.train"]) + read_jsonl(paths["tool-calls.valid"])
    assert paths["tool-calls.train"].read_bytes() == again["tool-calls.train"].read_bytes()
    assert len(records) == 200 and all(r.tools and r.format == "chat" for r in records)
    names = [c["function"]["name"] for r in records for m in r.messages for c in m.get("tool_calls", [])]
    assert {"get_weather", "convert_currency"} == set(names)
    answered = [r for r in records if r.messages[-1]["role"] == "assistant" and "tool_calls" not in r.messages[-1]]
    parallel = [r for r in records if len(r.messages[1]["tool_calls"]) == 2]
    assert 40 <= len(answered) <= 100 and parallel


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 0}, r"--rank must be between 1 and 256, got 0"),
    ({"rank": 2.5}, r"--rank must be a whole number"),
    ({"learning_rate": 5.0}, r"--learning-rate must be between 1e-07 and 1, got 5.0"),
    ({"epochs": 0}, r"--epochs must be between 0.01 and 100"),
    ({"dropout": 1.5}, r"--dropout must be between 0 and 0.9"),
    ({"num_virtual_tokens": 1000, "method": "prompt_tuning"}, r"--num-virtual-tokens must be between 1 and 512"),
    ({"method": "adapterfusion"}, r"--method must be one of lora, qlora, prompt_tuning"),
    ({"max_forgetting": 1.5}, r"--max-forgetting must be between 0 and 1"),
    ({"retention": ""}, r"--retention takes default, none or a JSONL file"),
    ({"name": "Bad Name"}, r"--name: "),
    ({"template": "no placeholder"}, r"--template must contain \{prompt\} exactly once"),
    ({"template": "{prompt} {other}"}, r"--template may use only \{prompt\}"),
    ({"prompt_init": "text", "method": "prompt_tuning"}, r"--prompt-init text needs --prompt-init-text"),
    ({"prompt_init_text": "hi"}, r"--prompt-init-text applies to --method prompt_tuning only"),
    ({"min_improvement": {"bertscore": 1.0}}, r"--min-improvement: unknown metric 'bertscore'"),
    ({"metrics": ["rougeL", "meteor"]}, r"--metrics: unknown metric\(s\) 'meteor'"),
    ({"target_modules": ["q_proj", "lm_head"]}, r"--target-modules: lm_head cannot be served; choose from q_proj"),
])
def test_out_of_range_options_name_the_flag_and_range(kwargs, match):
    with pytest.raises(ConfigInvalid, match=match):
        TrainConfig(**{"name": "ok", **kwargs})


def test_defaults_follow_the_literature():
    lora = TrainConfig(name="a")
    assert 8 <= lora.rank <= 16 and "down_proj" in lora.target_modules and lora.alpha == 2 * lora.rank
    pt = TrainConfig(name="b", method="prompt_tuning")
    assert 20 <= pt.num_virtual_tokens <= 100 and pt.prompt_init == "random" and pt.learning_rate > lora.learning_rate
    assert TrainConfig(name="c", method="prompt_tuning", prompt_init_text="Summarize:").prompt_init == "text"


def test_min_improvement_parsing():
    assert parse_min_improvement(["rougeL=0.05", "loss=0.1"]) == {"rougeL": 0.05, "loss": 0.1}
    with pytest.raises(ConfigInvalid, match="METRIC=DELTA"):
        parse_min_improvement(["rougeL"])
