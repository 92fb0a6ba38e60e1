"""Fine-tuning files, jobs and their events: records in SQLite (`<home>/jobs.db`, SQLAlchemy).

Job states are OpenAI's: queued -> running -> succeeded | failed | cancelled. While running, `stage`
says where the worker is (starting, training, evaluating, registering). Every change of state is
a compare-and-set (`transition`), so the worker and the manager never overwrite each other: a job
cancelled while training can no longer enter `registering`, and one that entered it can no longer
be cancelled.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, fields
from pathlib import Path

from sqlalchemy import JSON, Float, Integer, String, Text, create_engine, event, func, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from hotpeft.adapters.paths import inside
from hotpeft.trainer.errors import JobConflict, JobNotFound

ACTIVE = ("validating_files", "queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")


class _Base(DeclarativeBase):
    pass


class FileRow(_Base):
    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    filename: Mapped[str] = mapped_column(Text)
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(Integer)
    examples: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16))


class JobRow(_Base):
    __tablename__ = "fine_tuning_jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    created_at: Mapped[int] = mapped_column(Integer, index=True)
    started_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    status: Mapped[str] = mapped_column(String(20), index=True)
    stage: Mapped[str | None] = mapped_column(String(20), nullable=True)
    model: Mapped[str] = mapped_column(Text)
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    adapter_name: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict] = mapped_column(JSON)
    hyperparameters: Mapped[dict] = mapped_column(JSON)
    job_metadata: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(80), nullable=True)
    error: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    metrics: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    progress: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    estimated_finish: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)


class EventRow(_Base):
    __tablename__ = "fine_tuning_events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    level: Mapped[str] = mapped_column(String(8))
    type: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict | None] = mapped_column(JSON, nullable=True)


@dataclass(frozen=True)
class FileRecord:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    examples: int
    format: str


@dataclass(frozen=True)
class JobRecord:
    id: str
    created_at: int
    status: str
    model: str
    training_file: str
    adapter_name: str
    config: dict
    hyperparameters: dict
    validation_file: str | None = None
    suffix: str | None = None
    job_metadata: dict | None = None
    started_at: int | None = None
    finished_at: int | None = None
    stage: str | None = None
    fine_tuned_model: str | None = None
    error: dict | None = None
    trained_tokens: int | None = None
    metrics: dict | None = None
    progress: dict | None = None
    estimated_finish: int | None = None
    pid: int | None = None


@dataclass(frozen=True)
class EventRecord:
    id: str
    created_at: int
    level: str
    type: str
    message: str
    data: dict | None = None


def _record(cls, row):
    return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # the worker writes events while the server reads them
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class JobStore:
    """Files, jobs and events. Shared by the server (API, manager) and the worker processes."""

    def __init__(self, home: Path):
        self.home = Path(home)
        self.files_dir = self.home / "files"
        self.logs_dir = self.home / "jobs"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.files_dir.chmod(0o700)  # training data: readable by this user only, served to no one (only to jobs)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(f"sqlite:///{self.home / 'jobs.db'}", connect_args={"timeout": 30})
        event.listen(self.engine, "connect", _sqlite_pragmas)
        _Base.metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # ---- files --------------------------------------------------------------------------------
    def file_path(self, file_id: str) -> Path:
        inside(self.files_dir, f"{file_id}.jsonl")  # ids are ours; a crafted one still cannot leave the folder
        return self.files_dir / f"{file_id}.jsonl"

    def add_file(self, record: FileRecord) -> FileRecord:
        with Session(self.engine) as s, s.begin():
            s.add(FileRow(**{f.name: getattr(record, f.name) for f in fields(FileRecord)}))
        return record

    def get_file(self, file_id: str, *, param: str = "file_id") -> FileRecord:
        with Session(self.engine) as s:
            row = s.get(FileRow, file_id)
            if row is None:
                raise JobNotFound(f"No such file: {file_id!r}", param=param)
            return _record(FileRecord, row)

    def list_files(self, purpose: str | None = None) -> list[FileRecord]:
        with Session(self.engine) as s:
            q = select(FileRow).order_by(FileRow.created_at.desc(), FileRow.id)
            if purpose:
                q = q.where(FileRow.purpose == purpose)
            return [_record(FileRecord, r) for r in s.scalars(q)]

    def delete_file(self, file_id: str) -> None:
        with Session(self.engine) as s, s.begin():
            row = s.get(FileRow, file_id)
            if row is None:
                raise JobNotFound(f"No such file: {file_id!r}", param="file_id")
            users = s.scalars(select(JobRow.id).where(JobRow.status.in_(ACTIVE)).where(
                (JobRow.training_file == file_id) | (JobRow.validation_file == file_id))).all()
            if users:
                raise JobConflict(f"file {file_id} is used by the unfinished job(s) {', '.join(users)}; cancel them "
                                  "or wait for them to finish", param="file_id")
            s.delete(row)
        self.file_path(file_id).unlink(missing_ok=True)

    # ---- jobs ---------------------------------------------------------------------------------
    def add_job(self, record: JobRecord) -> JobRecord:
        with Session(self.engine) as s, s.begin():
            s.add(JobRow(**{f.name: getattr(record, f.name) for f in fields(JobRecord)}))
        return record

    def get_job(self, job_id: str) -> JobRecord:
        with Session(self.engine) as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise JobNotFound(f"No such fine-tuning job: {job_id!r}", param="fine_tuning_job_id")
            return _record(JobRecord, row)

    def list_jobs(self, *, after: str | None = None, limit: int = 20, status: tuple[str, ...] | None = None
                  ) -> tuple[list[JobRecord], bool]:
        """Newest first; `after` is the id of the last job of the previous page."""
        with Session(self.engine) as s:
            q = select(JobRow).order_by(JobRow.created_at.desc(), JobRow.id.desc())
            if status:
                q = q.where(JobRow.status.in_(status))
            if after is not None:
                anchor = s.get(JobRow, after)
                if anchor is None:
                    raise JobNotFound(f"No such fine-tuning job: {after!r}", param="after")
                q = q.where((JobRow.created_at < anchor.created_at) |
                            ((JobRow.created_at == anchor.created_at) & (JobRow.id < anchor.id)))
            rows = list(s.scalars(q.limit(limit + 1)))
            return [_record(JobRecord, r) for r in rows[:limit]], len(rows) > limit

    def oldest_queued(self) -> JobRecord | None:
        with Session(self.engine) as s:
            row = s.scalars(select(JobRow).where(JobRow.status == "queued")
                            .order_by(JobRow.created_at, JobRow.id).limit(1)).first()
            return None if row is None else _record(JobRecord, row)

    def transition(self, job_id: str, from_status: tuple[str, ...], to_status: str | None = None, *,
                   not_stage: str | None = None, **values) -> bool:
        """Compare-and-set: change the job only if its status is one of `from_status` (and its stage is
        not `not_stage`). True when it changed."""
        q = update(JobRow).where(JobRow.id == job_id).where(JobRow.status.in_(from_status))
        if not_stage is not None:
            q = q.where((JobRow.stage.is_(None)) | (JobRow.stage != not_stage))
        if to_status is not None:
            values["status"] = to_status
        with Session(self.engine) as s, s.begin():
            return s.execute(q.values(**values)).rowcount == 1

    def count_by_status(self) -> dict[str, int]:
        with Session(self.engine) as s:
            out = dict.fromkeys(ACTIVE + TERMINAL, 0)
            for status, n in s.execute(select(JobRow.status, func.count()).group_by(JobRow.status)):
                out[status] = n
            return out

    # ---- events -------------------------------------------------------------------------------
    def add_event(self, job_id: str, message: str, *, level: str = "info", type: str = "message",
                  data: dict | None = None) -> None:
        with Session(self.engine) as s, s.begin():
            s.add(EventRow(job_id=job_id, created_at=time.time(), level=level, type=type, message=message,
                           data=json.loads(json.dumps(data, default=str)) if data is not None else None))

    def events(self, job_id: str, *, after: str | None = None, limit: int = 20) -> tuple[list[EventRecord], bool]:
        """Newest first, as OpenAI lists them; `after` is the id of the last event of the previous page."""
        self.get_job(job_id)
        with Session(self.engine) as s:
            q = select(EventRow).where(EventRow.job_id == job_id).order_by(EventRow.seq.desc())
            if after is not None:
                seq = after.removeprefix("ftevent-")
                if not seq.isdigit():
                    raise JobNotFound(f"No such event: {after!r}", param="after")
                q = q.where(EventRow.seq < int(seq))
            rows = list(s.scalars(q.limit(limit + 1)))
            return [EventRecord(f"ftevent-{r.seq}", int(r.created_at), r.level, r.type, r.message, r.data)
                    for r in rows[:limit]], len(rows) > limit
