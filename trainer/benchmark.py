"""`hotpeft eval --benchmark TASK`: lm-evaluation-harness against a running server, the base and adapters
side by side, the scores stored on the adapter versions.

    hotpeft eval --benchmark hotpeft_intents_mc --adapter support-intent --home ~/.hotpeft
    hotpeft eval --benchmark my_task.yaml --adapter a --adapter b@3 --url http://HOST:8000 --limit 50

lm-eval runs as a child process once per model (its own command line; offline, HF_*_OFFLINE=1), with
`local-completions` on the server's /v1/completions: log-likelihoods come from echo + logprobs, generations
from a plain completion. It counts tokens with the tokenizer of the server's base folder on this machine
(--model / --home resolve it as the trainer does), and the server's base id must be that folder's.

--chat: lm-eval renders each document as a chat (`--apply_chat_template`). Generation-only tasks then go
to /v1/chat/completions (`local-chat-completions`), where the server applies each adapter's own chat
template. lm-eval's chat model cannot score log-likelihoods, so a multiple-choice task stays on
/v1/completions, rendered with the base folder's chat template.

Each adapter version benchmarked gets, in the registry the server watches (it shows within a second):
    metrics["benchmarks"][task] = {"metric": main metric, "adapter": its score, "base": the base's score,
                                   "samples": documents scored, "at": unix seconds, "chat": --chat given}
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from hotpeft.adapters.errors import AdapterError
from hotpeft.adapters.names import BASE_ALIAS, parse_model_ref
from hotpeft.adapters.paths import default_registry_url
from hotpeft.adapters.registry import AdapterRegistry, VersionRecord
from hotpeft.model.source import ModelUnavailable, resolve_model
from hotpeft.trainer.benchmark_tasks import TaskSpec, resolve_tasks
from hotpeft.trainer.env import TrainerEnv
from hotpeft.trainer.errors import ConfigInvalid, TrainerError

LM_EVAL_TIMEOUT_S = 6 * 3600  # one model's run; a hung lm-eval must not hang `hotpeft eval` for ever
# lm-eval's own entry point, with one change: the task manager indexes only --include_path, not lm-eval's
# ~14,000 built-in task files (seconds of every run, and none of them is offline).
LM_EVAL_MAIN = """
import lm_eval.tasks
from lm_eval.__main__ import cli_evaluate


class IncludedTasksOnly(lm_eval.tasks.TaskManager):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("include_defaults", False)
        super().__init__(*args, **kwargs)


lm_eval.tasks.TaskManager = IncludedTasksOnly
cli_evaluate()
"""
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
CONCURRENT = 4  # requests in flight per lm-eval run: the server batches them
# lm-eval processes at once (one per model): each starts by importing for seconds on a core, and the server
# needs cores too (on 2 cores the runs go one after the other)
PARALLEL_RUNS = max(1, min(4, (os.cpu_count() or 1) // 4))


class ServerUnreachable(TrainerError):
    """No hotpeft server answers at --url."""


class BenchmarkFailed(TrainerError):
    """lm-eval itself failed; the message ends with its log."""


# ---- the server -----------------------------------------------------------------------------------
def _get(url: str, path: str, api_key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(url.rstrip("/") + path, headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise ServerUnreachable(f"--url {url}: no server answers ({type(e).__name__}: {e}); start one with "
                                "`hotpeft serve` or pass the --url it listens on", param="url") from e
    if r.status_code in (401, 403):
        raise ConfigInvalid("api_key", f"--api-key: the server at --url {url} refused the request to {path} "
                                       f"(HTTP {r.status_code}); pass a key it accepts (env HOTPEFT_API_KEY)")
    return r


def served_base(url: str, api_key: str | None) -> dict:
    """The base model's card from GET /v1/models (the entry of kind 'base'; the first one otherwise)."""
    r = _get(url, "/v1/models", api_key)
    try:
        cards = r.json()["data"]
        return next((c for c in cards if c.get("kind") == "base"), cards[0])
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ServerUnreachable(f"--url {url}: GET /v1/models answered HTTP {r.status_code} without a model list; "
                                "is it a hotpeft server?", param="url") from e


