"""Multi-task training data: several JSONL files, each with a weight, interleaved with a fixed seed.

    hotpeft train --data summaries.jsonl:2 --data intents.jsonl:1 ...
    hotpeft train --data mixture.yaml ...          # or .json

    # mixture.yaml: paths are relative to the file; weight (default 1), validation and template optional
    tasks:
      - data: summaries.train.jsonl
        validation: summaries.valid.jsonl
        weight: 2
        template: "Summarize the following conversation.\\n\\n{prompt}\\n\\nSummary:"
      - data: intents.train.jsonl

Each task is split (or given its held-out file) on its own, so evaluation reports every task apart.
An epoch has as many examples as all the tasks together; task i gets the share w_i / sum(w) of it,
its examples shuffled and repeated when the share is larger than the file, or a seeded subset of them
when it is smaller (the same subset every epoch: a weight below the file's share trains on fewer of
its examples, not on all of them less often). The tasks' examples are
then interleaved in a seeded random order (and the Trainer reshuffles each epoch with --seed), so
every stretch of training sees the tasks in proportion, never task after task, which would let the
last task overwrite the first.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from hotpeft.trainer.errors import ConfigInvalid


@dataclass(frozen=True)
class Task:
    name: str
    data: Path
    weight: float = 1.0
    validation: Path | None = None
    template: str | None = None  # None: the run's --template


def task_name(path: Path) -> str:
    name = Path(path).name
    for suffix in (".jsonl", ".json", ".train"):
        name = name.removesuffix(suffix)
    return name or "task"


def _weight(raw, where: str) -> float:
    try:
        weight = float(raw)
    except (TypeError, ValueError):
        weight = math.nan
    if not math.isfinite(weight) or weight <= 0:
        raise ConfigInvalid("data", f"{where}: the weight must be a number above 0, got {raw!r}")
    return weight


def is_mixture(path: Path) -> bool:
    """A .yaml/.yml file, or a .json file holding one object with "tasks" (a .json may also be JSONL data)."""
    if path.suffix in (".yaml", ".yml"):
        return True
    if path.suffix != ".json":
        return False
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and "tasks" in doc


def parse_data_args(values: list[str]) -> list[Task]:
    """`--data` values: FILE, FILE:WEIGHT, or one mixture file (.yaml/.yml, or .json with "tasks")."""
    if len(values) == 1 and is_mixture(Path(values[0])):
        return read_mixture(Path(values[0]))
    tasks = []
    for value in values:
        path, sep, weight = value.rpartition(":")
        if not sep or "/" in weight or "\\" in weight:  # no weight: the whole value is the path
            path, weight = value, "1"
        if is_mixture(Path(path)):
            raise ConfigInvalid("data", f"--data {value}: a mixture file is given alone, with its weights inside")
        tasks.append(Task(task_name(Path(path)), Path(path), _weight(weight, f"--data {value}")))
    return unique_names(tasks)


def read_mixture(path: Path) -> list[Task]:
    """A YAML or JSON mixture file (see the module's docstring); errors name the file and the entry."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigInvalid("data", f"--data {path}: cannot read the mixture file: {e.strerror}") from e
    try:
        if path.suffix == ".json":
            doc = json.loads(text)
        else:
            import yaml

            doc = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError or json.JSONDecodeError: either way the file does not parse
        raise ConfigInvalid("data", f"--data {path}: not valid {path.suffix[1:].upper()}: {e}") from e
    entries = doc.get("tasks") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigInvalid("data", f"--data {path}: expected a mapping with a non-empty list 'tasks'")
    tasks = []
    for n, entry in enumerate(entries, start=1):
        where = f"--data {path}: tasks[{n}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("data"), str):
            raise ConfigInvalid("data", f"{where} needs 'data': the path of a JSONL file")
        unknown = set(entry) - {"name", "data", "weight", "validation", "template"}
        if unknown:
            raise ConfigInvalid("data", f"{where}: unknown field(s) {', '.join(sorted(unknown))}; one of name, data, "
                                        "weight, validation, template")
        template = entry.get("template")
        if template is not None and (not isinstance(template, str) or template.count("{prompt}") != 1):
            raise ConfigInvalid("data", f"{where}: 'template' must contain {{prompt}} exactly once")
        data = path.parent / entry["data"]
        valid = path.parent / entry["validation"] if isinstance(entry.get("validation"), str) else None
        tasks.append(Task(str(entry.get("name") or task_name(data)), data, _weight(entry.get("weight", 1), where),
                          valid, template))
    return unique_names(tasks)


def unique_names(tasks: list[Task]) -> list[Task]:
    """Tasks with one name each: a repeated name gets -2, -3, ... (the first free one)."""
    used: set[str] = set()
    out = []
    for t in tasks:
        name, n = t.name, 1
        while name in used:
            n += 1
            name = f"{t.name}-{n}"
        used.add(name)
        out.append(dataclasses.replace(t, name=name))
    return out


def interleave(per_task: list[list], weights: list[float], seed: int) -> list:
    """One epoch of examples mixed by weight, in a seeded random order (see the module's docstring)."""
    rng = random.Random(seed)
    total = sum(len(x) for x in per_task)
    epoch: list = []
    for examples, weight in zip(per_task, weights):
        count = max(1, round(total * weight / sum(weights)))
        order: list = []
        while len(order) < count:  # repeat the shuffled examples when the share is larger than the file
            batch = list(examples)
            rng.shuffle(batch)
            order.extend(batch)
        epoch.extend(order[:count])
    rng.shuffle(epoch)
    return epoch
