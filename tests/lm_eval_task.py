"""A small local multiple-choice task for lm-evaluation-harness, written to a folder; nothing from the hub.

    info = write_task(folder)        # folder/<TASK>.yaml and folder/<TASK>.jsonl
    lm_eval --include_path folder --tasks hotpeft_tiny_mc ...

The data is fixed text, so the task is the same on every run; a caller may append its own questions
(`extra`). `context` and `continuations` give the strings lm-eval scores for a question (its `doc_to_text`,
and `target_delimiter` + each choice), so a reference can be computed without lm-eval. The delimiter is
empty and each choice carries its own leading space, so an extra question's choice can be any text (a
model's greedy continuation, say). A few choices have non-ASCII letters: with a byte-level tokenizer they
are tokens that do not decode alone, which a server's logprobs must still count.
"""
from __future__ import annotations

import json
from pathlib import Path

TASK = "hotpeft_tiny_mc"
DOC_TO_TEXT = "Question: {{question}}\nAnswer:"
TARGET_DELIMITER = ""  # the choices carry their leading space

QUESTIONS = [
    ("Which of these is a colour?", ["green", "river", "stone", "paper"], 0),
    ("Which animal has stripes?", ["tiger", "horse", "sheep"], 0),
    ("What do you sit on?", ["cloud", "chair", "sugar", "music"], 1),
    ("Which one is a drink?", ["bread", "plant", "water"], 2),
    ("Where do fish live?", ["ocean", "train", "light", "apple"], 0),
    ("What falls from clouds?", ["rain", "salt", "glass"], 0),
    ("Which is a fruit?", ["apple", "brick", "spoon", "cable"], 0),
    ("What do you read?", ["book", "shoe", "lamp"], 0),
    ("Which is warm?", ["fire", "snow", "ice", "frost"], 0),
    ("Where do you buy a coffee?", ["café", "cave", "cliff"], 0),
    ("How many legs does a spider have?", ["eight", "two", "five", "none"], 0),
    ("Which season is the coldest?", ["summer", "winter", "spring"], 1),
    ("What do bees make?", ["honey", "milk", "silk", "wool"], 0),
    ("Which one flies?", ["bird", "stone", "table"], 0),
    ("What is frozen water?", ["steam", "ice", "sand", "oil"], 1),
    ("Which word means over, in German?", ["über", "unter", "neben"], 0),
    ("What do you write with?", ["pen", "cup", "hat", "key"], 0),
    ("Which is a planet?", ["Mars", "Paris", "Nile"], 0),
    ("What shines at night?", ["moon", "grass", "door", "bread"], 0),
    ("Which one is sweet?", ["sugar", "lemon", "salt"], 0),
]


def documents(extra: list[tuple[str, list[str], int]] = ()) -> list[dict]:
    """The fixed questions (each choice with a leading space), then `extra` (question, choices, answer) as given."""
    rows = [(q, [" " + c for c in choices], a) for q, choices, a in QUESTIONS] + list(extra)
    return [{"id": i, "question": q, "choices": list(c), "answer": a} for i, (q, c, a) in enumerate(rows)]


def context(doc: dict) -> str:
    """`doc_to_text` rendered in Python (the YAML's Jinja template, the same text)."""
    return DOC_TO_TEXT.replace("{{question}}", doc["question"])


def continuations(doc: dict) -> list[str]:
    return [TARGET_DELIMITER + c for c in doc["choices"]]


def write_task(folder: Path, extra: list[tuple[str, list[str], int]] = ()) -> dict:
    """Write the task's YAML and its JSONL data into `folder`; returns {'task', 'yaml', 'data', 'docs'}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    docs = documents(extra)
    data = (folder / f"{TASK}.jsonl").resolve()
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    # JSON is YAML: quoting every value keeps the Jinja braces and the newline exactly as written.
    config = {
        "task": TASK,
        "dataset_path": "json",  # datasets' packaged JSON builder: a local file, no hub
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": DOC_TO_TEXT,
        "doc_to_choice": "choices",  # column names: the list and the index as stored, no template round trip
        "doc_to_target": "answer",
        "target_delimiter": TARGET_DELIMITER,
        "num_fewshot": 0,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    yaml = folder / f"{TASK}.yaml"
    yaml.write_text("".join(f"{k}: {json.dumps(v, ensure_ascii=False)}\n" for k, v in config.items()), encoding="utf-8")
    return {"task": TASK, "yaml": yaml, "data": data, "docs": docs}


if __name__ == "__main__":
    import sys

    print(write_task(Path(sys.argv[1]))["yaml"])
