"""lm-evaluation-harness tasks for `hotpeft eval --benchmark`: generated from our own data, or the user's YAML.

    tasks = write_tasks(folder)               # {name: folder/<name>.yaml}, each with its JSONL beside it
    spec = resolve_tasks("hotpeft_intents_mc", workdir)      # a generated task, by name
    spec = resolve_tasks("my_tasks/", workdir)               # every task YAML of a folder, used as it is

Generated tasks (nothing from the hub; the same files on every machine):
    hotpeft_intents_mc      multiple choice (log-likelihood; acc, acc_norm): the held-out ticket-intent
                            examples of `hotpeft demo-data`; the context is the user's message, the choices
                            the five intent labels
    hotpeft_retention_gen   generation (generate_until; exact_match ignoring case, punctuation and the
                            whitespace around the first line): short questions with checkable answers,
                            trainer/retention.py's default set before it is cut to what a base answers

lm-eval runs offline here, so a task YAML must read local files: `dataset_path` json, csv, parquet,
text or arrow with local `dataset_kwargs.data_files`, or a local folder. Anything else is refused
before lm-eval starts, naming the file and the flag.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from hotpeft.trainer.demo import INTENT_INSTRUCTION, INTENTS, write_demo
from hotpeft.trainer.errors import ConfigInvalid
from hotpeft.trainer.retention import candidate_items

INTENTS_TASK = "hotpeft_intents_mc"
RETENTION_TASK = "hotpeft_retention_gen"
GENERATED = (INTENTS_TASK, RETENTION_TASK)
MAX_DOCS = 100
INTENT_CHOICES = sorted(INTENTS)
INTENT_DOC_TO_TEXT = "{{prompt}}\nLabel:"
RETENTION_DOC_TO_TEXT = "Question: {{prompt}}\nAnswer:"
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}  # datasets' packaged builders: files, no hub
FLAG = "benchmark"


@dataclass(frozen=True)
class TaskSpec:
    """What lm-eval is told: `--tasks ','.join(names) --include_path include_path`."""

    names: list[str]
    include_path: Path
    output_types: dict[str, str]  # task -> multiple_choice | generate_until | loglikelihood | ...

    @property
    def loglikelihood(self) -> bool:
        """Whether some task scores log-likelihoods (which lm-eval's chat-completions model cannot)."""
        return any(t != "generate_until" for t in self.output_types.values())


# ---- generated tasks ------------------------------------------------------------------------------
def intent_docs() -> list[dict]:
    """The held-out ticket-intent examples `hotpeft demo-data` writes: {id, prompt, message, choices, answer}."""
    with tempfile.TemporaryDirectory(prefix="hotpeft-demo-") as tmp:
        path = write_demo(Path(tmp))["ticket-intent.valid"]
        rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    docs = []
    for i, row in enumerate(rows[:MAX_DOCS]):
        user, assistant = row["messages"][0]["content"], row["messages"][1]["content"]
        message = user.removeprefix(INTENT_INSTRUCTION.split("{message}")[0])
        docs.append({"id": i, "prompt": user, "message": message, "choices": INTENT_CHOICES,
                     "answer": INTENT_CHOICES.index(assistant)})
    return docs


def intent_context(doc: dict) -> str:
    """The context lm-eval scores the choices after (the YAML's `doc_to_text`, rendered here)."""
    return INTENT_DOC_TO_TEXT.replace("{{prompt}}", doc["prompt"])


def intent_continuations(doc: dict) -> list[str]:
    """What lm-eval scores for each choice: the target delimiter (one space) and the label."""
    return [" " + c for c in doc["choices"]]


def default_items() -> list:
    return candidate_items()


def _question(item) -> tuple[str, list[str]]:
    """(prompt, accepted answers) of a dict {prompt, completion} or of a retention Item (answer: 'a|b')."""
    if isinstance(item, dict):
        return str(item["prompt"]), [str(item["completion"]).strip()]
    return str(item.prompt), [a.strip() for a in str(item.answer).split("|") if a.strip()]


def retention_docs(items: list | None = None) -> list[dict]:
    """{id, prompt, answers, kind} for the first MAX_DOCS items (default: `default_items()`)."""
    docs = []
    for i, item in enumerate((default_items() if items is None else items)[:MAX_DOCS]):
        prompt, answers = _question(item)
        kind = item.get("kind", "") if isinstance(item, dict) else getattr(item, "kind", "")
        docs.append({"id": i, "prompt": prompt, "answers": answers, "kind": kind})
    return docs


def _write_task(folder: Path, name: str, docs: list[dict], config: dict) -> Path:
    data = (folder / f"{name}.jsonl").resolve()
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", **config, "num_fewshot": 0, "metadata": {"version": 1.0}}
    path = folder / f"{name}.yaml"
    # JSON is YAML: quoting every value keeps the Jinja braces and newlines exactly as written
    path.write_text("".join(f"{k}: {json.dumps(v, ensure_ascii=False)}\n" for k, v in config.items()), encoding="utf-8")
    return path


def write_tasks(folder: Path, items: list | None = None) -> dict[str, Path]:
    """Write both generated tasks (YAML + JSONL) into `folder`; `items` feeds the generation task
    (dicts {prompt, completion[, kind]} or retention Items; default `default_items()`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mean = {"aggregation": "mean", "higher_is_better": True}
    intents = _write_task(folder, INTENTS_TASK, intent_docs(), {
        "output_type": "multiple_choice", "doc_to_text": INTENT_DOC_TO_TEXT, "doc_to_choice": "choices",
        "doc_to_target": "answer", "target_delimiter": " ",
        "metric_list": [{"metric": "acc", **mean}, {"metric": "acc_norm", **mean}]})
    retention = _write_task(folder, RETENTION_TASK, retention_docs(items), {
        "output_type": "generate_until", "doc_to_text": RETENTION_DOC_TO_TEXT,
        "doc_to_target": "answers",  # a list: right when the reply matches any accepted answer
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 16, "do_sample": False, "temperature": 0.0},
        "metric_list": [{"metric": "exact_match", **mean, "ignore_case": True, "ignore_punctuation": True,
                         "regexes_to_ignore": ["^\\s+", "\\s+$"]}]})
    return {INTENTS_TASK: intents, RETENTION_TASK: retention}


# ---- the user's task YAMLs ------------------------------------------------------------------------
class _TaskLoader(yaml.SafeLoader):
    """lm-eval's YAML: `!function module.fn` tags are kept as their text (only the data source is checked here)."""


_TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_scalar(node)
                                  if isinstance(node, yaml.ScalarNode) else None)


