"""Fine-tuning files and jobs: their records (SQLAlchemy, `<home>/jobs.db`) and the manager that runs
queued jobs in worker processes, one at a time by default.

Job states are OpenAI's: queued -> running -> succeeded | failed | cancelled. While running, `stage`
says where the worker is (starting, training, evaluating, registering). Every change of state is
a compare-and-set, so the worker and the manager never overwrite each other: a job cancelled
while training can no longer enter `registering`, and one that entered it can no longer be
cancelled. The worker registers the adapter before it marks the job succeeded; if it dies in
between, the manager finds the version by its job id in the registry and completes the record.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from sqlalchemy import JSON, Float, Integer, String, Text, create_engine, event, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from hotpeft.adapters.paths import inside
from hotpeft.trainer.errors import JobConflict, JobNotFound

log = logging.getLogger("hotpeft.jobs")

ACTIVE = ("validating_files", "queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")
CANCEL_GRACE_S = 10.0  # after SIGTERM, a worker that has not exited is killed


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
        from sqlalchemy import func

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


@dataclass
class WorkerSettings:
    """What a worker needs beside the job record: the server's base and registry. Passed in the
    environment (never argv, never the jobs database) since a registry URL may hold a password."""

    model: str
    home: str
    registry_url: str | None
    store_dir: str | None
    store_url: str | None
    device: str
    threads: int
    max_lora_rank: int
    allow_foreign_base: bool

    ENV = "HOTPEFT_WORKER_SETTINGS"


def _is_worker_of(pid: int, job_id: str) -> bool:
    """Whether `pid` is alive and is the worker of `job_id` (a pid may have been reused since)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"hotpeft.trainer.worker" in cmdline and job_id.encode() in cmdline


