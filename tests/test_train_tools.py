"""A tool-calling LoRA trained by the trainer's code on the tiny model (tests/tool_adapter.py):
greedy decoding with plain transformers + PEFT answers held-out weather questions with a call of
get_weather naming the question's city, in the format the server parses; the base does not."""
from __future__ import annotations

import json

import pytest
import tiny
import torch
from tool_adapter import HELD_OUT, TOOLS

from hotpeft.model.chat import call_text, parse_tool_calls, render


@pytest.fixture(scope="module")
def tool_adapter(tool_lora):
    return tool_lora  # conftest: trained once per session (test_tools.py serves it)


def greedy_answer(model, tok, question: str) -> str:
    """The model's answer to `question` with TOOLS, as the server renders the request."""
    ids = tok(render(tok, [{"role": "user", "content": question}], TOOLS), add_special_tokens=False)["input_ids"]
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=96, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def test_the_adapter_calls_get_weather_for_held_out_questions_and_the_base_does_not(tool_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, folder = tool_adapter
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny.TINY_ID and config["peft_type"] == "LORA"
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), str(folder))
    model.eval()
    for question, city in HELD_OUT:
        answer = greedy_answer(model, tok, question)
        assert answer == call_text("get_weather", {"city": city}), (question, answer)
        assert parse_tool_calls(answer, {"get_weather"}) == (None, [{"name": "get_weather",
                                                                     "arguments": json.dumps({"city": city})}])
    with model.disable_adapter():
        for question, _ in HELD_OUT:
            answer = greedy_answer(model, tok, question)
            assert parse_tool_calls(answer, {"get_weather"})[1] == [] and "<tool_call>" not in answer, answer
