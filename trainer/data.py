"""Training data: JSONL in OpenAI's chat fine-tuning format or prompt/completion pairs.

    {"messages": [{"role": "system" | "user" | "assistant", "content": "...", "weight": 0 | 1}, ...]}
    {"prompt": "...", "completion": "..."}

Chat examples are rendered with the base's chat template exactly as the server renders a chat
request, and the loss covers the assistant messages only (those without `"weight": 0`). Pairs are
plain text, prompt then completion, as `/v1/completions` serves them; the loss covers the
completion and the end-of-sequence token, so the adapter learns where to stop.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from hotpeft.trainer.errors import DatasetInvalid

ROLES = ("system", "developer", "user", "assistant")
IGNORE = -100  # label of a token that is not trained (prompt, template, padding)


@dataclass(frozen=True)
class Record:
    """One line of a JSONL file, checked."""

    line: int
    messages: list[dict] | None = None
    prompt: str | None = None
    completion: str | None = None

    @property
    def format(self) -> str:
        return "chat" if self.messages is not None else "completion"


def _fail(what: str, line: int, message: str) -> DatasetInvalid:
    return DatasetInvalid(f"{what}, line {line}: {message}", line=line)


def _parse_messages(value, what: str, line: int) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _fail(what, line, "'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _fail(what, line, f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise _fail(what, line, f"messages[{i}] has unknown role {role!r}; roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise _fail(what, line, f"messages[{i}] ({role}) needs 'content' as a string")
        extra = set(m) - {"role", "content", "weight", "name"}
        if extra:
            raise _fail(what, line, f"messages[{i}] has unsupported field(s) {', '.join(sorted(extra))} (tool calls "
                                    "and functions are not trained)")
        weight = m.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise _fail(what, line, f"messages[{i}].weight must be 0 or 1, got {weight!r}")
        if "weight" in m and role != "assistant":
            raise _fail(what, line, f"messages[{i}].weight is allowed on assistant messages only")
        out.append({"role": "system" if role == "developer" else role, "content": content, "weight": weight})
    if not any(m["role"] == "assistant" and m["weight"] for m in out):
        raise _fail(what, line, "no assistant message to train on (each example needs one without \"weight\": 0)")
    return out


def parse_jsonl(data: bytes | str, *, what: str = "training file") -> list[Record]:
    """Every line checked; the first bad one raises DatasetInvalid naming its line number."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            raise _fail(what, line, "not valid UTF-8") from e
    records: list[Record] = []
    fmt = None
    for n, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise _fail(what, n, f"not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(obj, dict):
            raise _fail(what, n, f"expected a JSON object, got {type(obj).__name__}")
        if "messages" in obj:
            extra = set(obj) - {"messages"}
            if extra:
                raise _fail(what, n, f"unexpected field(s) {', '.join(sorted(extra))} beside 'messages'")
            rec = Record(n, messages=_parse_messages(obj["messages"], what, n))
        elif "prompt" in obj or "completion" in obj:
            for key in ("prompt", "completion"):
                if not isinstance(obj.get(key), str):
                    raise _fail(what, n, f"'{key}' must be a string (a pair needs both 'prompt' and 'completion')")
            if not obj["completion"]:
                raise _fail(what, n, "'completion' is empty: there is nothing to train on")
            extra = set(obj) - {"prompt", "completion"}
            if extra:
                raise _fail(what, n, f"unexpected field(s) {', '.join(sorted(extra))} beside 'prompt' and 'completion'")
            rec = Record(n, prompt=obj["prompt"], completion=obj["completion"])
        else:
            raise _fail(what, n, "expected {\"messages\": [...]} or {\"prompt\": ..., \"completion\": ...}, "
                                 f"got the field(s) {', '.join(sorted(obj)) or 'none'}")
        if fmt is not None and rec.format != fmt:
            raise _fail(what, n, f"a {rec.format} example in a file of {fmt} examples; use one format per file")
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
    msgs = [dict(m, content=template(m["content"])) if m["role"] == "user" else m for m in rec.messages]
    plain = [{"role": m["role"], "content": m["content"]} for m in msgs]
    pieces: list[tuple[str, bool]] = []
    done = ""
    last, reference = -1, ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(plain[:i], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(plain[:i + 1], tokenize=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise DatasetInvalid(f"line {rec.line}: the chat template does not render this conversation "
                                 "incrementally; the assistant turns cannot be located")
        if len(prefix) > len(done):
            pieces.append((prefix[len(done):], False))
        pieces.append((full[len(prefix):], bool(m["weight"])))
        if m["weight"]:
            last, reference = len(pieces) - 1, m["content"]
        done = full
    return pieces, last, reference


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