def tokenizer_folder(env: TrainerEnv, base_id: str, url: str) -> Path:
    """The local folder of the server's base (its tokenizer is what lm-eval counts tokens with)."""
    try:
        source = resolve_model(env.model, env.home)
    except ModelUnavailable as e:
        raise ConfigInvalid("model", str(e)) from e
    if source.model_id != base_id:
        raise ConfigInvalid("model", f"--model {env.model} is {source.model_id!r}, but the server at --url {url} "
                                     f"serves the base {base_id!r}; pass --model with that base's folder, so that "
                                     "lm-eval tokenizes as the server does")
    return source.path


def resolve_versions(env: TrainerEnv, refs: list[str], url: str, api_key: str | None) -> list[VersionRecord]:
    """Each --adapter NAME (the active version) or NAME@N, from the registry of --home / --registry-url,
    checked to be what the server at `url` serves (the same registry)."""
    if not refs:
        return []
    default = Path(default_registry_url(env.home).removeprefix("sqlite:///"))
    if env.registry_url is None and not default.is_file():  # opening it would create an empty one
        raise ConfigInvalid("adapter", f"--adapter: --home {env.home} has no registry; pass the server's --home "
                                       "or --registry-url")
    registry = AdapterRegistry(env.registry)
    try:
        snap = registry.snapshot()
    finally:
        registry.close()
    records = []
    for ref in refs:
        if ref == BASE_ALIAS:
            raise ConfigInvalid("adapter", "--adapter base: the base is always benchmarked; name adapters only")
        try:
            parsed = parse_model_ref(ref, param="adapter")
        except AdapterError as e:
            raise ConfigInvalid("adapter", f"--adapter {ref}: {e.message}") from e
        versions = snap.versions.get(parsed.name, {})
        number = snap.active.get(parsed.name) if parsed.version is None else parsed.version
        if number not in versions:
            known = ", ".join(sorted(snap.active)) or "none"
            raise ConfigInvalid("adapter", f"--adapter {ref}: not in {_registry_label(env)} "
                                           f"(adapters: {known}); pass the server's --home or --registry-url")
        record = versions[number]
        r = _get(url, f"/v1/models/{record.key}", api_key)
        card = r.json() if r.status_code == 200 else {}
        if card.get("version") != record.version or card.get("created") != int(record.created):
            raise ConfigInvalid("adapter", f"--adapter {ref}: the server at --url {url} does not serve {record.key} "
                                           f"of {_registry_label(env)} (HTTP {r.status_code}); pass the "
                                           "server's --home or --registry-url")
        records.append(record)
    return records


def _registry_label(env: TrainerEnv) -> str:
    """The registry in a message, without a password a --registry-url may hold."""
    return f"the registry of --home {env.home}" if env.registry_url is None else "the --registry-url registry"


# ---- lm-eval --------------------------------------------------------------------------------------
def lm_eval_command(url: str, spec: TaskSpec, model: str, tokenizer: Path, out: Path, *, limit: int | None,
                    chat: bool, max_length: int | None = None) -> list[str]:
    args = {"model": model, "num_concurrent": CONCURRENT, "max_retries": 1, "timeout": 300}
    if chat and not spec.loglikelihood:
        backend = "local-chat-completions"  # the server applies the adapter's own chat template
        args.update(base_url=f"{url.rstrip('/')}/v1/chat/completions", tokenizer_backend="none")
    else:
        backend = "local-completions"
        args.update(base_url=f"{url.rstrip('/')}/v1/completions", tokenizer=tokenizer,
                    tokenizer_backend="huggingface")
    if max_length:
        args["max_length"] = max_length
    cmd = [sys.executable, "-c", LM_EVAL_MAIN, "--model", backend,
           "--model_args", ",".join(f"{k}={v}" for k, v in args.items()), "--tasks", ",".join(spec.names),
           "--include_path", str(spec.include_path), "--batch_size", "1", "--output_path", str(out)]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    return cmd + (["--apply_chat_template"] if chat else [])


def _scores(results: dict, task: str) -> dict:
    """{"metric": main metric, "values": {metric: value}, "samples": n} of one task in lm-eval's results JSON."""
    values = {}
    for key, value in results["results"][task].items():
        metric, _, filt = key.partition(",")
        if filt and "_stderr" not in metric and isinstance(value, (int, float)):
            values[metric if filt == "none" else f"{metric}/{filt}"] = float(value)
    if not values:
        raise BenchmarkFailed(f"lm-eval gave no metric for {task}: {results['results'][task]}")
    samples = results.get("n-samples", {}).get(task, {}).get("effective")
    return {"metric": next(iter(values)), "values": values, "samples": samples}


