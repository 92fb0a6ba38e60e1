"""The in-process catalogue of adapter versions, and how a request's `model` resolves.

Names map to numbered versions; one version per name is active. Registration validates the
whole adapter first and only then adds it, under a lock, so nothing is ever half-registered.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hotpeft.adapters.errors import AdapterNotFound
from hotpeft.adapters.format import BaseSpec, ParsedAdapter, load_adapter_dir
from hotpeft.adapters.names import BASE_ALIAS, parse_model_ref, validate_name

BASE_KEY = "__base__"  # the base model is an explicit id, never None


@dataclass(frozen=True)
class AdapterVersion:
    name: str
    version: int
    adapter: ParsedAdapter
    source: str
    created: int
    description: str = ""

    @property
    def key(self) -> str:
        """Identity of this exact version: engine caches are keyed by it."""
        return f"{self.name}@{self.version}"

    @property
    def kind(self) -> str:
        return self.adapter.kind


@dataclass(frozen=True)
class Resolved:
    """What a request's `model` names: the base (adapter None) or one adapter version."""

    requested: str
    adapter: AdapterVersion | None

    @property
    def key(self) -> str:
        return BASE_KEY if self.adapter is None else self.adapter.key


class AdapterCatalog:
    def __init__(self, base: BaseSpec, *, max_lora_rank: int, allow_foreign_base: bool = False):
        self.base = base
        self.max_lora_rank = max_lora_rank
        self.allow_foreign_base = allow_foreign_base
        self._lock = threading.Lock()
        self._versions: dict[str, dict[int, AdapterVersion]] = {}
        self._active: dict[str, int] = {}

    def register_dir(self, name: str, path: Path, *, source: str = "import", description: str = "") -> AdapterVersion:
        validate_name(name)
        parsed = load_adapter_dir(
            path, self.base, max_lora_rank=self.max_lora_rank, allow_foreign_base=self.allow_foreign_base
        )
        return self.register(name, parsed, source=source, description=description)

    def register(self, name: str, parsed: ParsedAdapter, *, source: str, description: str = "") -> AdapterVersion:
        validate_name(name)
        with self._lock:
            versions = self._versions.setdefault(name, {})
            number = max(versions, default=0) + 1
            av = AdapterVersion(name, number, parsed, source, int(time.time()), description)
            versions[number] = av
            self._active[name] = number
            return av

    def active(self) -> list[AdapterVersion]:
        with self._lock:
            return [self._versions[n][v] for n, v in sorted(self._active.items())]

    def resolve(self, model: str) -> Resolved:
        if model in (self.base.model_id, BASE_ALIAS):
            return Resolved(model, None)
        try:
            ref = parse_model_ref(model)
        except Exception:
            ref = None
        with self._lock:
            versions = self._versions.get(ref.name) if ref else None
            if versions and ref.version is None:
                return Resolved(model, versions[self._active[ref.name]])
            if versions and ref.version in versions:
                return Resolved(model, versions[ref.version])
            available = [self.base.model_id] + sorted(self._active)
        if versions:
            raise AdapterNotFound(
                f"adapter {ref.name!r} has no version {ref.version}; versions: "
                f"{', '.join(str(v) for v in sorted(versions))}",
                param="model",
            )
        raise AdapterNotFound(
            f"The model {model!r} does not exist. Available: {', '.join(available)} "
            f"(the base also answers to {BASE_ALIAS!r}; pin a version with name@N)",
            param="model",
        )
