"""What can go wrong before or during training. The server maps each class to one HTTP status."""
from __future__ import annotations


class TrainerError(Exception):
    """Base class; `param` names the field (API) or flag (CLI) the problem is about, when there is one."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class ConfigInvalid(TrainerError):
    """A hyper-parameter out of range or a contradictory combination. `field` is the TrainConfig field."""

    def __init__(self, field: str, message: str):
        super().__init__(message, param=field)
        self.field = field


class DatasetInvalid(TrainerError):
    """A training or validation file we cannot train on; `line` is 1-based when one line is at fault."""

    def __init__(self, message: str, *, line: int | None = None, param: str | None = None):
        super().__init__(message, param=param)
        self.line = line


class JobNotFound(TrainerError):
    """No fine-tuning job or file with this id (HTTP 404)."""


class JobConflict(TrainerError):
    """The job or file is in a state that forbids the operation (HTTP 409), e.g. cancelling a finished job."""


class JobCancelled(TrainerError):
    """Raised inside a worker when its job was cancelled: stop, write nothing more."""


class InsufficientImprovement(TrainerError):
    """The trained adapter did not beat the base by --min-improvement: it is not registered."""


class Forgetting(InsufficientImprovement):
    """The trained adapter lost more of the retention set than --max-forgetting allows: it is not registered."""
