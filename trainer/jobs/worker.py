"""One fine-tuning job in its own process, started by the server's JobManager:

    python -m hotpeft.trainer.jobs.worker JOB_ID      (its TrainerEnv in $HOTPEFT_TRAINER_ENV)

It runs at a lower CPU priority with a bounded number of threads, so that the server keeps
answering; it dies with the server (PR_SET_PDEATHSIG) and stops at the next step on SIGTERM
(cancel). Its outcome goes to the job record with compare-and-set writes: a cancelled job is
never registered, and nothing is half-written (registration is the catalogue's atomic one).
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from hotpeft.trainer.config import TrainConfig
from hotpeft.trainer.env import ENV_VAR, TrainerEnv
from hotpeft.trainer.errors import (ConfigInvalid, DatasetInvalid, Forgetting, InsufficientImprovement, JobCancelled,
                                   TrainerError)
from hotpeft.trainer.jobs.store import JobStore
from hotpeft.trainer.mixture import Task, task_name, unique_names
from hotpeft.trainer.pipeline import run_training

log = logging.getLogger("hotpeft.worker")

ERROR_CODES = [
    (DatasetInvalid, "invalid_training_file"),
    (ConfigInvalid, "invalid_hyperparameters"),
    (Forgetting, "forgetting"),
    (InsufficientImprovement, "insufficient_improvement"),
    (TrainerError, "training_error"),
]


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the server died before the prctl took effect
        os._exit(1)


class Reporter:
    """Progress to the job record and events, at most every `every_s` seconds (and at the end)."""

    def __init__(self, store: JobStore, job_id: str, every_s: float = 2.0):
        self.store, self.job_id, self.every_s = store, job_id, every_s
        self._last = 0.0
        self._eval_started = 0.0

    def __call__(self, step: int, total: int, loss: float, elapsed: float) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s and step < total:
            return
        self._last = now
        eta = elapsed / max(step, 1) * (total - step)
        progress = {"step": step, "total_steps": total, "train_loss": round(loss, 6), "elapsed_s": round(elapsed, 1),
                    "eta_s": round(eta, 1)}
        self.store.transition(self.job_id, ("running",), progress=progress,
                              estimated_finish=int(time.time() + eta))
        self.store.add_event(self.job_id, f"Step {step}/{total}: training loss={loss:.4f}", type="metrics",
                             data=progress)

    def evaluating(self, label: str, done: int, total: int) -> None:
        """Evaluation of the base, then the adapter: the job's stage, and an event every few seconds."""
        now = time.monotonic()
        if done == 0:
            self._eval_started = now
            self.store.transition(self.job_id, ("running",), not_stage="registering", stage="evaluating")
        if now - self._last < self.every_s and 0 < done < total:
            return
        self._last = now
        elapsed = now - self._eval_started
        eta = elapsed / done * (total - done) if done else None
        self.store.add_event(self.job_id, f"Evaluating {label}: {done}/{total} examples"
                             + (f", about {eta:.0f} s left" if eta is not None and done < total else ""),
                             data={"evaluating": label, "done": done, "total": total})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job_id = argv[0]
    parent = os.getppid()
    _die_with_parent(parent)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    env = TrainerEnv.from_json(os.environ[ENV_VAR])
    try:
        os.nice(10)  # serving comes first
    except OSError:
        pass
    cancelled = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: cancelled.set())

    store = JobStore(env.home)
    job = store.get_job(job_id)
    last_check = [0.0]

    def should_stop() -> bool:
        if cancelled.is_set():
            return True
        if time.monotonic() - last_check[0] > 2.0:  # a SIGTERM may be missed while the process starts
            last_check[0] = time.monotonic()
            if store.get_job(job_id).status != "running":
                cancelled.set()
        return cancelled.is_set()

    def events(message: str, data: dict | None = None) -> None:
        store.add_event(job_id, message, data=data)

    def stage(name: str) -> None:
        store.transition(job_id, ("running",), stage=name)

    def before_register() -> None:
        if not store.transition(job_id, ("running",), not_stage="registering", stage="registering"):
            raise JobCancelled("the job was cancelled before registration")

    try:
        extra = job.config.get("tasks") or []  # multi-task: the other files, beside training_file
        cfg = TrainConfig(**{k: v for k, v in job.config.items() if k != "tasks"})
        if cfg.retention not in ("default", "none"):  # the id of an uploaded file (checked when the job was made)
            cfg.retention = str(store.file_path(cfg.retention))
        reporter = Reporter(store, job_id)
        stage("training")
        data = store.file_path(job.training_file)
        valid = store.file_path(job.validation_file) if job.validation_file else None
        if extra:
            data = _tasks(store, job, extra)
            valid = None
        outcome = run_training(
            cfg, data, valid, env, job_id=job_id,
            progress=reporter, events=events, should_stop=should_stop, before_register=before_register,
            eval_progress=reporter.evaluating,
        )
    except JobCancelled as e:
        log.info("job %s: %s", job_id, e)
        return 0
    except Exception as e:  # noqa: BLE001 - every failure becomes the job's error, with its reason
        code = next((c for cls, c in ERROR_CODES if isinstance(e, cls)), "training_error")
        message = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
        if code == "training_error" and not isinstance(e, TrainerError):
            log.exception("job %s failed", job_id)
        if store.transition(job_id, ("running",), "failed", stage=None, finished_at=int(time.time()),
                            error={"code": code, "message": message, "param": getattr(e, "param", None)}):
            store.add_event(job_id, f"Job failed: {message}", level="error")
        return 1
    record = outcome.record
    store.transition(job_id, ("running",), "succeeded", stage=None, finished_at=int(time.time()),
                     fine_tuned_model=record.key, trained_tokens=outcome.metrics["training"]["train_tokens"],
                     metrics=outcome.metrics)
    store.add_event(job_id, "The job has successfully completed", data={"fine_tuned_model": record.key})
    log.info("job %s: registered %s", job_id, record.key)
    return 0


def _tasks(store: JobStore, job, extra: list[dict]) -> list[Task]:
    """The job's training file (weight 1) and its `hotpeft.tasks`, as the trainer's tasks."""
    def path(file_id: str | None) -> Path | None:
        return store.file_path(file_id) if file_id else None

    def name(file_id: str) -> str:  # the uploaded file's name, as `hotpeft train` names a task
        return task_name(Path(store.get_file(file_id).filename))

    tasks = [Task(name(job.training_file), store.file_path(job.training_file), 1.0, path(job.validation_file))]
    for t in extra:
        tasks.append(Task(t.get("name") or name(t["training_file"]), store.file_path(t["training_file"]),
                          t["weight"], path(t.get("validation_file")), t.get("template")))
    return unique_names(tasks)


if __name__ == "__main__":
    sys.exit(main())

