"""A LoRA on the tiny model (tests/tiny.py) that calls a tool: trained by the trainer's own code
(`hotpeft.trainer.data`, `.train`) on generated function-calling lines, for tests that need an
adapter which answers a weather question with

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

    folder = train_tool_adapter(base_dir, out_dir)   # a PEFT folder, the same on every run

`question(city, k)` writes the k-th question of the family it was trained on (lowercase, the city
last); `TOOLS` are the tools to send with it. The questions in `HELD_OUT` were never trained on.

Why two cities, lowercase questions and 800 steps: the tiny model's random attention is very sharp,
so a LoRA learns to read a word 70 tokens back (from the call's `"city": "` to the question) slowly.
It learns the call format in ~300 steps; picking between two capitalised city names, the only
capitals in the question, takes ~800 (six cities did not converge in 800). The base must hold
~500 tokens: the default tool prompt alone is ~300 tokens of the byte-level tokenizer
(`tiny.save_tiny_model(path, max_positions=1024)`).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import random
import tempfile
from pathlib import Path

import torch

from hotpeft.model.source import resolve_model
from hotpeft.trainer.config import TrainConfig
from hotpeft.trainer.data import IGNORE, Encoded, encode, parse_jsonl
from hotpeft.trainer.train import build_peft_model, load_training_base, train

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOLS = [WEATHER]
CITIES = ["Paris", "Lima"]
OPENERS = ["", "hi! ", "hello, ", "quick question: ", "hey there. ", "good morning! ", "so, "]
ASKS = ["what is the weather in {city}?", "how warm is it today in {city}?", "is it raining in {city}?",
        "can you get me the weather for {city}?", "what's the forecast for {city}?", "will it rain tomorrow in {city}?",
        "what's it like outside right now in {city}?", "how cold is it tonight in {city}?", "is it sunny in {city}?",
        "could you check the weather in {city}?", "any snow this week in {city}?", "what should I wear today in {city}?"]
# Every (opener, ask, city) in a fixed shuffled order; the last ones are held out.
_COMBOS = list(itertools.product(range(len(OPENERS)), range(len(ASKS)), range(len(CITIES))))
random.Random(0).shuffle(_COMBOS)
N_HELD_OUT = 16
CONFIG = dict(name="tool-weather", rank=16, alpha=32, learning_rate=5e-3, batch_size=4, max_steps=800, dropout=0.0,
              warmup_fraction=0.06, seed=0)
# Training is chaotic on this model (another seed may need more steps): when the calls of these
# training questions are not yet exact, train on in short rounds at a lower rate, a few at most.
MORE = dict(max_steps=200, learning_rate=2e-3)
MAX_MORE_ROUNDS = 4
N_CHECK = 16


def question(city: str, k: int) -> str:
    """The k-th question (of len(OPENERS) * len(ASKS)) asking about the weather in `city`."""
    return OPENERS[k // len(ASKS) % len(OPENERS)] + ASKS[k % len(ASKS)].format(city=city)


def _pair(combo: tuple[int, int, int]) -> tuple[str, str]:
    opener, ask, city = combo
    return question(CITIES[city], opener * len(ASKS) + ask), CITIES[city]


TRAIN = [_pair(c) for c in _COMBOS[:-N_HELD_OUT]]
HELD_OUT = [_pair(c) for c in _COMBOS[-N_HELD_OUT:]]  # (question, city) pairs no training line holds


def tool_line(question_text: str, city: str, n: int) -> dict:
    """One training line in OpenAI's fine-tuning format: the question, the assistant's call."""
    call = {"id": f"call_{n}", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
    return {"messages": [{"role": "user", "content": question_text},
                         {"role": "assistant", "content": None, "tool_calls": [call]}], "tools": TOOLS}


@torch.no_grad()
def exact(model, examples: list[Encoded], eos: int) -> bool:
    """Greedy decoding reproduces every example's answer: at each answer position up to its end of
    turn, the most likely token is the next one (teacher forcing; one batched forward)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE)
    for i, e in enumerate(examples):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
    mask = torch.arange(width) < torch.tensor([len(e.input_ids) for e in examples])[:, None]  # (B, T)
    predicted = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1].argmax(-1)  # (B, T - 1)
    target = labels[:, 1:]
    for row in range(len(examples)):
        wanted = (target[row] != IGNORE).nonzero()[:, 0]
        end = next((k for k, pos in enumerate(wanted) if int(target[row, pos]) == eos), len(wanted) - 1)
        wanted = wanted[:end + 1]  # what follows the end of turn is never generated
        if not torch.equal(predicted[row, wanted], target[row, wanted]):
            return False
    return True


def train_tool_adapter(base_dir: Path, out_dir: Path) -> Path:
    """Train the LoRA on the tiny model in `base_dir` (float32, CPU) and save it to `out_dir`."""
    cfg = TrainConfig(**CONFIG)
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="tool-adapter-") as work:
        base = load_training_base(resolve_model(str(base_dir), Path(work)), cfg.method, torch.device("cpu"))
        records = parse_jsonl("\n".join(json.dumps(tool_line(q, c, n)) for n, (q, c) in enumerate(TRAIN)))
        examples = [encode(r, base.tokenizer, 1 << 20) for r in records]
        longest = max(len(e.input_ids) for e in examples)
        if longest > base.max_model_len:
            raise ValueError(f"the base's context of {base.max_model_len} tokens is shorter than a training line "
                             f"({longest} tokens); save it with tiny.save_tiny_model(path, max_positions=1024)")
        peft_model = build_peft_model(base, cfg)
        train(peft_model, base, examples, cfg, Path(work))
        check, eos = examples[:N_CHECK], base.tokenizer.eos_token_id
        for _ in range(MAX_MORE_ROUNDS):
            if exact(peft_model, check, eos):
                break
            train(peft_model, base, examples, dataclasses.replace(cfg, **MORE), Path(work))
        else:
            if not exact(peft_model, check, eos):
                raise RuntimeError(f"the tool adapter does not call get_weather exactly on its training questions "
                                   f"after {cfg.max_steps + MAX_MORE_ROUNDS * MORE['max_steps']} steps")
    peft_model.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False)
    (out_dir / "README.md").unlink(missing_ok=True)
    return out_dir
