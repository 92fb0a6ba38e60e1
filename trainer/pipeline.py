"""Data in, an evaluated and registered adapter out: the steps `hotpeft train` and a job's worker share.

    load the base -> read and tokenize each task's data -> evaluate the base (held-out sets,
    retention set) -> train on the tasks' mixture -> evaluate the adapter -> --min-improvement and
    --max-forgetting gates -> save (PEFT folder) -> register (store + registry)

Registration goes through the adapters catalogue into the registry a running server watches, so
the server serves the new version within a second, without a restart.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hotpeft.adapters import AdapterCatalog, AdapterRegistry, BaseSpec, VersionRecord
from hotpeft.adapters.faults import failpoint
from hotpeft.adapters.store import open_store, pid_alive
from hotpeft.model.load import LoadedBase, default_device, eos_ids
from hotpeft.model.source import CONVERSION_NOTE, ModelSource, ModelUnavailable, needs_conversion, resolve_model
from hotpeft.trainer import data as data_mod
from hotpeft.trainer.assess import assess, check_gates, check_measurable, report, retention_set, without_samples
from hotpeft.trainer.config import FULL, TrainConfig
from hotpeft.trainer.env import TrainerEnv
from hotpeft.trainer.errors import ConfigInvalid, JobCancelled
from hotpeft.trainer.mixture import Task, interleave, task_name
from hotpeft.trainer.train import build_peft_model, load_training_base, pad_id, train

@dataclass
class TrainOutcome:
    record: VersionRecord | None  # None when not registered (a --sweep run)
    metrics: dict  # what is stored on the registered version
    table: str


Events = Callable[[str, dict | None], None]


def torch_device(env: TrainerEnv) -> torch.device:
    if env.device == "auto":
        return default_device()
    if env.device == "cuda" and not torch.cuda.is_available():
        raise ConfigInvalid("device", "--device cuda was given, but no CUDA device is available")
    return torch.device(env.device)


def open_catalog(env: TrainerEnv, base: LoadedBase) -> AdapterCatalog:
    spec = BaseSpec.of(base.model_id, base.arch)
    return AdapterCatalog(AdapterRegistry(env.registry), open_store(env.store, env.store_url), spec, base.fingerprint,
                          max_lora_rank=env.max_lora_rank, allow_foreign_base=env.allow_foreign_base,
                          max_cpu_bytes=1 << 20)


def resolve_base(env: TrainerEnv) -> ModelSource:
    try:
        return resolve_model(env.model, env.home)
    except ModelUnavailable as e:
        raise ConfigInvalid("model", str(e)) from e


def _workdir(home: Path) -> Path:
    root = home / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("train-*"):  # left by a run that was killed
        pid = old.name.split("-")[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"train-{os.getpid()}-", dir=root))


def run_training(cfg: TrainConfig, data: Path | list[Task], valid_path: Path | None, env: TrainerEnv, *,
                 job_id: str | None = None, progress=None, events: Events = lambda m, d=None: None,
                 should_stop: Callable[[], bool] = lambda: False,
                 before_register: Callable[[], None] = lambda: None,
                 eval_progress: Callable[[str, int, int], None] = lambda label, done, total: None,
                 register: bool = True, base_cache: dict | None = None) -> TrainOutcome:
    """`data`: one JSONL file, or the tasks of a mixture; `progress`: training steps; `eval_progress(label,
    done, total)`: evaluation. `register=False` trains and evaluates only (the record is then None);
    `base_cache` keeps the base's evaluation by precision across the runs of a sweep."""
    tasks = data if isinstance(data, list) else [Task(task_name(Path(data)), Path(data), 1.0, valid_path)]
    if len(tasks) > 1 and valid_path is not None:
        raise ConfigInvalid("validation", "--validation applies to a single --data; with several tasks each holds "
                                          "out --validation-fraction, or give each its file in a mixture file")
    if valid_path is not None:
        tasks = [dataclasses.replace(tasks[0], validation=Path(valid_path))]
    _check_run(cfg, env, register)
    retention = retention_set(cfg.retention)  # a bad --retention file fails before the model loads
    if env.threads:
        torch.set_num_threads(env.threads)
    if needs_conversion(env.model, env.home):
        events(f"Converting the embedded default model to safetensors under {env.home} ({CONVERSION_NOTE})", None)
    source = resolve_base(env)
    device = torch_device(env)
    events(f"Loading the base model {source.model_id}" + (" in 4-bit nf4" if cfg.method == "qlora" else ""), None)
    base = load_training_base(source, cfg.method, device)
    prepared = _prepare(cfg, tasks, base, events)
    eos = sorted(eos_ids(base))
    common = dict(device=device, eos_ids=eos, pad=pad_id(base.tokenizer), max_new_tokens=cfg.eval_max_new_tokens,
                  limit=cfg.eval_limit, should_stop=should_stop, metrics=cfg.metrics)
    held_out = sum(len(p.valid) for p in prepared.values())
    events(f"Evaluating the base on {held_out} held-out examples"
           + (f" and the {retention[0]} retention set ({len(retention[1])} items)" if retention[1] else ""), None)
    base_label = "base" + (" (nf4)" if base.quantization == "nf4" else "")
    before = (base_cache or {}).get(base.quantization)
    if before is None:
        before = assess(base.model, base.tokenizer, prepared, retention[1], base=None, filtered=retention[2],
                        common=common, label="base", progress=eval_progress)
    if base_cache is not None:
        base_cache[base.quantization] = before
    check_measurable(cfg, retention, before)
    model = build_peft_model(base, cfg)
    examples = _mixed(tasks, prepared, cfg.seed)
    workdir = _workdir(env.home)
    try:
        stats = train(model, base, examples, cfg, workdir, progress=progress, should_stop=should_stop)
        events(f"Training done: {stats.steps} steps in {stats.train_seconds:.1f}s, final loss {stats.final_loss:.4f}",
               None)
        events(f"Evaluating {cfg.name} on the same sets", None)
        after = assess(model, base.tokenizer, prepared, retention[1], base=before, filtered=retention[2],
                       common=common, label=cfg.name, progress=eval_progress)
        out = workdir / "adapter"
        if cfg.method != FULL:
            # save_embedding_layers=False: the embeddings are not trained (checking would look the base up on the hub)
            model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)
            (out / "README.md").unlink(missing_ok=True)
        training = _training_figures(cfg, stats, base, model, out)
        metrics, table = report(cfg, tasks, retention, before, after, training, base_label)
        metrics["data"] = _data_figures(prepared, tasks)
        events("Evaluation:\n" + table, {"base": without_samples(metrics["base"]), "adapter": without_samples(metrics["adapter"]),
                                          "retention": metrics.get("retention")})
        if not register:
            return TrainOutcome(None, metrics, table)
        check_gates(cfg, metrics)
        if should_stop():
            raise JobCancelled("the job was cancelled before registration")
        before_register()
        failpoint("trainer.before-register")
        record = _register(cfg, env, base, out, metrics, job_id, tasks)
        events(f"Registered adapter {record.key}", {"adapter": record.key})
        return TrainOutcome(record, metrics, table)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _check_run(cfg: TrainConfig, env: TrainerEnv, register: bool) -> None:
    if cfg.method == FULL and register:
        raise ConfigInvalid("method", "--method full (full fine-tuning) is trained and evaluated by --sweep for "
                                      "comparison, never registered: it is a whole model, not an adapter")
    if cfg.method in ("lora", "qlora") and cfg.rank > env.max_lora_rank:
        raise ConfigInvalid("rank", f"--rank {cfg.rank} is above the servers' --max-lora-rank {env.max_lora_rank}; "
                                    f"lower --rank or raise --max-lora-rank")


