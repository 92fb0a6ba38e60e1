"""The manager of fine-tuning jobs: runs queued jobs in worker processes (`python -m
hotpeft.trainer.jobs.worker JOB_ID`), at most `max_running` at a time, and keeps their records
true when workers die or the server restarts.

The worker registers the adapter before it marks the job succeeded; if it dies in between, the
manager finds the version by its job id in the registry and completes the record.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from hotpeft.trainer.env import ENV_VAR, TrainerEnv
from hotpeft.trainer.errors import JobConflict
from hotpeft.trainer.jobs.store import ACTIVE, TERMINAL, JobRecord, JobStore

log = logging.getLogger("hotpeft.jobs")

CANCEL_GRACE_S = 10.0  # after SIGTERM, a worker that has not exited is killed
WORKER_MODULE = "hotpeft.trainer.jobs.worker"


def _is_worker_of(pid: int, job_id: str) -> bool:
    """Whether `pid` is alive and is the worker of `job_id` (a pid may have been reused since)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return WORKER_MODULE.encode() in cmdline and job_id.encode() in cmdline


class JobManager:
    """Runs queued jobs in worker processes, each training with `env` (the server's base and catalogue)."""

    def __init__(self, store: JobStore, env: TrainerEnv, *, max_running: int = 1,
                 find_registered: Callable[[str], str | None] = lambda job_id: None, poll_s: float = 0.2):
        self.store = store
        self.env = env
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
            env |= {ENV_VAR: self.env.to_json(), "OMP_NUM_THREADS": str(self.env.threads or 1)}
            try:
                proc = subprocess.Popen([sys.executable, "-m", WORKER_MODULE, job.id], env=env,
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
