"""Everything the app holds while it runs, built in the lifespan and torn down after it."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from hotpeft.adapters import AdapterCatalog, AdapterRegistry, BaseSpec
from hotpeft.adapters.store import open_store
from hotpeft.server import basemodel
from hotpeft.server.config import Settings
from hotpeft.server.engine.batching import BatchEngine, EngineLimits
from hotpeft.server.engine.forward import SlotKVCache, kv_bytes_per_token
from hotpeft.server.engine.lora import LoraBank
from hotpeft.server.metrics import EngineObserver, Metrics
from hotpeft.trainer.jobs import JobManager, JobStore, WorkerSettings

log = logging.getLogger("hotpeft.server")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Runtime:
    settings: Settings
    base: basemodel.LoadedBase
    catalog: AdapterCatalog
    engine: BatchEngine
    jobs: JobManager
    metrics: Metrics
    started: int

    @property
    def tokenizer(self):
        return self.base.tokenizer


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return _DTYPES[setting]
    if device.type == "cuda":
        return torch.bfloat16
    # bf16 halves the bytes read per token; without native bf16 it is emulated and slower.
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def build_runtime(settings: Settings, engine=None, report_jobs: bool = True) -> Runtime:
    """The model, catalogue, engine, jobs and metrics. `engine`: use this one instead of a local
    BatchEngine (Ray Serve's ingress hands generation to replicas). `report_jobs`: export the
    training jobs' gauges (an engine replica behind Ray leaves that to the ingress)."""
    device = basemodel.default_device() if settings.device == "auto" else torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise basemodel.ModelUnavailable("--device cuda was given, but no CUDA device is available")
    dtype = pick_dtype(settings.dtype, device)
    # On the CPU the engine thread and the HTTP event loop share the cores: with every core in
    # torch's pool, the loop's work per token preempts matmul threads and each step waits for the
    # slowest. Measured on 2 cores: 311 vs 219-274 tok/s for 16 streams (see BENCHMARKS.md).
    threads = settings.threads or (max(1, (os.cpu_count() or 1) - 1) if device.type == "cpu" else None)
    quantization = None if settings.quantize == "auto" else settings.quantize
    home = settings.home
    home.mkdir(parents=True, exist_ok=True)
    source = basemodel.resolve_model(settings.model, home)
    t0 = time.perf_counter()
    local = engine is None  # the model runs here; else only its shapes and tokenizer are needed
    base = basemodel.load_base(source, quantization, device=device if local else torch.device("cpu"), dtype=dtype,
                               max_model_len=settings.max_model_len, weights=local)
    bank = LoraBank(base.model, dtype, device if local else torch.device("cpu"))
    log.info(
        "base %s resident on %s: precision %s (compute %s), %.1f MiB, context %d tokens, loaded in %.1fs",
        base.model_id, device, base.quantization, str(dtype).removeprefix("torch."), base.resident_bytes / 2**20,
        base.max_model_len, time.perf_counter() - t0,
    )
    catalog = open_catalog(settings, base, bank)
    if engine is None:
        kv = make_kv_cache(settings, base, dtype, device)
        limits = EngineLimits(max_batch_tokens=settings.max_batch_tokens, max_queue=settings.max_queue,
                              max_resident_adapter_bytes=settings.max_resident_adapter_bytes, threads=threads)
        engine = BatchEngine(base.model, base.tokenizer, bank, kv, basemodel.eos_ids(base), limits)
    jobs = make_job_manager(settings, catalog)
    # Behind Ray Serve the engine replicas report the engine's gauges; the ingress, its requests per replica.
    metrics = make_metrics(settings, base, engine, catalog, jobs, engine_gauges=local, job_gauges=report_jobs,
                           by_replica=not local)
    engine.observer = EngineObserver(metrics)
    return Runtime(settings, base, catalog, engine, jobs, metrics, int(time.time()))


async def hold(rt: Runtime, version, pin: bool = False) -> bool:
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


async def let_go(rt: Runtime, keys: set[str]) -> set[str]:
    """Unpin these versions and drop them from both tiers (the engine keeps what running requests
    use until they end); the keys that left a tier."""
    dropped = {k for k in keys if rt.catalog.cache.drop(k)}
    return dropped | await rt.engine.unload(keys)


def make_metrics(settings: Settings, base: basemodel.LoadedBase, engine: BatchEngine, catalog: AdapterCatalog,
                 jobs: JobManager, *, engine_gauges: bool = True, job_gauges: bool = True,
                 by_replica: bool = False) -> Metrics:
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("hotpeft")
    except PackageNotFoundError:
        release = "unknown"

    def gauges() -> list:
        generation = GaugeMetricFamily("hotpeft_registry_generation", "The registry generation this process serves "
                                       "(it changes with every registration, promotion and deletion)")
        generation.add_metric([], catalog.snapshot.generation)
        out = [generation]
        if job_gauges:
            states = GaugeMetricFamily("hotpeft_training_jobs", "Fine-tuning jobs by state", labels=["state"])
            for state, n in jobs.store.count_by_status().items():
                states.add_metric([state], n)
            out.append(states)
        if not engine_gauges:
            return out
        stats = engine.stats()
        for name, doc, value in (
            ("hotpeft_requests_running", "Requests decoding now", stats["running"]),
            ("hotpeft_requests_waiting", "Requests waiting for a sequence slot", stats["waiting"]),
            ("hotpeft_kv_cache_used_tokens", "KV cache positions in use", stats["kv_tokens"]),
            ("hotpeft_kv_cache_capacity_tokens", "KV cache positions in all slots", stats["slots"] * stats["slot_len"]),
            ("hotpeft_kv_cache_used_bytes", "KV cache bytes holding positions in use",
             stats["kv_tokens"] * stats["kv_bytes"] // max(1, stats["slots"] * stats["slot_len"])),
            ("hotpeft_kv_cache_budget_bytes", "Bytes of the KV cache", stats["kv_bytes"]),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            out.append(g)
        count = GaugeMetricFamily("hotpeft_resident_adapters", "Adapters held per tier", labels=["tier"])
        count.add_metric(["device"], stats["resident_loras"])
        count.add_metric(["cpu"], len(catalog.cache.keys()))
        size = GaugeMetricFamily("hotpeft_resident_adapter_bytes", "Adapter bytes held per tier", labels=["tier"])
        size.add_metric(["device"], stats["resident_lora_bytes"])
        size.add_metric(["cpu"], catalog.cache.nbytes())
        events = []
        for key, doc in (("loads", "Adapters loaded into a tier"), ("evictions", "Adapters evicted from a tier (LRU)"),
                         ("hits", "Adapter lookups that found it in the tier"),
                         ("misses", "Adapter lookups that had to load it into the tier")):
            family = CounterMetricFamily(f"hotpeft_adapter_{'cache_' if key in ('hits', 'misses') else ''}{key}", doc,
                                         labels=["tier"])
            family.add_metric(["device"], engine.adapter_counts[key])
            family.add_metric(["cpu"], catalog.cache.counts[key])
            events.append(family)
        failures = CounterMetricFamily("hotpeft_adapter_load_failures", "Adapter loads that failed, per tier "
                                       "(cpu: read back from the store; device: into the engine)", labels=["tier"])
        failures.add_metric(["device"], engine.adapter_counts["load_failures"])
        failures.add_metric(["cpu"], catalog.load_failures)
        events.append(failures)
        return out + [count, size] + events

    info = {"version": release, "base_model": base.model_id, "quantization": base.quantization,
            "device": str(base.device)}
    return Metrics(base_id=base.model_id, max_adapters=settings.metrics_max_adapters, info=info, gauges=gauges,
                   by_replica=by_replica)


def make_job_manager(settings: Settings, catalog: AdapterCatalog) -> JobManager:
    """Fine-tuning jobs of this server: records in <home>/jobs.db, workers training on the served base."""
    threads = settings.train_threads or max(1, (os.cpu_count() or 1) // 2)
    worker = WorkerSettings(
        model=settings.model, home=str(settings.home), registry_url=settings.registry_url,
        store_dir=str(settings.store_dir) if settings.store_dir else None, store_url=settings.store_url,
        device=settings.device, threads=threads,
        max_lora_rank=settings.max_lora_rank, allow_foreign_base=settings.allow_foreign_base,
    )

    def find_registered(job_id: str) -> str | None:
        for record in catalog.registry.snapshot().records():
            if record.source == "training" and (record.source_detail or {}).get("job") == job_id:
                return record.key
        return None

    return JobManager(JobStore(settings.home), worker, max_running=settings.max_running_jobs,
                      find_registered=find_registered)


def open_catalog(settings: Settings, base: basemodel.LoadedBase, bank: LoraBank) -> AdapterCatalog:
    """Registry + store + the base's shapes; --adapters-dir folders registered when their content is new."""
    spec = BaseSpec(base.model_id, int(base.model.config.hidden_size), bank.linear_shapes())
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


def make_kv_cache(settings: Settings, base: basemodel.LoadedBase, dtype: torch.dtype, device: torch.device) -> SlotKVCache:
    """Slots of `max_model_len` positions, as many as the budget holds, at most --max-num-seqs."""
    per_token = kv_bytes_per_token(base.model.config, dtype)
    per_slot = per_token * base.max_model_len
    if settings.kv_cache_mib is not None:
        budget = settings.kv_cache_mib * 2**20
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * 0.3)
    else:
        budget = 4096 * 2**20
    n_slots = min(settings.max_num_seqs, budget // per_slot)
    if n_slots < 1:
        raise basemodel.ModelUnavailable(
            f"a KV cache budget of {budget / 2**20:.0f} MiB holds no sequence of {base.max_model_len} tokens "
            f"({per_slot / 2**20:.1f} MiB each); raise --kv-cache-mib to {-(-per_slot // 2**20)} or lower --max-model-len"
        )
    kv = SlotKVCache(base.model.config, n_slots, base.max_model_len, dtype, device)
    log.info("KV cache: %d slots x %d tokens, %.0f MiB%s", n_slots, base.max_model_len, kv.nbytes / 2**20,
             " (CPU pages are committed as they are used)" if device.type == "cpu" else "")
    return kv