def _prepare(cfg: TrainConfig, tasks: list[Task], base: LoadedBase, events: Events) -> dict[str, data_mod.Prepared]:
    """Each task's training and held-out examples, tokenized."""
    max_length = cfg.max_length or min(1024, base.max_model_len)
    if max_length > base.max_model_len:
        raise ConfigInvalid("max_length", f"--max-length {max_length} is beyond the model's context of "
                                          f"{base.max_model_len} tokens")
    prepared = {}
    for t in tasks:
        template = cfg.apply_template if t.template is None else (lambda p, t=t: t.template.format(prompt=p))
        p = data_mod.prepare(t.data, t.validation, base.tokenizer, max_length=max_length, template=template,
                             validation_fraction=cfg.validation_fraction, seed=cfg.seed)
        where = "" if len(tasks) == 1 else f"task {t.name} (weight {t.weight:g}): "
        events(f"{where}{len(p.train)} training and {len(p.valid)} held-out {p.format} examples, "
               f"{p.train_tokens} training tokens per epoch",
               {"task": t.name, "train_examples": len(p.train), "valid_examples": len(p.valid),
                "truncated": p.truncated, "dropped": p.dropped})
        for note in p.notes:
            events(where + note, None)
        prepared[t.name] = p
    return prepared


def _mixed(tasks: list[Task], prepared: dict[str, data_mod.Prepared], seed: int) -> list:
    if len(tasks) == 1:
        return prepared[tasks[0].name].train
    return interleave([prepared[t.name].train for t in tasks], [t.weight for t in tasks], seed)


