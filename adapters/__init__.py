"""hotpeft.adapters: what an adapter is — format, validation, names, registry, store, tiers, merging."""
from hotpeft.adapters.catalog import BASE_KEY, AdapterCatalog, AdapterVersion, Resolved
from hotpeft.adapters.errors import (
    AdapterError, AdapterIncompatible, AdapterInvalid, AdapterNotFound, AdapterTooLarge, AdapterUnavailable,
    InvalidName,
)
from hotpeft.adapters.format import BaseSpec, ParsedAdapter, load_adapter_dir
from hotpeft.adapters.registry import AdapterRegistry, VersionRecord
from hotpeft.adapters.store import AdapterStore

__all__ = [
    "BASE_KEY", "AdapterCatalog", "AdapterVersion", "Resolved", "AdapterError", "AdapterIncompatible",
    "AdapterInvalid", "AdapterNotFound", "AdapterTooLarge", "AdapterUnavailable", "InvalidName", "BaseSpec", "ParsedAdapter",
    "load_adapter_dir", "AdapterRegistry", "VersionRecord", "AdapterStore",
]
