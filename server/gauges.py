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
    used_blocks = stats.kv_blocks - stats.kv_blocks_free
    block_bytes = stats.kv_bytes // max(1, stats.kv_blocks + 1)  # the null block is part of the bytes
    out = [
        _gauge("hotpeft_requests_running", "Requests decoding now", stats.running),
        _gauge("hotpeft_requests_waiting", "Requests waiting for room (KV blocks, an adapter slot)", stats.waiting),
        _gauge("hotpeft_requests_preempted", "Requests put back for lack of KV blocks, waiting to resume",
               stats.preempted),
        _gauge("hotpeft_kv_cache_used_tokens", "KV cache positions in use", stats.kv_tokens),
        _gauge("hotpeft_kv_cache_capacity_tokens", "KV cache positions in the block pool", stats.kv_capacity_tokens),
        _gauge("hotpeft_kv_cache_used_bytes", "KV cache bytes of the blocks running sequences hold",
               used_blocks * block_bytes),
        _gauge("hotpeft_kv_cache_free_bytes", "KV cache bytes of free blocks (cached ones included)",
               stats.kv_blocks_free * block_bytes),
        _gauge("hotpeft_kv_cache_budget_bytes", "Bytes of the KV cache", stats.kv_bytes),
        _gauge("hotpeft_kv_cache_blocks", "KV blocks in the pool", stats.kv_blocks),
        _gauge("hotpeft_kv_cache_blocks_free", "KV blocks no running sequence holds", stats.kv_blocks_free),
        _gauge("hotpeft_kv_cache_blocks_cached", "Free KV blocks the prefix cache can hand out again",
               stats.kv_blocks_cached),
        CounterMetricFamily("hotpeft_preemptions", "Running sequences preempted for lack of KV blocks "
                            "(recomputed later)", value=stats.preemptions),
        CounterMetricFamily("hotpeft_prefix_cache_hit_tokens", "Prompt tokens whose KV the prefix cache held",
                            value=stats.prefix_hit_tokens),
        CounterMetricFamily("hotpeft_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache",
                            value=stats.prefix_query_tokens),
        CounterMetricFamily("hotpeft_prefix_cache_evictions", "Cached KV blocks reused for other KV",
                            value=stats.prefix_evictions),
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