def _data_figures(prepared: dict[str, data_mod.Prepared], tasks: list[Task]) -> dict:
    parts = list(prepared.values())
    out = {"format": "/".join(sorted({p.format for p in parts})), "train_examples": sum(len(p.train) for p in parts),
           "valid_examples": sum(len(p.valid) for p in parts), "truncated": sum(p.truncated for p in parts),
           "dropped": sum(p.dropped for p in parts)}
    if len(tasks) > 1:
        out["tasks"] = {t.name: {"file": t.data.name, "weight": t.weight, "train_examples": len(prepared[t.name].train),
                                 "valid_examples": len(prepared[t.name].valid)} for t in tasks}
    return out


def _register(cfg: TrainConfig, env: TrainerEnv, base: LoadedBase, out: Path, metrics: dict, job_id: str | None,
              tasks: list[Task]) -> VersionRecord:
    config = cfg.to_dict()
    if config["retention"] not in ("default", "none"):  # a file's name, never a path of this machine
        config["retention"] = Path(config["retention"]).name
    single = len(tasks) == 1
    catalog = open_catalog(env, base)
    try:
        return catalog.register_dir(
            cfg.name, out, source="training", label=f"trained adapter {cfg.name!r}", description=cfg.description,
            source_detail={"job": job_id, "method": cfg.method, "config": config,
                           "train_file": tasks[0].data.name if single else None,
                           "validation_file": tasks[0].validation.name if single and tasks[0].validation else None,
                           "tasks": None if single else {t.name: {"train_file": t.data.name, "weight": t.weight,
                                                                  "validation_file": t.validation and t.validation.name}
                                                         for t in tasks}},
            metrics=metrics,
        )
    finally:
        catalog.close()


def _training_figures(cfg: TrainConfig, stats, base: LoadedBase, model, out: Path) -> dict:
    """What the training run took and made, stored with the registered version."""
    return {
        "method": cfg.method, "steps": stats.steps, "train_seconds": stats.train_seconds,
        "train_tokens": stats.train_tokens, "tokens_per_s": stats.tokens_per_s, "final_loss": stats.final_loss,
        "trainable_params": stats.trainable_params, "total_params": stats.total_params,
        "trainable_percent": stats.trainable_percent, "peak_memory_mib": stats.peak_memory_bytes / 2**20,
        # full fine-tuning: the bytes of the whole model it would have to ship, in its training precision
        "adapter_bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file()) if cfg.method != FULL
        else sum(p.numel() * p.element_size() for p in model.parameters()),
        "base_precision": base.quantization, "device": base.device.type,
    }
