"""The gauges `/metrics` reads at scrape time: registry generation, jobs by state, and the engine's
queue, KV cache and adapter tiers. Never stale, never kept."""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from hotpeft.adapters import AdapterCatalog
from hotpeft.server.engine.interface import Engine
from hotpeft.trainer.jobs import JobStore


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


def registry_families(catalog: AdapterCatalog) -> list:
    return [_gauge("hotpeft_registry_generation", "The registry generation this process serves (it changes with "
                   "every registration, promotion and deletion)", catalog.snapshot.generation)]


def job_families(jobs: JobStore) -> list:
    states = GaugeMetricFamily("hotpeft_training_jobs", "Fine-tuning jobs by state", labels=["state"])
    for state, n in jobs.count_by_status().items():
        states.add_metric([state], n)
    return [states]


def engine_families(engine: Engine, catalog: AdapterCatalog) -> list:
    stats = engine.stats()
    capacity = stats.slots * stats.slot_len
    out = [
        _gauge("hotpeft_requests_running", "Requests decoding now", stats.running),
        _gauge("hotpeft_requests_waiting", "Requests waiting for a sequence slot", stats.waiting),
        _gauge("hotpeft_kv_cache_used_tokens", "KV cache positions in use", stats.kv_tokens),
        _gauge("hotpeft_kv_cache_capacity_tokens", "KV cache positions in all slots", capacity),
        _gauge("hotpeft_kv_cache_used_bytes", "KV cache bytes holding positions in use",
               stats.kv_tokens * stats.kv_bytes // max(1, capacity)),
        _gauge("hotpeft_kv_cache_budget_bytes", "Bytes of the KV cache", stats.kv_bytes),
    ]
    cache = catalog.cache
    count = GaugeMetricFamily("hotpeft_resident_adapters", "Adapters held per tier", labels=["tier"])
    count.add_metric(["device"], stats.resident_loras)
    count.add_metric(["cpu"], len(cache.keys()))
    size = GaugeMetricFamily("hotpeft_resident_adapter_bytes", "Adapter bytes held per tier (device: the LoRA "
                             "stacks, rank padding included)", labels=["tier"])
    size.add_metric(["device"], stats.resident_lora_bytes)
    size.add_metric(["cpu"], cache.nbytes())
    out += [count, size]
    for key, doc in (("loads", "Adapters loaded into a tier"), ("evictions", "Adapters evicted from a tier (LRU)"),
                     ("hits", "Adapter lookups that found it in the tier"),
                     ("misses", "Adapter lookups that had to load it into the tier")):
        family = CounterMetricFamily(f"hotpeft_adapter_{'cache_' if key in ('hits', 'misses') else ''}{key}", doc,
                                     labels=["tier"])
        family.add_metric(["device"], getattr(stats.adapters, key))
        family.add_metric(["cpu"], cache.counts[key])
        out.append(family)
    failures = CounterMetricFamily("hotpeft_adapter_load_failures", "Adapter loads that failed, per tier "
                                   "(cpu: read back from the store; device: into the engine)", labels=["tier"])
    failures.add_metric(["device"], stats.adapters.load_failures)
    failures.add_metric(["cpu"], catalog.load_failures)
    return out + [failures]
