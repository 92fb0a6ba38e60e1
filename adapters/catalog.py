"""The adapters one base model can serve: registration, resolution of a request's `model`, loading.

    register  validate the whole folder against the base -> content-addressed store -> one
              registry transaction (new version, made active). Nothing is written before the
              adapter is known good; a crash leaves the version wholly there or wholly absent.
    resolve   `name` (active version) or `name@N`, from an in-memory snapshot of the registry that
              `watch` refreshes when another process changes the registry.
    load      the version's weights: CPU tier (bounded, LRU by bytes) <- store on disk.

Used by the server and by the trainer (which registers what it trained); imports neither.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hotpeft.adapters.cache import AdapterCache
from hotpeft.adapters.errors import (
    AdapterError, AdapterIncompatible, AdapterInvalid, AdapterNotFound, AdapterUnavailable,
)
from hotpeft.adapters.format import CONFIG_FILE, WEIGHTS_FILE, BaseSpec, ParsedAdapter, load_adapter_dir, parse_adapter
from hotpeft.adapters.merge import Source, check_recipe, merge
from hotpeft.adapters.names import BASE_ALIAS, parse_model_ref, validate_name
from hotpeft.adapters.paths import UnsafePath
from hotpeft.adapters.registry import AdapterRegistry, NewVersion, Snapshot, VersionRecord
from hotpeft.adapters.store import TEMPLATE_FILE, AdapterStore

log = logging.getLogger("hotpeft.adapters")

BASE_KEY = "__base__"  # the base model is an explicit id, never None


@dataclass(frozen=True)
class AdapterVersion:
    """One servable adapter: its weights, the key caches know it by, and its registry record
    (None for a per-request mix, which is never registered)."""

    key: str
    adapter: ParsedAdapter
    record: VersionRecord | None = None
    # A mix's exact recipe ([(name@N, weight)], strategy, density): enough for another process to build it.
    recipe: tuple | None = None

    @property
    def kind(self) -> str:
        return self.adapter.kind


@dataclass(frozen=True)
class Resolved:
    """What a request's `model` names: the base (record None) or one registered version."""

    requested: str
    record: VersionRecord | None

    @property
    def key(self) -> str:
        return BASE_KEY if self.record is None else self.record.key


@dataclass(frozen=True)
class Registered:
    """What a registration did: the version that has the content, and whether it was already there."""

    record: VersionRecord
    unchanged: bool


