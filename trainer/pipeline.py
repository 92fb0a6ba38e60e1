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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hotpeft.adapters import AdapterCatalog, AdapterRegistry, BaseSpec, VersionRecord
from hotpeft.adapters.faults import failpoint
from hotpeft.adapters.registry import default_registry_url
from hotpeft.adapters.store import default_store_dir, open_store, pid_alive
from hotpeft.server import basemodel
from hotpeft.trainer import data as data_mod
from hotpeft.trainer.config import TrainConfig
from hotpeft.trainer.errors import ConfigInvalid, InsufficientImprovement, JobCancelled
from hotpeft.trainer.evaluate import evaluate, format_table, improvement
from hotpeft.trainer.train import build_peft_model, load_training_base, pad_id, train

@dataclass
class TrainerEnv:
    """Where the base comes from and where the adapter goes: the same values the server is started with."""

    model: str = basemodel.DEFAULT_MODEL_ID
    home: Path = field(default_factory=lambda: Path("~/.hotpeft").expanduser())
    registry_url: str | None = None
    store_dir: Path | None = None
    store_url: str | None = None
    device: str = "auto"
    threads: int | None = None
    max_lora_rank: int = 64
    allow_foreign_base: bool = False

    @property
    def registry(self) -> str:
        return self.registry_url or default_registry_url(self.home)

    @property
    def store(self) -> Path:
        return self.store_dir or default_store_dir(self.home)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return basemodel.default_device()
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigInvalid("device", "--device cuda was given, but no CUDA device is available")
        return torch.device(self.device)


@dataclass
class TrainOutcome:
    record: VersionRecord
    metrics: dict  # what is stored on the registered version
    table: str


Events = Callable[[str, dict | None], None]


def open_catalog(env: TrainerEnv, base: basemodel.LoadedBase) -> AdapterCatalog:
    spec = BaseSpec(base.model_id, int(base.model.config.hidden_size), basemodel.linear_shapes(base.model))
    return AdapterCatalog(AdapterRegistry(env.registry), open_store(env.store, env.store_url), spec, base.fingerprint,
                          max_lora_rank=env.max_lora_rank, allow_foreign_base=env.allow_foreign_base,
                          max_cpu_bytes=1 << 20)


def resolve_base(env: TrainerEnv) -> basemodel.ModelSource:
    try:
        return basemodel.resolve_model(env.model, env.home)
    except basemodel.ModelUnavailable as e:
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
                 before_register: Callable[[], None] = lambda: None) -> TrainOutcome:
    if cfg.method in ("lora", "qlora") and cfg.rank > env.max_lora_rank:
        raise ConfigInvalid("rank", f"--rank {cfg.rank} is above the servers' --max-lora-rank {env.max_lora_rank}; "
                                    f"lower --rank or raise --max-lora-rank")
    if env.threads:
        torch.set_num_threads(env.threads)
    source = resolve_base(env)
    device = env.torch_device()
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
        eos = sorted(basemodel.eos_ids(base))
        common = dict(device=device, eos_ids=eos, pad=pad_id(tok), max_new_tokens=cfg.eval_max_new_tokens,
                      limit=cfg.eval_limit, should_stop=should_stop)
        events(f"Evaluating the base and the adapter on {len(prepared.valid)} held-out examples", None)
        with peft_model.disable_adapter():
            base_metrics = evaluate(peft_model, tok, prepared.valid, **common)
        adapter_metrics = evaluate(peft_model, tok, prepared.valid, **common)
        out = workdir / "adapter"
        # save_embedding_layers=False: the embeddings are not trained (and checking would look the base up on the hub)
        peft_model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)
        (out / "README.md").unlink(missing_ok=True)
        adapter_bytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
        training = {
            "method": cfg.method, "steps": stats.steps, "train_seconds": stats.train_seconds,
            "train_tokens": stats.train_tokens, "tokens_per_s": stats.tokens_per_s, "final_loss": stats.final_loss,
            "trainable_params": stats.trainable_params, "total_params": stats.total_params,
            "trainable_percent": stats.trainable_percent, "peak_memory_mib": stats.peak_memory_bytes / 2**20,
            "adapter_bytes": adapter_bytes, "base_precision": base.quantization, "device": device.type,
        }
        base_label = "base" + (" (nf4)" if base.quantization == "nf4" else "")
        table = format_table({base_label: base_metrics, cfg.name: {**adapter_metrics, **training}})
        metrics = {"base": base_metrics, "adapter": adapter_metrics, "training": training,
                   "data": {"format": prepared.format, "train_examples": len(prepared.train),
                            "valid_examples": len(prepared.valid), "truncated": prepared.truncated,
                            "dropped": prepared.dropped}}
        events("Evaluation:\n" + table, {"base": _flat(base_metrics), "adapter": _flat(adapter_metrics)})
        short = [f"{m} improved by {improvement(base_metrics, adapter_metrics, m):+.4f}, --min-improvement asks "
                 f"{d:+.4f}" for m, d in cfg.min_improvement.items()
                 if improvement(base_metrics, adapter_metrics, m) < d]
        if short:
            raise InsufficientImprovement("the adapter does not beat the base enough, so it was not registered: "
                                          + "; ".join(short), param="min_improvement")
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


def _flat(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "samples"}
