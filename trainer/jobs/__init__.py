"""Fine-tuning jobs: their records (`store`), the manager that runs them in worker processes
(`manager`) and the worker itself (`worker`). What the server's jobs API imports from the trainer;
nothing here imports torch."""
from hotpeft.trainer.jobs.manager import JobManager
from hotpeft.trainer.jobs.store import ACTIVE, TERMINAL, EventRecord, FileRecord, JobRecord, JobStore, new_id

__all__ = ["JobManager", "ACTIVE", "TERMINAL", "EventRecord", "FileRecord", "JobRecord", "JobStore", "new_id"]