class AdapterCatalog:
    def __init__(self, registry: AdapterRegistry, store: AdapterStore, base: BaseSpec, base_fingerprint: str, *,
                 max_lora_rank: int, allow_foreign_base: bool = False, max_cpu_bytes: int = 2 << 30):
        self.registry = registry
        self.store = store
        self.base = base
        self.base_fingerprint = base_fingerprint
        self.max_lora_rank = max_lora_rank
        self.allow_foreign_base = allow_foreign_base
        self.cache = AdapterCache(max_cpu_bytes)
        self.on_removed: list[Callable[[set[str]], None]] = []  # told the keys of deleted versions
        self._refresh_lock = threading.Lock()
        self._snap: Snapshot = registry.snapshot()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.load_failures = 0  # versions whose weights could not be loaded from the store, since start

    # ---- registration -------------------------------------------------------------------------
    def validate_dir(self, path: Path, *, label: str | None = None) -> ParsedAdapter:
        return load_adapter_dir(path, self.base, max_lora_rank=self.max_lora_rank,
                                allow_foreign_base=self.allow_foreign_base, label=label)

    def register_dir(self, name: str, path: Path, *, source: str, label: str | None = None, description: str = "",
                     source_detail: dict | None = None, metrics: dict | None = None) -> VersionRecord:
        """Validate the PEFT folder at `path` completely, store it, and add it as the active version."""
        return self._register(name, path, source=source, label=label, description=description,
                              source_detail=source_detail, metrics=metrics, reuse_identical=False).record

    def register_or_reuse(self, name: str, path: Path, *, source: str, label: str | None = None,
                          description: str = "", source_detail: dict | None = None) -> Registered:
        """As `register_dir`, but content identical to a version of `name` adds no copy: that version
        is returned (`unchanged`), and made the active one if it was not."""
        return self._register(name, path, source=source, label=label, description=description,
                              source_detail=source_detail, metrics=None, reuse_identical=True)

    def _register(self, name: str, path: Path, *, source: str, label: str | None, description: str,
                  source_detail: dict | None, metrics: dict | None, reuse_identical: bool) -> Registered:
        validate_name(name)
        parsed = self.validate_dir(path, label=label)
        with self.store.staging() as staged:
            for f in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copyfile(path / f, staged / f)
            if parsed.chat_template is not None:  # from chat_template.jinja or tokenizer_config.json
                (staged / TEMPLATE_FILE).write_text(parsed.chat_template)
            # Stored even when it is there already: putting it again repairs a damaged object.
            stored = self.store.put(staged, {"kind": parsed.kind, "base_fingerprint": self.base_fingerprint})
        same = self._same_content(name, stored.key) if reuse_identical else None
        if same is not None:
            if self._snap.active.get(name) != same.version:
                same = self.promote(name, same.version)
            log.info("adapter %s: the content registered again is that of %s; no new version", name, same.key)
            return Registered(same, unchanged=True)
        cfg = parsed.config
        new = NewVersion(
            kind=parsed.kind, base_model=self.base.model_id, base_fingerprint=self.base_fingerprint,
            size_bytes=stored.size_bytes, sha256=stored.weights_sha256, store_key=stored.key, source=source,
            rank=parsed.rank, alpha=float(cfg["lora_alpha"]) if parsed.kind == "lora" and "lora_alpha" in cfg else None,
            target_modules=sorted({m.rpartition(".")[2] for m in parsed.lora}) if parsed.kind == "lora" else None,
            num_virtual_tokens=parsed.num_virtual_tokens or None, source_detail=source_detail, metrics=metrics,
            description=description, warnings=list(parsed.warnings),
        )
        record = self.registry.add_version(name, new)
        self.cache.put(record.key, parsed)
        self.refresh()
        for w in parsed.warnings:
            log.warning("adapter %s: %s", record.key, w)
        log.info("registered adapter %s (%s, %d bytes, %s)", record.key, record.kind, record.size_bytes, source)
        return Registered(record, unchanged=False)

    def _same_content(self, name: str, content_key: str) -> VersionRecord | None:
        """The newest version of `name` whose stored content is `content_key`, as the registry has it now."""
        self.refresh()
        same = [r for r in self._snap.versions.get(name, {}).values() if r.store_key == content_key]
        return max(same, key=lambda r: r.version, default=None)

    def register_merge(self, name: str, sources: list[tuple[str, float]], strategy: str, *,
                       density: float | None = None, description: str = "", param: str = "sources") -> VersionRecord:
        """Combine registered LoRA adapters (`name` or `name@N`, weight) into a new registered adapter."""
        validate_name(name)
        recipe = self._recipe(sources, strategy, density, param)
        config, tensors = merge(recipe, strategy, density=density, all_modules=self.base.linear_shapes)
        detail = {"strategy": strategy, "density": density,
                  "sources": [{"name": s.label, "weight": s.weight} for s in recipe]}
        with self.store.staging() as staged:
            _write_peft_folder(staged, config, tensors)
            return self.register_dir(name, staged, source="merge", label="merged adapter", description=description,
                                     source_detail=detail)

    def mix(self, sources: list[tuple[str, float]], strategy: str, *, density: float | None = None,
            param: str = "adapters") -> AdapterVersion:
        """A weighted combination for one request, never registered; cached by its exact recipe
        (names with versions, weights, strategy), so a new version of a source makes a new mix."""
        recipe = self._recipe(sources, strategy, density, param)
        spec = json.dumps([[s.label, s.weight] for s in recipe] + [strategy, density])
        key = "mix:" + hashlib.sha256(spec.encode()).hexdigest()[:16]

        def build() -> ParsedAdapter:
            config, tensors = merge(recipe, strategy, density=density, all_modules=self.base.linear_shapes)
            try:
                return parse_adapter(config, tensors, self.base, max_lora_rank=self.max_lora_rank,
                                     allow_foreign_base=True)
            except AdapterError as e:  # e.g. a `cat` whose summed rank is above --max-lora-rank
                e.param = e.param or param
                raise

        return AdapterVersion(key, self.cache.get_or_load(key, build),
                              recipe=(tuple((s.label, s.weight) for s in recipe), strategy, density))

    def _recipe(self, sources: list[tuple[str, float]], strategy: str, density, param: str) -> list[Source]:
        recipe = []
        for ref, weight in sources:
            resolved = self.resolve(ref, param=param)
            if resolved.record is None:
                raise AdapterNotFound(f"{ref!r} is the base model; merge sources must be adapters", param=param)
            recipe.append(Source(resolved.record.key, self.load(resolved.record).adapter, float(weight)))
        check_recipe(recipe, strategy, density, param=param)
        return recipe

    # ---- lifecycle ----------------------------------------------------------------------------
    def promote(self, name: str, version: int) -> VersionRecord:
        record = self.registry.promote(name, version)
        self.refresh()
        return record

    def delete(self, name: str, version: int | None = None) -> list[VersionRecord]:
        removed = self.registry.delete(name, version)
        self.refresh()
        self.collect_garbage()
        return removed

    def collect_garbage(self, grace_s: float = 600.0) -> list[str]:
        referenced = {r.store_key for r in self.registry.snapshot().records()}
        return self.store.collect_garbage(referenced, grace_s)

    def refresh(self) -> None:
        """Take a new snapshot of the registry; forget what was deleted."""
        with self._refresh_lock:
            old = {r.key for r in self._snap.records()}
            self._snap = self.registry.snapshot()
            removed = old - {r.key for r in self._snap.records()}
        for key in removed:
            self.cache.drop(key)
        for callback in self.on_removed if removed else ():
            try:
                callback(removed)
            except Exception:  # noqa: BLE001 - e.g. the engine is stopping; the versions are gone regardless
                log.exception("could not release deleted adapters %s", sorted(removed))

    def watch(self, interval_s: float = 0.5) -> None:
        """Poll the registry's generation in a thread; refresh when another process changed it."""

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    if self.registry.generation() != self._snap.generation:
                        self.refresh()
                except Exception as e:  # noqa: BLE001 - a database outage: keep serving the last snapshot
                    if self.registry_problem is None:
                        log.error("registry unreachable (%s); serving the %d adapter(s) already known",
                                  type(e).__name__, len(self._snap.records()))
                    self.registry_problem = _short(e)
                else:
                    if self.registry_problem is not None:
                        log.info("registry reachable again")
                    self.registry_problem = None

        if self._watcher is None:
            self._stop.clear()
            self._watcher = threading.Thread(target=loop, name="hotpeft-registry-watch", daemon=True)
            self._watcher.start()

    registry_problem: str | None = None  # set while the watcher cannot reach the registry (/ready: degraded)

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
            self._watcher = None
        self.registry.close()

    # ---- serving ------------------------------------------------------------------------------
    @property
    def snapshot(self) -> Snapshot:
        return self._snap

    def active(self) -> list[VersionRecord]:
        snap = self._snap
        return [snap.versions[n][v] for n, v in sorted(snap.active.items())]

    def resolve(self, model: str, *, param: str = "model") -> Resolved:
        if model in (self.base.model_id, BASE_ALIAS):
            return Resolved(model, None)
        try:
            ref = parse_model_ref(model)
        except Exception:
            ref = None
        snap = self._snap
        versions = snap.versions.get(ref.name) if ref else None
        record = None
        if versions:
            record = versions.get(snap.active[ref.name] if ref.version is None else ref.version)
        if record is None and versions:
            raise AdapterNotFound(
                f"adapter {ref.name!r} has no version {ref.version}; versions: "
                f"{', '.join(str(v) for v in sorted(versions))}",
                param=param,
            )
        if record is None:
            available = [self.base.model_id] + sorted(snap.active)
            shown = ", ".join(available[:20]) + (f" and {len(available) - 20} more" if len(available) > 20 else "")
            raise AdapterNotFound(
                f"The model {model!r} does not exist. Available: {shown} "
                f"(the base also answers to {BASE_ALIAS!r}; pin a version with name@N)",
                param=param,
            )
        if record.base_fingerprint != self.base_fingerprint:
            raise AdapterIncompatible(
                f"adapter {record.key} was registered for base {record.base_fingerprint}, but this server's base is "
                f"{self.base_fingerprint}", param=param,
            )
        return Resolved(model, record)

    def load(self, record: VersionRecord) -> AdapterVersion:
        """The version's weights, from the CPU tier or else from the store (checked against its sha256,
        unless the file is untouched since it last was)."""

        def read() -> ParsedAdapter:
            try:
                folder, _ = self.store.checked_folder(record.store_key, record.sha256)
                # Checked completely at registration; read again with the same checks (this server's limits).
                return load_adapter_dir(folder, self.base, max_lora_rank=self.max_lora_rank, allow_foreign_base=True,
                                        label=record.key)
            except (AdapterUnavailable, AdapterInvalid, UnsafePath, OSError) as e:
                # Registered whole, so whatever is wrong now is wrong with the storage, not the request.
                raise AdapterUnavailable(
                    f"adapter {record.key} cannot be served: {getattr(e, 'message', None) or e}. Register it again, or "
                    f"delete version {record.version} (DELETE /v1/adapters/{record.key}); other adapters are not "
                    "affected", param="model") from e

        try:
            return AdapterVersion(record.key, self.cache.get_or_load(record.key, read), record)
        except Exception:
            self.load_failures += 1  # for metrics: a stored version that could not be read back
            raise

    def sync_folder(self, name: str, folder: Path, *, source: str) -> VersionRecord | None:
        """Register `folder` as `name` unless the active version already has this exact content."""
        key, _, _ = self.store.describe(folder)
        snap = self._snap
        if name in snap.active:
            current = snap.versions[name][snap.active[name]]
            if (current.source_detail or {}).get("content_key") == key:
                return None
        return self.register_dir(name, folder, source=source, source_detail={"folder": folder.name, "content_key": key})


def _write_peft_folder(folder: Path, config: dict, tensors: dict) -> None:
    from safetensors.torch import save_file

    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    save_file(tensors, str(folder / WEIGHTS_FILE))


def _short(e: BaseException) -> str:
    """A database error in one line, without the SQL it ran."""
    text = str(getattr(e, "orig", None) or e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
