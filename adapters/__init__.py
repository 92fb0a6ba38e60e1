"""hotpeft.adapters: what an adapter is — format, validation, names, registry, store, tiers, merging.

The names below are loaded on first use (PEP 562), so that light modules of this package
(`names`, `errors`, `paths`) can be imported without torch and SQLAlchemy: the CLI starts fast.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "BASE_KEY": "catalog", "AdapterCatalog": "catalog", "AdapterVersion": "catalog", "Resolved": "catalog",
    "AdapterError": "errors", "AdapterIncompatible": "errors", "AdapterInvalid": "errors", "AdapterNotFound": "errors",
    "AdapterTooLarge": "errors", "AdapterUnavailable": "errors", "InvalidName": "errors",
    "BaseSpec": "format", "ParsedAdapter": "format", "load_adapter_dir": "format",
    "AdapterRegistry": "registry", "VersionRecord": "registry", "AdapterStore": "store",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hotpeft.adapters' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hotpeft.adapters.{module}"), name)
    globals()[name] = value
    return value
