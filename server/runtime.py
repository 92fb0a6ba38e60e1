"""Everything the app holds while it runs, built in the lifespan and torn down after it."""
from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass

import torch

from hotpeft.adapters import AdapterCatalog, AdapterRegistry, BaseSpec
from hotpeft.adapters.store import open_store
from hotpeft.model.load import LoadedBase, default_device, eos_ids, load_base, pick_dtype
from hotpeft.model.source import ModelUnavailable, resolve_model
from hotpeft.server import gauges
from hotpeft.server.config import Settings
from hotpeft.server.engine.interface import Engine
from hotpeft.server.engine.kv import KVBudgetTooSmall, build_kv_cache
from hotpeft.server.engine.lora import LoraBank
from hotpeft.server.engine.scheduler import BatchEngine, EngineLimits
from hotpeft.server.api.logprobs import TokenText
from hotpeft.server.metrics import EngineObserver, Metrics
from hotpeft.trainer.jobs import JobManager, JobStore

log = logging.getLogger("hotpeft.server")


@dataclass
class Runtime:
    settings: Settings
    base: LoadedBase
    catalog: AdapterCatalog
    engine: Engine
    jobs: JobManager
    metrics: Metrics
    started: int

    @property
    def tokenizer(self):
        return self.base.tokenizer

    @functools.cached_property
    def eos_ids(self) -> set[int]:
        """The token ids that end a generation (the engine's own set)."""
        return eos_ids(self.base)

    @functools.cached_property
    def token_text(self):
        """Token id -> (text, bytes), cached for the server's life (logprobs)."""
        return TokenText(self.tokenizer)


def build_runtime(settings: Settings, engine: Engine | None = None, report_jobs: bool = True) -> Runtime:
    """The model, catalogue, engine, jobs and metrics. `engine`: use this one instead of a local
    BatchEngine (Ray Serve's ingress hands generation to replicas). `report_jobs`: export the
    training jobs' gauges (an engine replica behind Ray leaves that to the ingress)."""
    device = default_device() if settings.device == "auto" else torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable("--device cuda was given, but no CUDA device is available")
    dtype = pick_dtype(settings.dtype, device)
    settings.home.mkdir(parents=True, exist_ok=True)
    source = resolve_model(settings.model, settings.home)
    t0 = time.perf_counter()
    local = engine is None  # the model runs here; else only its shapes and tokenizer are needed
    base = load_base(source, None if settings.quantize == "auto" else settings.quantize,
                     device=device if local else torch.device("cpu"), dtype=dtype,
                     max_model_len=settings.max_model_len, weights=local)
    compute = "" if base.quantization == "none" else f" (compute {str(dtype).removeprefix('torch.')})"
    log.info("base %s resident on %s: precision %s%s, %.1f MiB, context %d tokens, loaded in %.1fs", base.model_id,
             device, base.precision, compute, base.resident_bytes / 2**20, base.max_model_len, time.perf_counter() - t0)
    catalog = open_catalog(settings, base)
    if engine is None:
        engine = make_engine(settings, base)
    jobs = make_job_manager(settings, catalog)
    # Behind Ray Serve the engine replicas report the engine's gauges; the ingress, its requests per replica.
    metrics = make_metrics(settings, base, engine, catalog, jobs.store, engine_gauges=local, job_gauges=report_jobs,
                           by_replica=not local)
    engine.observer = EngineObserver(metrics)
    return Runtime(settings, base, catalog, engine, jobs, metrics, int(time.time()))


def make_engine(settings: Settings, base: LoadedBase) -> BatchEngine:
    """The local batching engine: the LoRA stacks, the KV cache from its budget, the limits."""
    device, dtype = base.device, base.dtype
    # On the CPU the engine thread and the HTTP event loop share the cores: with every core in
    # torch's pool, the loop's work per token preempts matmul threads and each step waits for the
    # slowest. Measured on 2 cores: 311 vs 219-274 tok/s for 16 streams (see BENCHMARKS.md).
    threads = settings.threads or (max(1, (os.cpu_count() or 1) - 1) if device.type == "cpu" else None)
    try:
        kv = build_kv_cache(base.arch, budget_mib=settings.kv_cache_mib, max_model_len=base.max_model_len,
                            dtype=dtype, device=device, prefix_cache=settings.prefix_cache)
    except KVBudgetTooSmall as e:
        raise ModelUnavailable(str(e)) from e
    limits = EngineLimits(max_batch_tokens=settings.max_batch_tokens, max_queue=settings.max_queue,
                          max_resident_adapter_bytes=settings.max_resident_adapter_bytes, threads=threads,
                          max_num_seqs=settings.max_num_seqs, graphs=graphs_mode(settings, device))
    bank = LoraBank(base.arch, dtype, device)
    return BatchEngine(base.model, base.arch, base.tokenizer, bank, kv, eos_ids(base), limits, base.max_model_len)


