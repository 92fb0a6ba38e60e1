"""Training data: JSONL in OpenAI's chat fine-tuning format or prompt/completion pairs.

    {"messages": [{"role": "system" | "user" | "assistant", "content": "...", "weight": 0 | 1}, ...]}
    {"messages": [..., {"role": "assistant", "tool_calls": [...]}, {"role": "tool", ...}, ...], "tools": [...]}
    {"prompt": "...", "completion": "..."}

Chat examples (function calling included: `chat_data.py`) are rendered with the base's chat
template exactly as the server renders a chat request, and the loss covers the assistant messages
only (those without `"weight": 0`), tool-call text included. Pairs are plain text, prompt then
completion, as `/v1/completions` serves them; the loss covers the completion and the
end-of-sequence token, so the adapter learns where to stop.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from hotpeft.trainer.chat_data import chat_segments, line_error, parse_chat
from hotpeft.trainer.errors import DatasetInvalid

IGNORE = -100  # label of a token that is not trained (prompt, template, padding)


@dataclass(frozen=True)
class Record:
    """One line of a JSONL file, checked."""

    line: int
    messages: list[dict] | None = None
    prompt: str | None = None
    completion: str | None = None
    tools: list[dict] | None = None  # chat lines with function calling: the functions the assistant may call

    @property
    def format(self) -> str:
        return "chat" if self.messages is not None else "completion"


def parse_jsonl(data: bytes | str, *, what: str = "training file") -> list[Record]:
    """Every line checked; the first bad one raises DatasetInvalid naming its line number."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            raise line_error(what, line, "not valid UTF-8") from e
    records: list[Record] = []
    fmt = None
    for n, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise line_error(what, n, f"not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(obj, dict):
            raise line_error(what, n, f"expected a JSON object, got {type(obj).__name__}")
        if "messages" in obj:
            messages, tools = parse_chat(obj, what, n)
            rec = Record(n, messages=messages, tools=tools)
        elif "prompt" in obj or "completion" in obj:
            for key in ("prompt", "completion"):
                if not isinstance(obj.get(key), str):
                    raise line_error(what, n, f"'{key}' must be a string (a pair needs both 'prompt' and "
                                              "'completion')")
            if not obj["completion"]:
                raise line_error(what, n, "'completion' is empty: there is nothing to train on")
            extra = set(obj) - {"prompt", "completion"}
            if extra:
                raise line_error(what, n, f"unexpected field(s) {', '.join(sorted(extra))} beside 'prompt' and "
                                          "'completion'")
            rec = Record(n, prompt=obj["prompt"], completion=obj["completion"])
        else:
            raise line_error(what, n, "expected {\"messages\": [...]} or {\"prompt\": ..., \"completion\": ...}, "
                                 f"got the field(s) {', '.join(sorted(obj)) or 'none'}")
        if fmt is not None and rec.format != fmt:
            raise line_error(what, n, f"a {rec.format} example in a file of {fmt} examples; use one format per file")
        fmt = rec.format
        records.append(rec)
    return records


def read_jsonl(path: Path, *, what: str = "training file", min_examples: int = 1) -> list[Record]:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DatasetInvalid(f"cannot read the {what} {path}: {e.strerror}") from e
    records = parse_jsonl(data, what=what)
    check_count(records, what, min_examples)
    return records


def check_count(records: list[Record], what: str, min_examples: int) -> None:
    if len(records) < min_examples:
        raise DatasetInvalid(f"the {what} has {len(records)} example(s); at least {min_examples} are needed")


# ---- tokenization ---------------------------------------------------------------------------------
@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken
    prompt_ids: list[int]  # what generation starts from: everything before the last trained span
    reference: str  # the last trained span's text: the expected answer for ROUGE / exact match
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def _segments(rec: Record, tokenizer, template) -> tuple[list[tuple[str, bool]], int, str]:
    """(text, trained) pieces; the index of the last trained piece; its reference text."""
    if rec.messages is None:
        prompt = template(rec.prompt)
        return [(prompt, False), (rec.completion, True)], 1, rec.completion
    return chat_segments(rec.messages, rec.tools, rec.line, tokenizer, template)


def encode(rec: Record, tokenizer, max_length: int, template=lambda p: p) -> Encoded | None:
    """Token ids and labels, truncated to max_length; None when nothing trainable is left."""
    pieces, last, reference = _segments(rec, tokenizer, template)
    ids: list[int] = []
    labels: list[int] = []
    prompt_ids: list[int] = []
    for i, (text, trained) in enumerate(pieces):
        # As the server tokenizes: a completion prompt with the tokenizer's specials, a rendered chat without.
        first = i == 0 and rec.messages is None
        piece = tokenizer(text, add_special_tokens=first)["input_ids"] if text else []
        if i == last and rec.messages is None and tokenizer.eos_token_id is not None:
            piece = piece + [tokenizer.eos_token_id]
        if i == last:
            prompt_ids = list(ids)
        ids.extend(piece)
        labels.extend(piece if trained else [IGNORE] * len(piece))
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE for x in labels[1:]):  # the first label is never predicted
        return None
    return Encoded(ids, labels, prompt_ids[-max_length:], reference, truncated)


@dataclass
class Prepared:
    train: list[Encoded]
    valid: list[Encoded]
    format: str
    truncated: int = 0  # examples cut at max_length (train + validation)
    dropped: int = 0  # examples with nothing left to train on after truncation
    notes: list[str] = field(default_factory=list)

    @property
    def train_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.train)


def prepare(train_path: Path, valid_path: Path | None, tokenizer, *, max_length: int, template,
            validation_fraction: float, seed: int) -> Prepared:
    """Read, check, split (fixed seed) and tokenize the training and validation data."""
    records = read_jsonl(train_path, what="training file", min_examples=2)
    if valid_path is not None:
        valid_records = read_jsonl(valid_path, what="validation file", min_examples=1)
        if valid_records[0].format != records[0].format:
            raise DatasetInvalid(f"the validation file holds {valid_records[0].format} examples but the training "
                                 f"file {records[0].format} examples; use one format for both")
        train_records = records
    else:
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        n_valid = min(len(records) - 1, max(1, round(len(records) * validation_fraction)))
        held = set(order[:n_valid])
        train_records = [r for i, r in enumerate(records) if i not in held]
        valid_records = [r for i, r in enumerate(records) if i in held]
    out = Prepared([], [], records[0].format)
    for dest, recs in ((out.train, train_records), (out.valid, valid_records)):
        for rec in recs:
            enc = encode(rec, tokenizer, max_length, template)
            if enc is None:
                out.dropped += 1
                continue
            out.truncated += enc.truncated
            dest.append(enc)
    if out.truncated:
        out.notes.append(f"{out.truncated} example(s) longer than --max-length {max_length} tokens were truncated")
    if out.dropped:
        out.notes.append(f"{out.dropped} example(s) had no completion token left within --max-length {max_length} "
                         "and were skipped")
    if not out.train or not out.valid:
        which = "training" if not out.train else "validation"
        raise DatasetInvalid(f"no {which} example has a completion within --max-length {max_length} tokens; raise "
                             "--max-length or shorten the prompts")
    return out