def run_lm_eval(url: str, spec: TaskSpec, model: str, tokenizer: Path, workdir: Path, *, api_key: str | None,
                limit: int | None, chat: bool, max_length: int | None = None) -> dict[str, dict]:
    """One lm-eval run for one served model: {task: `_scores`}."""
    out = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(out / "datasets-cache"),
           "OPENAI_API_KEY": api_key or "unused"}  # lm-eval's local-completions sends it as the bearer token
    cmd = lm_eval_command(url, spec, model, tokenizer, out / "results", limit=limit, chat=chat, max_length=max_length)
    # in the caller's directory: a task's relative data_files are read from there, as lm-eval itself would
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LM_EVAL_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise BenchmarkFailed(f"lm-eval ran past {LM_EVAL_TIMEOUT_S} s on {model} and was stopped") from e
    found = sorted((out / "results").rglob("results_*.json"))
    if proc.returncode != 0 or not found:
        log = (proc.stdout + proc.stderr)[-4000:]
        raise BenchmarkFailed(f"lm-eval exited with {proc.returncode} on {model}; its log ends:\n{log}")
    results = json.loads(found[-1].read_text(encoding="utf-8"))
    return {task: _scores(results, task) for task in spec.names}


def run_benchmark(url: str, task: str | TaskSpec, models: list[str], tokenizer_folder: Path,
                  api_key: str | None = None, limit: int | None = None, chat: bool = False, *,
                  items: list | None = None, max_length: int | None = None,
                  events: Callable[[str], None] = lambda message: None) -> dict[str, dict[str, dict]]:
    """lm-eval for each served model name: {model: {task: {"metric": main metric, "values": {metric: value},
    "samples": n}}}; `items` feeds the generated generation task (default: the retention candidates).
    `task`: a generated task's name, a task YAML or folder (see benchmark_tasks.resolve_tasks), or a TaskSpec."""
    with tempfile.TemporaryDirectory(prefix="hotpeft-benchmark-") as tmp:
        workdir = Path(tmp)
        spec = task if isinstance(task, TaskSpec) else resolve_tasks(task, workdir / "tasks", items)

        def one(model: str) -> dict[str, dict]:
            events(f"lm-eval: {', '.join(spec.names)} on {model}")
            return run_lm_eval(url, spec, model, Path(tokenizer_folder), workdir, api_key=api_key, limit=limit,
                               chat=chat, max_length=max_length)

        # side by side: the runs overlap, and the server batches the base's and the adapters' requests together
        with ThreadPoolExecutor(max_workers=PARALLEL_RUNS) as pool:
            return dict(zip(models, pool.map(one, models)))


# ---- results --------------------------------------------------------------------------------------
def store_scores(env: TrainerEnv, records: list[VersionRecord], results: dict[str, dict[str, dict]],
                 base: str, *, chat: bool = False) -> list[VersionRecord]:
    """metrics["benchmarks"][task] on each version (results keyed by `record.key`; the base's by `base`);
    `chat`: whether the documents were rendered as chats (--chat), which changes the scores."""
    registry = AdapterRegistry(env.registry)
    now, updated = int(time.time()), []
    try:
        for record in records:
            entries = {}
            for task, scores in results[record.key].items():
                metric = scores["metric"]
                entries[task] = {"metric": metric, "adapter": scores["values"][metric],
                                 "base": results[base][task]["values"].get(metric), "samples": scores["samples"],
                                 "at": now, "chat": chat}
            try:
                updated.append(registry.update_metrics(record.name, record.version, {"benchmarks": entries}))
            except AdapterError as e:  # deleted while lm-eval ran
                raise ConfigInvalid("adapter", f"--adapter {record.key}: {e.message}; its scores were not "
                                               "stored") from e
    finally:
        registry.close()
    return updated


def format_table(results: dict[str, dict[str, dict]]) -> str:
    """Rows task/metric, a column per model (the base first, as given)."""
    models = list(results)
    rows = [["task", "metric", *models]]
    for task in next(iter(results.values()), {}):
        for metric in results[models[0]][task]["values"]:
            values = [results[m][task]["values"].get(metric, float("nan")) for m in models]
            rows.append([task, metric, *(f"{v:.4f}" for v in values)])
    samples = {results[m][t]["samples"] for m in models for t in results[m]}
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + f"\n\ndocuments scored per task: {', '.join(str(s) for s in sorted(samples, key=str))}"
