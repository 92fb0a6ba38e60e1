"""Retention (catastrophic forgetting): general abilities the base has, which a task adapter should keep.

Every evaluation of the trainer also scores a retention set: the base and the adapter answer the
same questions, greedily, and the drop is how much of what the base could do the adapter lost.

    default set   generated here at a fixed seed: short factual questions (capitals, everyday facts),
                  simple arithmetic and instructions with a checkable format (a word in capitals, a
                  number only, a yes/no answer). Only the items the base being evaluated answers
                  correctly are kept, so the base scores 1.0 and the adapter's score is the share it
                  still answers: retention = adapter score, forgetting = 1 - retention.
    --retention F the user's own set, in the training formats (chat or prompt/completion); every item
                  is scored for both models and the drop is base score - adapter score.

An answer is right when the expected answer appears in the first line of the reply as whole words,
ignoring case and punctuation (a number: the last number of that line is the answer, as in "3 + 4 =
7"; a format item: its own check, see `correct`).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from hotpeft.trainer import data as data_mod
from hotpeft.trainer.chat_data import parse_chat
from hotpeft.trainer.errors import DatasetInvalid

SEED = 20261201

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Germany", "Berlin"), ("Spain", "Madrid"),
            ("the United Kingdom", "London"), ("Russia", "Moscow"), ("China", "Beijing"), ("Egypt", "Cairo"),
            ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
            ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
            ("India", "New Delhi"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Poland", "Warsaw"),
            ("Thailand", "Bangkok"), ("Cuba", "Havana"), ("Turkey", "Ankara")]
FACTS = [("How many days are in a week?", "seven|7"), ("How many legs does a spider have?", "eight|8"),
         ("What colour is the sky on a clear day?", "blue"), ("What is the opposite of hot?", "cold"),
         ("What is frozen water called?", "ice"), ("Which planet do we live on?", "Earth"),
         ("How many months are in a year?", "twelve|12"), ("What colour is grass?", "green"),
         ("What is the largest ocean on Earth?", "Pacific"), ("Which animal is known as the king of the jungle?",
                                                              "lion"),
         ("What do bees make?", "honey"), ("What is the opposite of up?", "down"),
         ("How many hours are in a day?", "24|twenty-four|twenty four"), ("What is the chemical symbol for water?",
                                                                          "H2O"),
         ("Who wrote Romeo and Juliet?", "Shakespeare"), ("What gas do plants take in from the air?",
                                                         "carbon dioxide|CO2")]
YES_NO = [("Is fire hot?", "yes"), ("Is ice hot?", "no"), ("Can fish swim?", "yes"), ("Can a cat fly?", "no"),
          ("Is the sun bright?", "yes"), ("Is snow black?", "no"), ("Do birds have wings?", "yes"),
          ("Is a mouse bigger than an elephant?", "no"), ("Is water wet?", "yes"), ("Is a stone soft?", "no")]
WORDS = ["apple", "river", "green", "house", "music", "table", "cloud", "paper", "tiger", "light"]


@dataclass(frozen=True)
class Item:
    prompt: str  # the user's message (chat) or the prompt (completion format)
    answer: str  # accepted answers, separated by |
    kind: str  # fact, arithmetic, format, or "user" for a --retention file
    check: str = "words"  # words, number, case, exact or first (see `correct`)
    chat: bool = True

    def to_record(self, line: int) -> data_mod.Record:
        if self.chat:
            messages, _ = parse_chat({"messages": [{"role": "user", "content": self.prompt},
                                                   {"role": "assistant", "content": self.answer.split("|")[0]}]},
                                     "retention set", line)
            return data_mod.Record(line, messages=messages)
        return data_mod.Record(line, prompt=self.prompt, completion=self.answer)


def candidate_items(seed: int = SEED) -> list[Item]:
    """The default set before filtering: the same list on every machine."""
    rng = random.Random(seed)
    items = [Item(f"What is the capital of {country}? Answer with the city name only.", city, "fact")
             for country, city in CAPITALS]
    items += [Item(q + " Answer in one word.", a, "fact") for q, a in FACTS]
    for _ in range(24):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        op = rng.choice("+-" if a > b else "+")
        items.append(Item(f"What is {a} {op} {b}? Answer with the number only.", str(a + b if op == "+" else a - b),
                          "arithmetic", "number"))
    for word in WORDS:
        items.append(Item(f"Write the word \"{word}\" in capital letters and nothing else.", word.upper(), "format",
                          "case"))
        items.append(Item(f"Repeat this word exactly, and nothing else: {word}", word, "format", "exact"))
    items += [Item(f"Answer with yes or no only. {q}", a, "format", "first") for q, a in YES_NO]
    rng.shuffle(items)
    return items


def user_items(path: Path) -> list[Item]:
    """A --retention file in the training formats; the last assistant message (or completion) is the answer."""
    records = data_mod.read_jsonl(path, what="retention file", min_examples=1)
    items = []
    for rec in records:
        if rec.messages is None:
            items.append(Item(rec.prompt, rec.completion.strip(), "user", chat=False))
            continue
        users = [m for m in rec.messages if m["role"] == "user"]
        answer = next((m.get("content") for m in reversed(rec.messages) if m["role"] == "assistant"), None)
        if len(users) != 1 or not isinstance(answer, str) or not answer.strip():
            raise DatasetInvalid(f"retention file line {rec.line}: an item is one user message and one assistant "
                                 "answer (text)", param="retention")
        items.append(Item(users[0]["content"], answer.strip(), "user"))
    return items


def _words(text: str) -> str:
    return " " + " ".join(re.findall(r"[\w]+", text.lower())) + " "


def correct(reply: str, item: Item) -> bool:
    """Whether `reply` answers `item`, by the item's check, on the reply's first line:

    words   the answer's words appear in it, in order, ignoring case and punctuation
    number  its last number is the answer ("3 + 4 = 7")
    case    the answer appears in it as a word, case included ("APPLE")
    exact   it is the answer, ignoring case, quotes and final punctuation
    first   its first word is the answer ("Yes, it is.")"""
    first = next((line for line in reply.strip().splitlines() if line.strip()), "")
    for answer in item.answer.split("|"):
        if item.check == "number":
            ok = re.findall(r"-?\d+", first)[-1:] == [answer]
        elif item.check == "case":
            ok = re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", first) is not None
        elif item.check == "exact":
            ok = _words(first) == _words(answer)
        elif item.check == "first":
            ok = _words(first).split()[:1] == _words(answer).split()
        else:
            ok = _words(answer) in _words(first)
        if ok:
            return True
    return False


def summarize(items: list[Item], base_ok: list[bool], adapter_ok: list[bool], *, name: str,
              filtered: bool) -> dict:
    """{"set", "items", "base", "adapter", "drop", "by_kind"}: scores are shares of items answered right."""
    kept = [i for i, ok in enumerate(base_ok) if ok] if filtered else list(range(len(items)))
    out: dict = {"set": name, "candidates": len(items), "items": len(kept)}
    if not kept:
        return out | {"base": None, "adapter": None, "drop": None, "by_kind": {}}

    def share(ok: list[bool], idx: list[int]) -> float:
        return sum(ok[i] for i in idx) / len(idx)

    by_kind = {}
    for kind in sorted({items[i].kind for i in kept}):
        idx = [i for i in kept if items[i].kind == kind]
        by_kind[kind] = {"items": len(idx), "base": share(base_ok, idx), "adapter": share(adapter_ok, idx)}
    base, adapter = share(base_ok, kept), share(adapter_ok, kept)
    return out | {"base": base, "adapter": adapter, "drop": base - adapter, "by_kind": by_kind}

