"""Replay data for multi-task training: general prompts answered by the base itself.

    .venv/bin/python scripts/replay-data.py --home ~/.hotpeft --out demo/general-replay.jsonl

Mixing a task with examples of what the base already does (its own greedy answers to general
prompts: capitals, sums, short explanations, synonyms) is the usual remedy for catastrophic
forgetting. The prompts are disjoint from the retention set's (`trainer/retention.py`), so the
retention score still measures what was kept, not what was rehearsed. Writes chat JSONL.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from hotpeft.model.load import eos_ids, load_base
from hotpeft.model.source import resolve_model
from hotpeft.trainer import data as data_mod
from hotpeft.trainer.chat_data import parse_chat
from hotpeft.trainer.evaluate import generate
from hotpeft.trainer.retention import candidate_items
from hotpeft.trainer.train import pad_id

COUNTRIES = ["Brazil", "Argentina", "Chile", "Mexico", "Nigeria", "Ghana", "Morocco", "Vietnam", "Indonesia",
             "Malaysia", "Finland", "Denmark", "Belgium", "Switzerland", "Hungary", "Romania", "Ukraine", "Colombia"]
TOPICS = ["the moon", "rain", "a volcano", "photosynthesis", "the heart", "a rainbow", "gravity", "the ocean",
          "a computer", "electricity", "bread", "a bicycle", "the internet", "music", "a library", "snow"]
WORDS = ["happy", "big", "fast", "cold", "smart", "quiet", "tired", "angry"]
SUBJECTS = ["cats", "trains", "summer", "coffee", "mountains", "friendship"]


def prompts(seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    out = [f"What is the capital of {c}?" for c in COUNTRIES]
    out += [f"Explain {t} in one sentence." for t in TOPICS]
    out += [f"What is {rng.randint(21, 60)} + {rng.randint(2, 20)}?" for _ in range(20)]
    out += [f"Give me a synonym for \"{w}\"." for w in WORDS]
    out += [f"Write one sentence about {s}." for s in SUBJECTS]
    assert not {i.prompt for i in candidate_items()} & set(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--home", type=Path, required=True, help="hotpeft home with the converted default model")
    p.add_argument("--model", default="default", help="base model (as `hotpeft serve --model`)")
    p.add_argument("--out", type=Path, required=True, help="chat JSONL to write")
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args()
    base = load_base(resolve_model(args.model, args.home), "none", device=torch.device("cpu"), dtype=torch.float32)
    asked = prompts()
    ids = []
    for n, text in enumerate(asked):
        messages, _ = parse_chat({"messages": [{"role": "user", "content": text},
                                               {"role": "assistant", "content": "-"}]}, "replay", n)
        ids.append(data_mod.encode(data_mod.Record(n, messages=messages), base.tokenizer, 1 << 20).prompt_ids)
    replies = generate(base.model, base.tokenizer, ids, max_new_tokens=args.max_new_tokens,
                       eos_ids=sorted(eos_ids(base)), pad=pad_id(base.tokenizer), device=torch.device("cpu"))
    with args.out.open("w") as f:
        for text, reply in zip(asked, replies):
            f.write(json.dumps({"messages": [{"role": "user", "content": text},
                                             {"role": "assistant", "content": reply}]}) + "\n")
    print(f"{len(asked)} examples -> {args.out}")


if __name__ == "__main__":
    main()
