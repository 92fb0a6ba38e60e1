"""What every HTTP request passes before a route: drain, auth, body size; and the count of those in flight.

Deny by default: when any key is configured, a route needs a key unless it is on the public
list, and an admin key unless it is on the inference list. A route added later is therefore
admin-only until someone decides otherwise (tests/test_auth.py walks the route table).

A pure ASGI middleware (not `BaseHTTPMiddleware`): streams pass through untouched, and a
client's disconnect still reaches the route that watches for it.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from enum import Enum

from hotpeft.server.config import Settings
from hotpeft.server.errors import error_body


class Scope(str, Enum):
    PUBLIC = "public"  # no key
    INFERENCE = "inference"  # an --api-key or an --admin-key
    ADMIN = "admin"  # an --admin-key


# Always public: probes, and the dashboard's static page (it holds no data; it asks for a key).
PUBLIC_PATHS = {"/health", "/ready", "/dashboard"}
# What an inference key may call; exact paths, and prefixes ending in "/".
INFERENCE_PATHS = {"/v1/models", "/v1/chat/completions", "/v1/completions",
                   "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
INFERENCE_PREFIXES = ("/v1/models/",)
# Answered while draining (everything else is 503): probes and the scrape.
DRAIN_EXEMPT = {"/health", "/ready", "/metrics"}
# Uploads: their routes stream the body to disk against their own limits (--max-adapter-bytes, --max-file-bytes).
UPLOAD_TYPES = ("multipart/form-data",)


def route_scope(path: str, settings: Settings) -> Scope:
    if path in PUBLIC_PATHS or (path == "/metrics" and settings.public_metrics) \
            or (path == "/dashboard/data" and settings.public_dashboard):
        return Scope.PUBLIC
    if path in INFERENCE_PATHS or path.startswith(INFERENCE_PREFIXES) or path in ("/metrics", "/dashboard/data"):
        return Scope.INFERENCE
    return Scope.ADMIN


class KeyRing:
    """Keys kept as SHA-256 digests and compared in constant time, every key every time."""

    def __init__(self, api_keys: list[str], admin_keys: list[str]):
        self._api = [self._digest(k) for k in api_keys]
        self._admin = [self._digest(k) for k in admin_keys]

    @staticmethod
    def _digest(key: str) -> bytes:
        return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()

    @staticmethod
    def _any(digest: bytes, keys: list[bytes]) -> bool:
        found = False
        for k in keys:  # no early exit: the time does not tell which key, or whether one matched
            found |= hmac.compare_digest(digest, k)
        return found

    def scope_of(self, presented: str | None) -> Scope | None:
        """The widest scope the presented key grants; None for no key or a wrong one."""
        if presented is None:
            return None
        digest = self._digest(presented)
        admin, api = self._any(digest, self._admin), self._any(digest, self._api)
        return Scope.ADMIN if admin else Scope.INFERENCE if api else None


@dataclass
class Lifecycle:
    """Drain state and the HTTP requests in flight (probes and the scrape not counted)."""

    draining: bool = False
    drain_started: float | None = None
    in_flight: int = 0

    def begin_drain(self) -> None:
        if not self.draining:
            self.draining, self.drain_started = True, time.monotonic()


def _bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def _header(headers: list[tuple[bytes, bytes]], wanted: bytes) -> str | None:
    for name, value in headers:
        if name == wanted:
            return value.decode("latin-1")
    return None


async def _reply(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class Guard:
    def __init__(self, app, settings: Settings, lifecycle: Lifecycle):
        self.app = app
        self.settings = settings
        self.lifecycle = lifecycle
        self.keys = KeyRing([k.get_secret_value() for k in settings.api_key],
                            [k.get_secret_value() for k in settings.admin_key])

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, headers = scope["path"], scope["headers"]
        if self.lifecycle.draining and path not in DRAIN_EXEMPT:
            return await _reply(send, 503, error_body(
                "the server is shutting down and takes no new requests; retry on another replica",
                "server_error", None, "shutting_down"), {"Retry-After": "1", "Connection": "close"})
        if self.settings.auth_enabled:
            needed = route_scope(path, self.settings)
            if needed is not Scope.PUBLIC:
                granted = self.keys.scope_of(_bearer(headers))
                if granted is None:
                    return await _reply(send, 401, error_body(
                        "missing or incorrect key: send 'Authorization: Bearer <key>' with a key this server was "
                        "started with (--api-key or --admin-key)", "invalid_request_error", None, "invalid_api_key"),
                        {"WWW-Authenticate": "Bearer"})
                if needed is Scope.ADMIN and granted is not Scope.ADMIN:
                    return await _reply(send, 403, error_body(
                        f"{scope['method']} {path} needs an admin key (--admin-key); this key may only call the "
                        "inference routes", "invalid_request_error", None, "insufficient_permissions"))
        content_type = (_header(headers, b"content-type") or "").lower()
        if scope["method"] in ("POST", "PUT", "PATCH") and not content_type.startswith(UPLOAD_TYPES):
            receive = await self._bounded_body(receive, send, headers)
            if receive is None:
                return
        counted = path not in DRAIN_EXEMPT
        if counted:
            self.lifecycle.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            if counted:
                self.lifecycle.in_flight -= 1

    async def _bounded_body(self, receive, send, headers):
        """Read the whole (small) body against --max-body-bytes; None when refused (413 sent)."""
        limit = self.settings.max_body_bytes
        too_large = error_body(
            f"the request body is larger than this server's limit of {limit} bytes (--max-body-bytes)",
            "invalid_request_error", None, "request_too_large")
        declared = _header(headers, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _reply(send, 413, too_large, {"Connection": "close"})
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                pending = [message]
                break
            size += len(message.get("body", b""))
            if size > limit:
                await _reply(send, 413, too_large, {"Connection": "close"})
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break

        async def replay():
            # The body once, then the real channel: a route still hears the client leave.
            return pending.pop(0) if pending else await receive()

        return replay