def _read_yaml(path: Path, spec: str) -> dict:
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        problem = " ".join(str(e).split())
        raise ConfigInvalid(FLAG, f"--benchmark {spec}: {path} is not a readable YAML file ({problem})") from e
    if not isinstance(config, dict):
        raise ConfigInvalid(FLAG, f"--benchmark {spec}: {path} is not a task (its YAML is not a mapping)")
    return config


def load_task_yaml(path: Path, *, spec: str, depth: int = 0) -> dict:
    """The YAML as lm-eval reads it (its `include:` merged under it); refused naming the file and the problem."""
    config = _read_yaml(path, spec)
    include = config.pop("include", None)
    if include and depth < 4:
        parent = load_task_yaml((path.parent / str(include)).resolve(), spec=spec, depth=depth + 1)
        config = {**parent, **config}
    return config


def _remote(value: str) -> bool:
    return "://" in value


def _local_file(value: str) -> bool:
    """A file, folder or glob that matches here; a relative one from the current directory, where lm-eval
    (datasets, in fact) reads it from."""
    p = Path(value).expanduser()
    if p.exists():
        return True
    root, pattern = (Path(p.anchor), str(p.relative_to(p.anchor))) if p.is_absolute() else (Path.cwd(), value)
    try:
        return any(root.glob(pattern))
    except (ValueError, OSError):  # not a pattern glob accepts
        return False


def _data_files(config: dict) -> list[str]:
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        files = [f for v in files.values() for f in (v if isinstance(v, list) else [v])]
    elif isinstance(files, str):
        files = [files]
    return [str(f) for f in files or []]


def check_local(path: Path, config: dict, *, spec: str) -> None:
    """Refuse a task whose data would come from the hub (or from any URL): lm-eval runs offline here."""
    dataset = str(config.get("dataset_path", "") or "")
    files = _data_files(config)
    if dataset in LOCAL_BUILDERS and files and not any(_remote(f) for f in files):
        missing = [f for f in files if not _local_file(f)]
        if not missing:
            return
        raise ConfigInvalid(FLAG, f"--benchmark {spec}: {path} reads data_files that are not here: {missing} "
                                  f"(a relative path is read from the current directory, {Path.cwd()})")
    if dataset and dataset not in LOCAL_BUILDERS and not _remote(dataset) and Path(dataset).expanduser().is_dir():
        return  # a local dataset folder
    where = (f"dataset_path {dataset!r} with data_files {files}" if files else f"dataset_path {dataset!r}") \
        if dataset else "no dataset_path"
    raise ConfigInvalid(FLAG, (
        f"--benchmark {spec}: {path} needs data from the Hugging Face hub or the network ({where}); "
        f"benchmarks run offline against the server, so give a task whose dataset_path is one of "
        f"{', '.join(sorted(LOCAL_BUILDERS))} with local dataset_kwargs.data_files (or a local folder), "
        f"or a generated task: {', '.join(GENERATED)}"))


def _task_of(path: Path, spec: str) -> tuple[str, str]:
    config = load_task_yaml(path, spec=spec)
    name = config.get("task")
    if not isinstance(name, str) or not name.strip():
        got = "a list (a group config)" if isinstance(name, list) else repr(name)
        raise ConfigInvalid(FLAG, f"--benchmark {spec}: {path} has no `task:` name (got {got}); "
                                  "a task YAML names its task with `task: <name>`")
    check_local(path, config, spec=spec)
    return name, str(config.get("output_type") or "generate_until")  # lm-eval's default output_type


def resolve_tasks(spec: str, workdir: Path, items: list | None = None) -> TaskSpec:
    """A generated task's name (written into `workdir`), a task YAML, or a folder of them (every one checked)."""
    if spec in GENERATED:
        write_tasks(workdir, items)
        kind = "multiple_choice" if spec == INTENTS_TASK else "generate_until"
        return TaskSpec([spec], Path(workdir), {spec: kind})
    path = Path(spec).expanduser()
    if path.is_dir():
        yamls = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
        if not yamls:
            raise ConfigInvalid(FLAG, f"--benchmark {spec}: the folder has no task YAML (*.yaml)")
        included = set()  # templates other YAMLs include are not tasks of their own
        for p in yamls:
            include = _read_yaml(p, spec).get("include")
            if include:
                included.add((p.parent / str(include)).resolve())
        found = [_task_of(p, spec) for p in yamls if p.resolve() not in included]
        return TaskSpec([n for n, _ in found], path.resolve(), dict(found))
    if path.is_file():
        name, kind = _task_of(path, spec)
        return TaskSpec([name], path.resolve().parent, {name: kind})
    raise ConfigInvalid(FLAG, f"--benchmark {spec}: neither a generated task ({', '.join(GENERATED)}) nor a task "
                              "YAML file or folder")
