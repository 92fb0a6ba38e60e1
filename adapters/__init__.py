"""hotpeft.adapters: what an adapter is — format, validation, names, catalogue."""
from hotpeft.adapters.catalog import BASE_KEY, AdapterCatalog, AdapterVersion, Resolved
from hotpeft.adapters.errors import AdapterError, AdapterIncompatible, AdapterInvalid, AdapterNotFound, InvalidName
from hotpeft.adapters.format import BaseSpec, ParsedAdapter, load_adapter_dir

__all__ = [
    "BASE_KEY", "AdapterCatalog", "AdapterVersion", "Resolved", "AdapterError", "AdapterIncompatible",
    "AdapterInvalid", "AdapterNotFound", "InvalidName", "BaseSpec", "ParsedAdapter", "load_adapter_dir",
]
