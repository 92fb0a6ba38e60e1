"""`/v1/fine_tuning/jobs`: OpenAI's fine-tuning API, training hotpeft adapters on the served base.

A job is checked completely when it is created (files, base, hyper-parameters) and then queued;
the JobManager runs it in a worker process. hotpeft's own options travel in a `hotpeft` object
(the `openai` client sends it with `extra_body={"hotpeft": {...}}`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import time

from fastapi import APIRouter, Query

from hotpeft.adapters.errors import InvalidName
from hotpeft.adapters.names import BASE_ALIAS, validate_name
from hotpeft.server.deps import RuntimeDep
from hotpeft.server.errors import InvalidRequest
from hotpeft.server.runtime import Runtime
from hotpeft.server.api.schemas.fine_tuning import (
    HotpeftJobInfo, Hyperparameters, Job, JobCreate, JobError, JobEvent, JobEventList, JobHyperparameters, JobList,
    JobMethod, JobMethodSupervised,
)
from hotpeft.trainer.config import DEFAULT_LR, FULL, TrainConfig, flag
from hotpeft.trainer.errors import ConfigInvalid, DatasetInvalid, JobNotFound
from hotpeft.trainer.retention import user_items
from hotpeft.trainer.jobs import FileRecord, JobRecord, new_id

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])

HP_PARAM = "method.supervised.hyperparameters"
# hotpeft options that the OpenAI fields (or the job itself) set
RESERVED = {"name": "suffix", "epochs": "n_epochs", "batch_size": "batch_size", "seed": "seed"}
TASKS = "tasks"  # not a TrainConfig field: the job's other training files (multi-task)


def public(j: JobRecord) -> Job:
    cfg = j.config
    hp = JobHyperparameters(**j.hyperparameters)
    return Job(
        id=j.id, created_at=j.created_at, finished_at=j.finished_at, model=j.model, fine_tuned_model=j.fine_tuned_model,
        status=j.status, validation_file=j.validation_file, training_file=j.training_file, hyperparameters=hp,
        trained_tokens=j.trained_tokens, error=JobError(**j.error) if j.error else None, seed=cfg["seed"],
        estimated_finish=j.estimated_finish if j.status == "running" else None, metadata=j.job_metadata,
        method=JobMethod(supervised=JobMethodSupervised(hyperparameters=hp)), user_provided_suffix=j.suffix,
        hotpeft=HotpeftJobInfo(method=cfg["method"], adapter=j.adapter_name, stage=j.stage, progress=j.progress,
                               config=cfg, metrics=j.metrics),
    )


def _file(rt: Runtime, file_id: str, param: str, min_examples: int) -> FileRecord:
    try:
        f = rt.jobs.store.get_file(file_id, param=param)
    except JobNotFound as e:
        raise InvalidRequest(f"{param} {file_id!r}: no such file; upload it with POST /v1/files first",
                             param=param, code="invalid_file") from e
    if f.purpose != "fine-tune":
        raise InvalidRequest(f"{param} {file_id!r} has purpose {f.purpose!r}, not 'fine-tune'", param=param)
    if f.examples < min_examples:
        raise InvalidRequest(f"{param} {file_id!r} has {f.examples} example(s); at least {min_examples} are needed "
                             "to train and hold some out", param=param, code="invalid_file")
    return f


def _hyperparameters(body: JobCreate) -> tuple[Hyperparameters, str]:
    nested = body.method.supervised.hyperparameters if body.method and body.method.supervised else None
    if nested is not None and body.hyperparameters is not None:
        raise InvalidRequest(f"Can't provide both 'hyperparameters' and '{HP_PARAM}'", param="hyperparameters")
    if body.hyperparameters is not None:
        return body.hyperparameters, "hyperparameters"
    return nested or Hyperparameters(), HP_PARAM


def _config(rt: Runtime, body: JobCreate, job_id: str) -> tuple[TrainConfig, dict]:
    if body.method is not None and body.method.type != "supervised":
        raise InvalidRequest(f"method.type {body.method.type!r} is not trained by hotpeft; use 'supervised' (LoRA, "
                             "QLoRA or prompt tuning through hotpeft.method)", param="method.type")
    if body.integrations:
        raise InvalidRequest("integrations are not supported by hotpeft", param="integrations")
    options = dict(body.hotpeft or {})
    options.pop(TASKS, None)  # checked by _tasks
    known = {f.name for f in dataclasses.fields(TrainConfig)} - set(RESERVED)
    for key in options:
        if key not in known:
            where = f"; set it with '{RESERVED[key]}'" if key in RESERVED else f"; known: {', '.join(sorted(known))}"
            raise InvalidRequest(f"Unrecognized field 'hotpeft.{key}'{where}; multi-task: '{TASKS}'",
                                 param=f"hotpeft.{key}")
    hp, hp_param = _hyperparameters(body)
    params = {k: f"hotpeft.{k}" for k in known}
    values = dict(options)
    values["name"] = body.suffix if body.suffix is not None else f"ft-{job_id[-8:]}"
    params["name"] = "suffix"
    if body.seed is not None:
        values["seed"], params["seed"] = body.seed, "seed"
    for field, value in (("epochs", hp.n_epochs), ("batch_size", hp.batch_size)):
        if value is not None and value != "auto":
            values[field], params[field] = value, f"{hp_param}.{RESERVED[field]}"
    multiplier = hp.learning_rate_multiplier
    if multiplier is not None and multiplier != "auto":
        if "learning_rate" in options:
            raise InvalidRequest(f"Can't provide both '{hp_param}.learning_rate_multiplier' and "
                                 "'hotpeft.learning_rate'", param="hotpeft.learning_rate")
        method = options.get("method", "lora")
        if not isinstance(multiplier, (int, float)) or not (0 < multiplier <= 100):
            raise InvalidRequest(f"'{hp_param}.learning_rate_multiplier' must be above 0 and at most 100, got "
                                 f"{multiplier!r}", param=f"{hp_param}.learning_rate_multiplier")
        values["learning_rate"] = DEFAULT_LR.get(method, DEFAULT_LR["lora"]) * multiplier
        params["learning_rate"] = f"{hp_param}.learning_rate_multiplier"
    try:
        cfg = TrainConfig(**values)
    except ConfigInvalid as e:
        param = params.get(e.field, f"hotpeft.{e.field}")
        raise InvalidRequest(e.message.replace(flag(e.field), f"'{param}'", 1), param=param,
                             code="invalid_hyperparameters") from e
    except TypeError as e:  # a value of the wrong JSON type for a field that is not range-checked
        raise InvalidRequest(f"invalid hotpeft options: {e}", param="hotpeft") from e
    if cfg.method == FULL:
        raise InvalidRequest("'hotpeft.method' full (full fine-tuning) makes a whole model, not an adapter: it is "
                             "only compared by `hotpeft train --sweep`; use lora, qlora or prompt_tuning",
                             param="hotpeft.method", code="invalid_hyperparameters")
    if cfg.retention not in ("default", "none"):  # an uploaded file's id, never a path on the server
        _file(rt, cfg.retention, "hotpeft.retention", 1)
        try:  # checked as a retention set now, not when the worker gets to it
            user_items(rt.jobs.store.file_path(cfg.retention))
        except DatasetInvalid as e:
            raise InvalidRequest(f"'hotpeft.retention' {cfg.retention!r}: {e.message}", param="hotpeft.retention",
                                 code="invalid_file") from e
    if cfg.method in ("lora", "qlora") and cfg.rank > rt.settings.max_lora_rank:
        raise InvalidRequest(f"'hotpeft.rank' {cfg.rank} is above this server's --max-lora-rank "
                             f"{rt.settings.max_lora_rank}", param="hotpeft.rank", code="invalid_hyperparameters")
    if cfg.max_length is not None and cfg.max_length > rt.base.max_model_len:
        raise InvalidRequest(f"'hotpeft.max_length' {cfg.max_length} is beyond the model's context of "
                             f"{rt.base.max_model_len} tokens", param="hotpeft.max_length")
    hyper = {"n_epochs": cfg.epochs, "batch_size": cfg.batch_size,
             "learning_rate_multiplier": cfg.learning_rate / DEFAULT_LR[cfg.method]}
    return cfg, hyper


def _create(rt: Runtime, body: JobCreate) -> JobRecord:
    if body.model not in (rt.base.model_id, BASE_ALIAS):
        raise InvalidRequest(f"hotpeft fine-tunes the base model this server serves, {rt.base.model_id!r}; "
                             f"{body.model!r} is not it", param="model", code="model_not_found")
    if body.suffix is not None:
        try:
            validate_name(body.suffix)
        except InvalidName as e:
            raise InvalidRequest(f"suffix: {e.message}", param="suffix", code="invalid_name") from e
    train = _file(rt, body.training_file, "training_file", 2)
    if body.validation_file is not None:
        valid = _file(rt, body.validation_file, "validation_file", 1)
        if valid.format != train.format:
            raise InvalidRequest(f"the validation file holds {valid.format} examples but the training file "
                                 f"{train.format} examples; use one format for both", param="validation_file")
    job_id = new_id("ftjob")
    cfg, hyper = _config(rt, body, job_id)
    tasks = _tasks(rt, (body.hotpeft or {}).get(TASKS))
    record = JobRecord(
        id=job_id, created_at=int(time.time()), status="queued", model=rt.base.model_id,
        training_file=train.id, validation_file=body.validation_file, suffix=body.suffix, adapter_name=cfg.name,
        config=cfg.to_dict() | ({TASKS: tasks} if tasks else {}), hyperparameters=hyper, job_metadata=body.metadata,
    )
    return rt.jobs.submit(record)


def _tasks(rt: Runtime, raw) -> list[dict]:
    """`hotpeft.tasks`: more training files beside `training_file` (multi-task; that one has weight 1), each
    {"training_file", "weight" (> 0, default 1), "validation_file", "template", "name"}, checked now."""
    if raw is None:
        return []
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest(f"'hotpeft.{TASKS}' must be a non-empty list of {{training_file, weight, "
                             "validation_file, template, name}", param=f"hotpeft.{TASKS}")
    out = []
    for n, task in enumerate(raw):
        where = f"hotpeft.{TASKS}[{n}]"
        if not isinstance(task, dict) or not isinstance(task.get("training_file"), str):
            raise InvalidRequest(f"'{where}' needs 'training_file': an uploaded file's id", param=where)
        unknown = set(task) - {"training_file", "weight", "validation_file", "template", "name"}
        if unknown:
            raise InvalidRequest(f"'{where}': unknown field(s) {', '.join(sorted(unknown))}", param=where)
        _file(rt, task["training_file"], f"{where}.training_file", 2)
        if task.get("validation_file") is not None:
            _file(rt, task["validation_file"], f"{where}.validation_file", 1)
        weight = task.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            raise InvalidRequest(f"'{where}.weight' must be a number above 0, got {weight!r}", param=f"{where}.weight")
        template = task.get("template")
        if template is not None and (not isinstance(template, str) or template.count("{prompt}") != 1):
            raise InvalidRequest(f"'{where}.template' must contain {{prompt}} exactly once", param=f"{where}.template")
        name = task.get("name")
        if name is not None and not isinstance(name, str):
            raise InvalidRequest(f"'{where}.name' must be a string", param=f"{where}.name")
        out.append({"training_file": task["training_file"], "weight": float(weight),
                    "validation_file": task.get("validation_file"), "template": template, "name": name})
    return out


def _seen(rt: Runtime, jobs: list[JobRecord]) -> list[JobRecord]:
    """A job reads `succeeded` only once this server can serve its model: the worker registers in
    the shared registry, which the catalogue polls; refresh now instead of up to one poll later."""
    snap = rt.catalog.snapshot
    for j in jobs:
        if j.status == "succeeded" and j.fine_tuned_model:
            name, _, version = j.fine_tuned_model.partition("@")
            if int(version) not in snap.versions.get(name, {}):
                rt.catalog.refresh()
                break
    return jobs


@router.post("", response_model=Job)
async def create_job(body: JobCreate, rt: RuntimeDep) -> Job:
    return public(await asyncio.to_thread(_create, rt, body))


@router.get("", response_model=JobList)
async def list_jobs(rt: RuntimeDep, after: str | None = None, limit: int = Query(20, ge=1, le=100)) -> JobList:
    jobs, more = await asyncio.to_thread(rt.jobs.store.list_jobs, after=after, limit=limit)
    return JobList(data=[public(j) for j in await asyncio.to_thread(_seen, rt, jobs)], has_more=more)


@router.get("/{job_id}", response_model=Job)
async def get_job(job_id: str, rt: RuntimeDep) -> Job:
    job = await asyncio.to_thread(rt.jobs.store.get_job, job_id)
    return public((await asyncio.to_thread(_seen, rt, [job]))[0])


@router.get("/{job_id}/events", response_model=JobEventList)
async def list_events(job_id: str, rt: RuntimeDep, after: str | None = None,
                      limit: int = Query(20, ge=1, le=1000)) -> JobEventList:
    events, more = await asyncio.to_thread(rt.jobs.store.events, job_id, after=after, limit=limit)
    return JobEventList(data=[JobEvent(id=e.id, created_at=e.created_at, level=e.level, message=e.message,
                                       type=e.type, data=e.data) for e in events], has_more=more)


@router.post("/{job_id}/cancel", response_model=Job)
async def cancel_job(job_id: str, rt: RuntimeDep) -> Job:
    return public(await asyncio.to_thread(rt.jobs.cancel, job_id))
