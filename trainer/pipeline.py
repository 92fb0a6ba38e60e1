"""Data in, an evaluated and registered adapter out: the steps `hotpeft train` and a job's worker share.

    load the base -> read and tokenize the data -> train -> evaluate base and adapter on the
    held-out set -> --min-improvement gate -> save (PEFT folder) -> register (store + registry)

Registration goes through the adapters catalogue into the registry a running server watches, so
the server serves the new version within a second, without a restart.
"""
from __future__ import annotations

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
from hotpeft.trainer.config import TrainConfig
from hotpeft.trainer.env import TrainerEnv
from hotpeft.trainer.errors import ConfigInvalid, InsufficientImprovement, JobCancelled
from hotpeft.trainer.evaluate import evaluate, format_table, improvement
from hotpeft.trainer.train import build_peft_model, load_training_base, pad_id, train

@dataclass
class TrainOutcome:
    record: VersionRecord
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


def run_training(cfg: TrainConfig, train_path: Path, valid_path: Path | None, env: TrainerEnv, *,
                 job_id: str | None = None, progress=None, events: Events = lambda m, d=None: None,
                 should_stop: Callable[[], bool] = lambda: False,
                 before_register: Callable[[], None] = lambda: None,
                 eval_progress: Callable[[str, int, int], None] = lambda label, done, total: None) -> TrainOutcome:
    """`progress`: training steps; `eval_progress(label, done, total)`: evaluation of the base, then the adapter."""
    if cfg.method in ("lora", "qlora") and cfg.rank > env.max_lora_rank:
        raise ConfigInvalid("rank", f"--rank {cfg.rank} is above the servers' --max-lora-rank {env.max_lora_rank}; "
                                    f"lower --rank or raise --max-lora-rank")
    if env.threads:
        torch.set_num_threads(env.threads)
    if needs_conversion(env.model, env.home):
        events(f"Converting the embedded default model to safetensors under {env.home} ({CONVERSION_NOTE})", None)
    source = resolve_base(env)
    device = torch_device(env)
    events(f"Loading the base model {source.model_id}" + (" in 4-bit nf4" if cfg.method == "qlora" else ""), None)
    base = load_training_base(source, cfg.method, device)
    max_length = cfg.max_length or min(1024, base.max_model_len)
    if max_length > base.max_model_len:
        raise ConfigInvalid("max_length", f"--max-length {max_length} is beyond the model's context of "
                                          f"{base.max_model_len} tokens")
    tok = base.tokenizer
    prepared = data_mod.prepare(train_path, valid_path, tok, max_length=max_length, template=cfg.apply_template,
                                validation_fraction=cfg.validation_fraction, seed=cfg.seed)
    events(f"{len(prepared.train)} training and {len(prepared.valid)} held-out {prepared.format} examples, "
           f"{prepared.train_tokens} training tokens per epoch",
           {"train_examples": len(prepared.train), "valid_examples": len(prepared.valid),
            "truncated": prepared.truncated, "dropped": prepared.dropped})
    for note in prepared.notes:
        events(note, None)
    peft_model = build_peft_model(base, cfg)
    workdir = _workdir(env.home)
    try:
        stats = train(peft_model, base, prepared.train, cfg, workdir, progress=progress, should_stop=should_stop)
        events(f"Training done: {stats.steps} steps in {stats.train_seconds:.1f}s, final loss {stats.final_loss:.4f}",
               None)
        eos = sorted(eos_ids(base))
        common = dict(device=device, eos_ids=eos, pad=pad_id(tok), max_new_tokens=cfg.eval_max_new_tokens,
                      limit=cfg.eval_limit, should_stop=should_stop, metrics=cfg.metrics)
        events(f"Evaluating the base and the adapter on {len(prepared.valid)} held-out examples", None)
        with peft_model.disable_adapter():
            base_metrics = evaluate(peft_model, tok, prepared.valid, **common,
                                    progress=lambda done, total: eval_progress("base", done, total))
        adapter_metrics = evaluate(peft_model, tok, prepared.valid, **common,
                                   progress=lambda done, total: eval_progress(cfg.name, done, total))
        out = workdir / "adapter"
        # save_embedding_layers=False: the embeddings are not trained (and checking would look the base up on the hub)
        peft_model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)
        (out / "README.md").unlink(missing_ok=True)
        training = _training_figures(cfg, stats, base, out)
        base_label = "base" + (" (nf4)" if base.quantization == "nf4" else "")
        table = format_table({base_label: base_metrics, cfg.name: {**adapter_metrics, **training}})
        metrics = {"base": base_metrics, "adapter": adapter_metrics, "training": training,
                   "data": {"format": prepared.format, "train_examples": len(prepared.train),
                            "valid_examples": len(prepared.valid), "truncated": prepared.truncated,
                            "dropped": prepared.dropped}}
        events("Evaluation:\n" + table, {"base": _flat(base_metrics), "adapter": _flat(adapter_metrics)})
        _check_improvement(cfg, base_metrics, adapter_metrics)
        if should_stop():
            raise JobCancelled("the job was cancelled before registration")
        before_register()
        failpoint("trainer.before-register")
        catalog = open_catalog(env, base)
        try:
            record = catalog.register_dir(
                cfg.name, out, source="training", label=f"trained adapter {cfg.name!r}", description=cfg.description,
                source_detail={"job": job_id, "method": cfg.method, "config": cfg.to_dict(),
                               "train_file": Path(train_path).name,
                               "validation_file": Path(valid_path).name if valid_path else None},
                metrics=metrics,
            )
        finally:
            catalog.close()
        events(f"Registered adapter {record.key}", {"adapter": record.key})
        return TrainOutcome(record, metrics, table)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _training_figures(cfg: TrainConfig, stats, base: LoadedBase, out: Path) -> dict:
    """What the training run took and made, stored with the registered version."""
    return {
        "method": cfg.method, "steps": stats.steps, "train_seconds": stats.train_seconds,
        "train_tokens": stats.train_tokens, "tokens_per_s": stats.tokens_per_s, "final_loss": stats.final_loss,
        "trainable_params": stats.trainable_params, "total_params": stats.total_params,
        "trainable_percent": stats.trainable_percent, "peak_memory_mib": stats.peak_memory_bytes / 2**20,
        "adapter_bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
        "base_precision": base.quantization, "device": base.device.type,
    }


def _check_improvement(cfg: TrainConfig, base_metrics: dict, adapter_metrics: dict) -> None:
    """The --min-improvement gate: raises when the adapter does not beat the base by enough."""
    short = [f"{m} improved by {improvement(base_metrics, adapter_metrics, m):+.4f}, --min-improvement asks "
             f"{d:+.4f}" for m, d in cfg.min_improvement.items() if improvement(base_metrics, adapter_metrics, m) < d]
    if short:
        raise InsufficientImprovement("the adapter does not beat the base enough, so it was not registered: "
                                      + "; ".join(short), param="min_improvement")


def _flat(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "samples"}
