"""The persistent catalogue of adapters and their versions (SQLAlchemy: SQLite or PostgreSQL).

Tables:
    adapters          name, active version, next version number (numbers are never reused, so
                      `name@N` always means the same weights, even after a delete)
    adapter_versions  one row per registered version: every field of `VersionRecord`
    registry_meta     one row, `generation`: bumped by every change, so a process sharing the
                      database sees that something changed with one cheap query

Every change is one transaction whose first statement bumps `generation`: that row's lock
orders concurrent writers (two registrations of the same name become consecutive versions),
and a writer killed before COMMIT leaves nothing behind.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from sqlalchemy import JSON, BigInteger, Float, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine, event
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from hotpeft.adapters.errors import AdapterNotFound
from hotpeft.adapters.faults import failpoint

log = logging.getLogger("hotpeft.registry")


class _Base(DeclarativeBase):
    pass


class AdapterRow(_Base):
    __tablename__ = "adapters"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    active_version: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: deleted
    next_version: Mapped[int] = mapped_column(Integer)
    created: Mapped[float] = mapped_column(Float)


class VersionRow(_Base):
    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), ForeignKey("adapters.name"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    base_model: Mapped[str] = mapped_column(String(512))
    base_fingerprint: Mapped[str] = mapped_column(String(600))
    rank: Mapped[int | None] = mapped_column(Integer, nullable=True)
    alpha: Mapped[float | None] = mapped_column(Float, nullable=True)
    target_modules: Mapped[list | None] = mapped_column(JSON, nullable=True)
    num_virtual_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    store_key: Mapped[str] = mapped_column(String(64))
    created: Mapped[float] = mapped_column(Float)
    source: Mapped[str] = mapped_column(String(32))
    source_detail: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    metrics: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    description: Mapped[str] = mapped_column(Text, default="")
    warnings: Mapped[list | None] = mapped_column(JSON, nullable=True)


class MetaRow(_Base):
    __tablename__ = "registry_meta"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    generation: Mapped[int] = mapped_column(BigInteger)


@dataclass(frozen=True)
class NewVersion:
    """What a registration supplies; the registry adds name, version and created time."""

    kind: str  # "lora" | "prompt_tuning"
    base_model: str
    base_fingerprint: str
    size_bytes: int
    sha256: str  # of adapter_model.safetensors
    store_key: str
    source: str  # "upload" | "import" | "training" | "merge" | "adapters-dir"
    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str] | None = None
    num_virtual_tokens: int | None = None
    source_detail: dict | None = None
    metrics: dict | None = None
    description: str = ""
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class VersionRecord(NewVersion):
    name: str = ""
    version: int = 0
    created: float = 0.0

    @property
    def key(self) -> str:
        """Identity of this exact version (numbers are never reused): caches are keyed by it."""
        return f"{self.name}@{self.version}"


_RECORD_FIELDS = [f.name for f in fields(VersionRecord)]


def _record(row: VersionRow) -> VersionRecord:
    values = {name: getattr(row, name) for name in _RECORD_FIELDS}
    values["warnings"] = list(values["warnings"] or [])
    return VersionRecord(**values)


@dataclass(frozen=True)
class Snapshot:
    generation: int
    versions: dict[str, dict[int, VersionRecord]]  # name -> version -> record (live names only)
    active: dict[str, int]

    def records(self) -> list[VersionRecord]:
        return [r for vs in self.versions.values() for r in vs.values()]


class AdapterRegistry:
    def __init__(self, url: str):
        self.url = url
        kwargs: dict = {"pool_pre_ping": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30}
        self.engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._create_schema()

    def _create_schema(self) -> None:
        for attempt in range(5):  # two processes creating the schema at once: one wins, the other retries
            try:
                _Base.metadata.create_all(self.engine)
                with Session(self.engine) as s, s.begin():
                    if s.get(MetaRow, 1) is None:
                        s.add(MetaRow(id=1, generation=0))
                return
            except (IntegrityError, OperationalError):
                if attempt == 4:
                    raise
                time.sleep(0.1 * (attempt + 1))

    def close(self) -> None:
        self.engine.dispose()

    # ---- reading ------------------------------------------------------------------------------
    def generation(self) -> int:
        with Session(self.engine) as s:
            return s.execute(select(MetaRow.generation).where(MetaRow.id == 1)).scalar_one()

    def snapshot(self) -> Snapshot:
        with Session(self.engine) as s, s.begin():
            gen = s.execute(select(MetaRow.generation).where(MetaRow.id == 1)).scalar_one()
            active = {r.name: r.active_version for r in s.scalars(select(AdapterRow)) if r.active_version is not None}
            versions: dict[str, dict[int, VersionRecord]] = {}
            for row in s.scalars(select(VersionRow).order_by(VersionRow.name, VersionRow.version)):
                if row.name in active:
                    versions.setdefault(row.name, {})[row.version] = _record(row)
        return Snapshot(gen, versions, active)

    # ---- writing ------------------------------------------------------------------------------
    def _write(self, change: Callable[[Session], object]):
        """Run `change` in one transaction that first takes the generation row's lock."""
        for attempt in range(20):
            try:
                with Session(self.engine, expire_on_commit=False) as s, s.begin():
                    s.execute(update(MetaRow).where(MetaRow.id == 1).values(generation=MetaRow.generation + 1))
                    result = change(s)
                    s.flush()
                    failpoint("registry.before-commit")
                return result
            except OperationalError as e:  # SQLite "database is locked" past its timeout, a PostgreSQL serialization failure
                if attempt == 19:
                    raise
                log.warning("registry busy (%s); retrying", str(e).splitlines()[0])
                time.sleep(0.05 * (attempt + 1))

    def add_version(self, name: str, new: NewVersion, *, activate: bool = True) -> VersionRecord:
        """A new version of `name` (created if needed), active unless told otherwise."""

        def change(s: Session) -> VersionRecord:
            adapter = s.get(AdapterRow, name)
            now = time.time()
            if adapter is None:
                adapter = AdapterRow(name=name, active_version=None, next_version=1, created=now)
                s.add(adapter)
            number = adapter.next_version
            adapter.next_version = number + 1
            values = {f.name: getattr(new, f.name) for f in fields(NewVersion)}
            row = VersionRow(name=name, version=number, created=now, **values)
            s.add(row)
            if activate or adapter.active_version is None:
                adapter.active_version = number
            s.flush()
            return _record(row)

        return self._write(change)

    def promote(self, name: str, version: int) -> VersionRecord:
        def change(s: Session) -> VersionRecord:
            adapter, row = _version(s, name, version)
            adapter.active_version = version
            return _record(row)

        return self._write(change)

    def update_metrics(self, name: str, version: int, patch: dict) -> VersionRecord:
        """Merge `patch` into the version's `metrics` (nested dicts key by key, anything else replaced), in one
        transaction; the generation bump makes a server sharing the registry show it within its poll interval."""

        def change(s: Session) -> VersionRecord:
            _, row = _version(s, name, version)
            row.metrics = _merged(row.metrics or {}, patch)  # a new object: the JSON column sees only assignment
            return _record(row)

        return self._write(change)

    def delete(self, name: str, version: int | None = None) -> list[VersionRecord]:
        """Remove one version, or all of them. The active version of what is left is the newest one."""

        def change(s: Session) -> list[VersionRecord]:
            adapter = s.get(AdapterRow, name)
            if adapter is None or adapter.active_version is None:
                raise AdapterNotFound(f"adapter {name!r} does not exist", param="name")
            rows = list(s.scalars(select(VersionRow).where(VersionRow.name == name)))
            doomed = [r for r in rows if version is None or r.version == version]
            if not doomed:
                raise AdapterNotFound(
                    f"adapter {name!r} has no version {version}; versions: "
                    f"{', '.join(str(r.version) for r in sorted(rows, key=lambda r: r.version))}",
                    param="version",
                )
            removed = [_record(r) for r in doomed]
            for r in doomed:
                s.delete(r)
            left = [r.version for r in rows if r not in doomed]
            if not left:
                adapter.active_version = None  # kept as a tombstone: its numbers are never reused
            elif adapter.active_version not in left:
                adapter.active_version = max(left)
            return removed

        return self._write(change)


def _merged(old: dict, patch: dict) -> dict:
    """`old` with `patch` merged in: dicts recursively, other values replaced; neither argument is changed."""
    out = dict(old)
    for key, value in patch.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _version(s: Session, name: str, version: int) -> tuple[AdapterRow, VersionRow]:
    """An adapter and one of its versions, or AdapterNotFound naming what is missing."""
    adapter = s.get(AdapterRow, name)
    row = s.execute(select(VersionRow).where(VersionRow.name == name, VersionRow.version == version)).scalar()
    if adapter is None or adapter.active_version is None:
        raise AdapterNotFound(f"adapter {name!r} does not exist", param="name")
    if row is None:
        raise AdapterNotFound(f"adapter {name!r} has no version {version}", param="version")
    return adapter, row


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: readers (the server's poll) never wait for a writer (a training job registering).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
