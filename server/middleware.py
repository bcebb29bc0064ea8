"""Pure-ASGI gate in front of every route: request ids (X-Request-Id, log context), the body size cap
(413), Bearer API keys (401/403, deny by default), and HTTP metrics. Pure ASGI so streaming and
disconnect detection pass through untouched."""
from __future__ import annotations

import hashlib
import hmac
import logging
import re
import uuid
from collections.abc import Sequence
from contextvars import ContextVar
from enum import Enum

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ServingError, Unauthorized
from .http_errors import Forbidden, PayloadTooLarge, error_response
from .metrics import Metrics

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every log record (use %(request_id)s in the format)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class Access(Enum):
    PUBLIC = "public"
    KEY = "key"
    ADMIN = "admin"


class KeyChecker:
    """Constant-time Bearer check against SHA-256 digests (equal length, no early exit, keys not kept)."""

    def __init__(self, keys: Sequence[str]):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).digest()
        ok = False
        for known in self._digests:
            ok |= hmac.compare_digest(digest, known)
        return ok and scheme.lower() == "bearer"


def access_for(path: str, metrics_auth: bool) -> Access:
    if path in ("/", "/health") or path.startswith("/static/"):
        return Access.PUBLIC
    if path == "/metrics":
        return Access.KEY if metrics_auth else Access.PUBLIC
    if path.startswith("/v1/adapters"):
        return Access.ADMIN
    return Access.KEY  # deny by default: everything else, /v1/* included, needs a key when keys are set


class Gatekeeper:
    def __init__(self, app: ASGIApp, keys: KeyChecker, max_body_bytes: int, metrics_auth: bool, metrics: Metrics):
        self.app = app
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.metrics_auth = metrics_auth
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(rid)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("x-request-id", rid)
            await send(message)

        self.metrics.in_flight.inc()
        try:
            refusal = self._refusal(scope["path"], headers)
            if refusal is not None:
                await error_response(refusal)(scope, receive, send_with_id)
                return
            await self.app(scope, self._limited(receive), send_with_id)
        finally:
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.http.labels(route, str(status)).inc()
            request_id_var.reset(token)

    def _refusal(self, path: str, headers: dict[str, str]) -> ServingError | None:
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return PayloadTooLarge(f"The request body is {length} bytes; this server accepts at most "
                                   f"{self.max_body_bytes} (--max-body-bytes)")
        access = access_for(path, self.metrics_auth)
        if access is Access.PUBLIC:
            return None
        if access is Access.ADMIN and not self.keys.enabled:
            return Forbidden("Adapter admin endpoints are disabled: start the server with --api-key to enable them")
        if self.keys.enabled and not self.keys.check(headers.get("authorization")):
            return Unauthorized("Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.")
        return None

    def _limited(self, receive: Receive) -> Receive:
        seen = 0
        limit = self.max_body_bytes

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"The request body is over {limit} bytes (--max-body-bytes)")
            return message

        return limited
