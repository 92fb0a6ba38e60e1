"""Domain errors and their one mapping to HTTP in OpenAI's error shape."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hotpeft.adapters.errors import (
    AdapterConflict, AdapterError, AdapterIncompatible, AdapterInvalid, AdapterNotFound, AdapterTooLarge,
    AdapterUnavailable, InvalidName,
)
from hotpeft.server.engine.interface import (
    EngineFailure, OutOfMemory, Overloaded, ReplicaUnavailable, ShuttingDown,
)
from hotpeft.trainer.errors import ConfigInvalid, DatasetInvalid, JobConflict, JobNotFound, TrainerError

log = logging.getLogger("hotpeft.http")


class InvalidRequest(Exception):
    """A request that is well-formed JSON but asks for something we refuse (400)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class ForbiddenPath(InvalidRequest):
    """A server-side path the request may not use: outside every --import-root (403)."""


class PayloadTooLarge(InvalidRequest):
    """An upload over its size limit (413)."""


# class -> (status, type, code); the first match wins

_STATUS: list[tuple[type[BaseException], int, str, str | None]] = [
    (AdapterNotFound, 404, "invalid_request_error", "model_not_found"),
    (AdapterUnavailable, 500, "server_error", "adapter_unavailable"),
    (InvalidName, 400, "invalid_request_error", "invalid_name"),
    (AdapterIncompatible, 409, "invalid_request_error", "adapter_incompatible"),
    (AdapterConflict, 409, "invalid_request_error", "adapter_conflict"),
    (AdapterTooLarge, 413, "invalid_request_error", "adapter_too_large"),
    (AdapterInvalid, 400, "invalid_request_error", "adapter_invalid"),
    (AdapterError, 400, "invalid_request_error", None),
    (ForbiddenPath, 403, "invalid_request_error", "path_not_allowed"),
    (PayloadTooLarge, 413, "invalid_request_error", "file_too_large"),
    (JobNotFound, 404, "invalid_request_error", "not_found"),
    (JobConflict, 409, "invalid_request_error", "conflict"),
    (DatasetInvalid, 400, "invalid_request_error", "invalid_file"),
    (ConfigInvalid, 400, "invalid_request_error", "invalid_hyperparameters"),
    (TrainerError, 400, "invalid_request_error", None),
    (InvalidRequest, 400, "invalid_request_error", None),
    (ShuttingDown, 503, "server_error", "shutting_down"),
    (ReplicaUnavailable, 503, "server_error", "replica_unavailable"),
    (OutOfMemory, 503, "server_error", "out_of_memory"),
    (Overloaded, 429, "rate_limit_error", "server_overloaded"),
    (EngineFailure, 500, "server_error", "engine_failure"),
]


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def describe(exc: BaseException) -> tuple[int, dict]:
    """Status and OpenAI-shaped body for any exception (used by handlers and by SSE streams)."""
    if isinstance(exc, DBAPIError) and (exc.connection_invalidated or isinstance(exc, (OperationalError,
                                                                                         InterfaceError))):
        return 503, error_body(
            "the adapter registry is unreachable; adapters already known are still served, but nothing can be "
            "registered, promoted or deleted until it is back: retry later", "server_error", None,
            "registry_unavailable")
    for cls, status, type_, code in _STATUS:
        if isinstance(exc, cls):
            message = getattr(exc, "message", str(exc))
            return status, error_body(message, type_, getattr(exc, "param", None), getattr(exc, "code", None) or code)
    return 500, error_body("internal server error", "server_error", None, "internal_error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return f"We could not parse the JSON body of your request: {err.get('ctx', {}).get('error', err['msg'])}", None
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {'.'.join(loc)}", ".".join(loc)
    if err.get("type") == "missing":
        return f"Missing required parameter: '{'.'.join(loc)}'", ".".join(loc)
    if not loc:  # a check of the whole body; it may still name its parameter
        return msg, err.get("ctx", {}).get("param")
    return f"Invalid value for '{'.'.join(loc)}': {msg}", ".".join(loc)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param, None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), type_), status_code=exc.status_code, headers=exc.headers)

    async def _domain(_: Request, exc: Exception):
        status, body = describe(exc)
        if status >= 500:
            log.error("request failed: %s", exc)
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else None
        return JSONResponse(body, status_code=status, headers=headers)

    for cls, *_ in _STATUS:
        app.add_exception_handler(cls, _domain)
    app.add_exception_handler(DBAPIError, _domain)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        status, body = describe(exc)
        return JSONResponse(body, status_code=status)
