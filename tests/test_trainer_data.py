"""Training data and configuration: every bad input is refused with the line or the flag named."""
from __future__ import annotations

import json

import pytest
import tiny

from hotpeft.trainer.config import TrainConfig, parse_min_improvement
from hotpeft.trainer.data import IGNORE, encode, parse_jsonl, prepare
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


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 0}, r"--rank must be between 1 and 256, got 0"),
    ({"rank": 2.5}, r"--rank must be a whole number"),
    ({"learning_rate": 5.0}, r"--learning-rate must be between 1e-07 and 1, got 5.0"),
    ({"epochs": 0}, r"--epochs must be between 0.01 and 100"),
    ({"dropout": 1.5}, r"--dropout must be between 0 and 0.9"),
    ({"num_virtual_tokens": 1000, "method": "prompt_tuning"}, r"--num-virtual-tokens must be between 1 and 512"),
    ({"method": "full"}, r"--method must be one of lora, qlora, prompt_tuning"),
    ({"name": "Bad Name"}, r"--name: "),
    ({"template": "no placeholder"}, r"--template must contain \{prompt\} exactly once"),
    ({"template": "{prompt} {other}"}, r"--template may use only \{prompt\}"),
    ({"prompt_init": "text", "method": "prompt_tuning"}, r"--prompt-init text needs --prompt-init-text"),
    ({"prompt_init_text": "hi"}, r"--prompt-init-text applies to --method prompt_tuning only"),
    ({"min_improvement": {"bleu": 1.0}}, r"--min-improvement: unknown metric 'bleu'"),
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