def graphs_mode(settings: Settings, device: torch.device) -> str | None:
    """--compile: CUDA graphs on a GPU (on and auto); torch.compile on the CPU only when asked (on),
    with torch's compilation cache in the home so that a restart reuses it."""
    if settings.compile == "off" or (settings.compile == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda":
        return "cuda-graphs"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.home / "cache" / "torch-compile"))
    return "compile"


async def load_and_pin(rt: Runtime, version, pin: bool = False) -> bool:
    """Make a version resident in the engine; `pin` also keeps it in the CPU tier and from
    eviction. A pin is undone when loading fails. False when nothing changed."""
    if pin:
        rt.catalog.cache.pin(version.key, version.adapter)
    try:
        return await rt.engine.load(version, pin)
    except Exception:
        if pin:
            rt.catalog.cache.unpin(version.key)
        raise


async def unpin_and_unload(rt: Runtime, keys: set[str]) -> set[str]:
    """Unpin these versions and drop them from both tiers (the engine keeps what running requests
    use until they end); the keys that left a tier."""
    dropped = {k for k in keys if rt.catalog.cache.drop(k)}
    return dropped | await rt.engine.unload(keys)


def make_metrics(settings: Settings, base: LoadedBase, engine: Engine, catalog: AdapterCatalog, jobs: JobStore, *,
                 engine_gauges: bool = True, job_gauges: bool = True, by_replica: bool = False) -> Metrics:
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("hotpeft")
    except PackageNotFoundError:
        release = "unknown"

    def families() -> list:
        return (gauges.registry_families(catalog) + (gauges.job_families(jobs) if job_gauges else [])
                + (gauges.engine_families(engine, catalog) if engine_gauges else []))

    info = {"version": release, "base_model": base.model_id, "quantization": base.quantization,
            "device": str(base.device)}
    return Metrics(base_id=base.model_id, max_adapters=settings.metrics_max_adapters, info=info, gauges=families,
                   by_replica=by_replica)


def make_job_manager(settings: Settings, catalog: AdapterCatalog) -> JobManager:
    """Fine-tuning jobs of this server: records in <home>/jobs.db, workers training on the served base."""
    threads = settings.train_threads or max(1, (os.cpu_count() or 1) // 2)

    def find_registered(job_id: str) -> str | None:
        for record in catalog.registry.snapshot().records():
            if record.source == "training" and (record.source_detail or {}).get("job") == job_id:
                return record.key
        return None

    return JobManager(JobStore(settings.home), settings.trainer_env(threads), max_running=settings.max_running_jobs,
                      find_registered=find_registered)


def open_catalog(settings: Settings, base: LoadedBase) -> AdapterCatalog:
    """Registry + store + the base's shapes; --adapters-dir folders registered when their content is new."""
    spec = BaseSpec.of(base.model_id, base.arch)
    registry = AdapterRegistry(settings.registry)
    catalog = AdapterCatalog(
        registry, open_store(settings.store, settings.store_url), spec, base.fingerprint, max_lora_rank=settings.max_lora_rank,
        allow_foreign_base=settings.allow_foreign_base, max_cpu_bytes=settings.max_cpu_adapter_bytes,
    )
    removed = catalog.collect_garbage()
    if removed:
        log.info("store: removed %d object(s) no registered version names", len(removed))
    if settings.adapters_dir is not None:
        for folder in sorted(p for p in settings.adapters_dir.iterdir() if p.is_dir()):
            if catalog.sync_folder(folder.name, folder, source="adapters-dir") is None:
                log.info("adapter %s: %s unchanged since its last registration", folder.name, folder)
    log.info("registry %s: %d adapter(s)", _redact(settings.registry), len(catalog.active()))
    return catalog


def _redact(url: str) -> str:
    """A database URL without its password, for logs."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