class JobManager:
    """Runs queued jobs in worker processes (`python -m hotpeft.trainer.worker`), at most
    `max_running` at a time, and keeps their records true when workers die or the server restarts."""

    def __init__(self, store: JobStore, worker: WorkerSettings, *, max_running: int = 1,
                 find_registered: Callable[[str], str | None] = lambda job_id: None, poll_s: float = 0.2):
        self.store = store
        self.worker = worker
        self.max_running = max_running
        self.find_registered = find_registered  # job id -> "name@N" of the version it registered, if any
        self.poll_s = poll_s
        self._procs: dict[str, subprocess.Popen] = {}
        self._kill_at: dict[str, float] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="hotpeft-jobs", daemon=True)
        self._thread.start()

    def stop(self, reason: str = "the server shut down while the job was running") -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            procs = dict(self._procs)
        for job_id, proc in procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for job_id, proc in procs.items():
            try:
                proc.wait(timeout=CANCEL_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self._finish(job_id, proc.returncode, interrupted=reason)
        self.store.close()

    def recover(self) -> None:
        """Jobs left `running` by a previous server process: their workers died with it."""
        jobs, _ = self.store.list_jobs(limit=1_000_000, status=("running", "validating_files"))
        for job in jobs:
            if job.pid is not None and _is_worker_of(job.pid, job.id):
                continue  # another server on this home still runs it
            self._finish(job.id, None, interrupted="the server restarted while the job was running; create a new "
                                                   "job to train again")

    # ---- requests -----------------------------------------------------------------------------
    def submit(self, record: JobRecord) -> JobRecord:
        self.store.add_job(record)
        self.store.add_event(record.id, f"Created fine-tuning job {record.id}")
        self.store.add_event(record.id, "Validated the training file" + (" and the validation file"
                                                                         if record.validation_file else ""))
        self._wake.set()
        return self.store.get_job(record.id)

    def cancel(self, job_id: str) -> JobRecord:
        job = self.store.get_job(job_id)
        now = int(time.time())
        if not self.store.transition(job_id, ACTIVE, "cancelled", not_stage="registering", finished_at=now):
            job = self.store.get_job(job_id)
            if job.status == "running":
                raise JobConflict(f"job {job_id} is registering its adapter and can no longer be cancelled",
                                  param="fine_tuning_job_id")
            raise JobConflict(f"job {job_id} has already {job.status}; only queued or running jobs can be "
                              "cancelled", param="fine_tuning_job_id")
        self.store.add_event(job_id, "Job cancelled", level="warn")
        with self._lock:
            proc = self._procs.get(job_id)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # the worker stops at its next step and writes nothing more
                self._kill_at[job_id] = time.monotonic() + CANCEL_GRACE_S
        self._wake.set()
        return self.store.get_job(job_id)

    # ---- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._reap()
                self._launch()
            except Exception:  # noqa: BLE001 - keep scheduling; the failure is in the log
                log.exception("job scheduler step failed")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _reap(self) -> None:
        with self._lock:
            items = list(self._procs.items())
        for job_id, proc in items:
            rc = proc.poll()
            if rc is None:
                deadline = self._kill_at.get(job_id)
                if deadline is not None and time.monotonic() > deadline:
                    log.warning("job %s: worker did not stop %.0fs after SIGTERM; killing it", job_id, CANCEL_GRACE_S)
                    proc.kill()
                continue
            with self._lock:
                self._procs.pop(job_id, None)
                self._kill_at.pop(job_id, None)
            self._finish(job_id, rc)

    def _launch(self) -> None:
        while True:
            with self._lock:
                if len(self._procs) >= self.max_running or self._stop.is_set():
                    return
            job = self.store.oldest_queued()
            if job is None:
                return
            if not self.store.transition(job.id, ("queued",), "running", stage="starting",
                                         started_at=int(time.time())):
                continue  # cancelled in the meantime
            log_file = open(self.store.logs_dir / f"{job.id}.log", "ab")  # noqa: SIM115 - owned by the child
            # The server's keys stay with the server: a worker has no use for them.
            env = {k: v for k, v in os.environ.items() if k not in ("HOTPEFT_API_KEY", "HOTPEFT_ADMIN_KEY")}
            env |= {WorkerSettings.ENV: json.dumps(self.worker.__dict__), "OMP_NUM_THREADS": str(self.worker.threads)}
            try:
                proc = subprocess.Popen([sys.executable, "-m", "hotpeft.trainer.worker", job.id], env=env,
                                        stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
            except OSError as e:
                self.store.transition(job.id, ("running",), "failed", finished_at=int(time.time()),
                                      error={"code": "worker_failed", "message": f"could not start a worker: {e}",
                                             "param": None})
                continue
            finally:
                log_file.close()
            self.store.transition(job.id, ("running",), pid=proc.pid)
            self.store.add_event(job.id, "Fine-tuning job started")
            log.info("job %s: worker %d started for adapter %s", job.id, proc.pid, job.adapter_name)
            with self._lock:
                self._procs[job.id] = proc

    def _finish(self, job_id: str, returncode: int | None, *, interrupted: str | None = None) -> None:
        """A worker is gone: if it did not write its outcome, write it now."""
        job = self.store.get_job(job_id)
        if job.status in TERMINAL:
            return
        now = int(time.time())
        registered = self.find_registered(job_id)
        if registered is not None:  # it died after the registry commit, before marking the job
            if self.store.transition(job_id, ("running",), "succeeded", stage=None, finished_at=now,
                                     fine_tuned_model=registered):
                self.store.add_event(job_id, f"Registered adapter {registered}; the job has successfully completed")
            return
        if interrupted is not None:
            message = f"interrupted: {interrupted}"
        elif returncode is not None and returncode < 0:
            message = f"the training worker was killed by signal {signal.Signals(-returncode).name} before finishing"
        else:
            message = f"the training worker exited with status {returncode} before finishing (see the job's log)"
        if self.store.transition(job_id, ACTIVE, "failed", stage=None, finished_at=now,
                                 error={"code": "worker_died" if interrupted is None else "interrupted",
                                        "message": message, "param": None}):
            self.store.add_event(job_id, f"Job failed: {message}", level="error")
            log.warning("job %s failed: %s", job_id, message)
