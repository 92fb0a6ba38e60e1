"""What can go wrong with an adapter. The server maps each class to one HTTP status."""


class AdapterError(Exception):
    """Base class; `param` names the request field the problem is about, when there is one."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class AdapterNotFound(AdapterError):
    """No adapter (or no such version) answers to this name."""


class AdapterInvalid(AdapterError):
    """The files are not an adapter we can serve: bad format, unsupported type, bad tensors."""


class AdapterIncompatible(AdapterError):
    """A well-formed adapter, but trained for another base model."""


class InvalidName(AdapterError):
    """A name outside [a-z0-9][a-z0-9._-]{0,63}."""


class AdapterTooLarge(AdapterError):
    """An upload over --max-adapter-bytes (HTTP 413)."""


class AdapterConflict(AdapterError):
    """The operation cannot be done in the adapter's current state (HTTP 409), e.g. no room to pin it."""


class AdapterUnavailable(AdapterError):
    """A registered version whose stored files are missing or corrupt: a fault of this server's storage,
    not of the request (HTTP 500 for this adapter only; everything else keeps serving)."""
