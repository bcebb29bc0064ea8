"""Typed errors raised by the engine and the adapter registry; server/app.py maps them to HTTP."""
from __future__ import annotations


class ServingError(Exception):
    """Base class. `param` names the offending request field when there is one."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ServingError):
    """The request is malformed or asks for something unsupported (HTTP 400)."""


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus max_tokens does not fit max_model_len (HTTP 400)."""


class ModelNotFound(ServingError):
    """No base model or adapter by that name (HTTP 404)."""


class AdapterUnavailable(ServingError):
    """The adapter exists but cannot be served now: it failed validation or to load (HTTP 409 / 503)."""


class Unauthorized(ServingError):
    """Missing or wrong API key (HTTP 401)."""


class Overloaded(ServingError):
    """Too many requests queued; retry later (HTTP 429 with Retry-After)."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class EngineNotReady(ServingError):
    """The engine is loading or shutting down (HTTP 503)."""


class EngineDead(ServingError):
    """The engine loop crashed; the request cannot complete (HTTP 500)."""
