"""The one exception → HTTP table, and the OpenAI error body, response and stream event built from it."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.responses import Response

from .errors import (AdapterUnavailable, ContextLengthExceeded, EngineDead, EngineNotReady, InvalidRequest,
                     ModelNotFound, Overloaded, ServingError, Unauthorized)
from .protocol import ErrorBody, ErrorResponse, ErrorType


class PayloadTooLarge(InvalidRequest):
    """The request body is over --max-body-bytes (HTTP 413)."""


class Forbidden(ServingError):
    """Authenticated but not allowed, e.g. admin routes on a server without API keys (HTTP 403)."""


class RouteNotFound(ServingError):
    """No such URL (HTTP 404)."""


class MethodNotAllowed(ServingError):
    """The URL exists but not with this method (HTTP 405)."""


class ShuttingDown(EngineNotReady):
    """The server is draining; generation was refused or cut short (HTTP 503)."""


class AdapterRefused(AdapterUnavailable):
    """The adapter failed validation or loading; retrying will not help until it is fixed (HTTP 503)."""


class InternalError(ServingError):
    """A bug: anything not in the table (HTTP 500)."""


@dataclass(frozen=True)
class HttpError:
    status: int
    type: ErrorType
    code: str | None = None
    retry_after: float | None = None  # seconds; sent as Retry-After
    should_retry: bool = True  # False: `x-should-retry: false`, which the openai SDK obeys


ERROR_TABLE: dict[type[Exception], HttpError] = {
    ContextLengthExceeded: HttpError(400, ErrorType.INVALID_REQUEST, "context_length_exceeded"),
    PayloadTooLarge: HttpError(413, ErrorType.INVALID_REQUEST, "request_too_large"),
    InvalidRequest: HttpError(400, ErrorType.INVALID_REQUEST, "invalid_value"),
    Unauthorized: HttpError(401, ErrorType.INVALID_REQUEST, "invalid_api_key"),
    Forbidden: HttpError(403, ErrorType.PERMISSION, "forbidden"),
    ModelNotFound: HttpError(404, ErrorType.INVALID_REQUEST, "model_not_found"),
    RouteNotFound: HttpError(404, ErrorType.INVALID_REQUEST, "not_found"),
    MethodNotAllowed: HttpError(405, ErrorType.INVALID_REQUEST, "method_not_allowed"),
    Overloaded: HttpError(429, ErrorType.RATE_LIMIT, "rate_limit_exceeded", 1.0),
    EngineDead: HttpError(500, ErrorType.SERVER, "engine_dead"),
    InternalError: HttpError(500, ErrorType.SERVER, "internal_error"),
    AdapterRefused: HttpError(503, ErrorType.UNAVAILABLE, "adapter_failed", should_retry=False),
    AdapterUnavailable: HttpError(503, ErrorType.UNAVAILABLE, "adapter_unavailable", 5.0),
    ShuttingDown: HttpError(503, ErrorType.UNAVAILABLE, "server_shutting_down", 5.0),
    EngineNotReady: HttpError(503, ErrorType.UNAVAILABLE, "engine_not_ready", 5.0),
}


def lookup(exc: BaseException) -> HttpError:
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return ERROR_TABLE[InternalError]


def _message(exc: BaseException) -> str:
    if isinstance(exc, ServingError):
        return exc.message
    return "The server had an error while processing your request."  # never leak internals


def error_body(exc: BaseException) -> ErrorResponse:
    spec = lookup(exc)
    param = exc.param if isinstance(exc, ServingError) else None
    return ErrorResponse(error=ErrorBody(message=_message(exc), type=spec.type, param=param, code=spec.code))


def error_response(exc: BaseException, headers: dict[str, str] | None = None) -> Response:
    spec = lookup(exc)
    headers = dict(headers or {})
    retry_after = getattr(exc, "retry_after", None) or spec.retry_after
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    if not spec.should_retry:
        headers["x-should-retry"] = "false"
    return Response(error_body(exc).model_dump_json(), status_code=spec.status, headers=headers,
                    media_type="application/json")


def error_event(exc: BaseException) -> str:
    """The in-stream form: one `data: {"error": ...}` event (the SDK raises APIError on it)."""
    return error_body(exc).model_dump_json()


def _param(loc: Sequence[Any]) -> str | None:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def from_validation_error(exc: ValidationError) -> InvalidRequest:
    """Schema errors become 400s naming the field (for a union, the part of the path all members share)."""
    errors = exc.errors(include_url=False)
    if any(e["type"] == "json_invalid" for e in errors):
        detail = next(e for e in errors if e["type"] == "json_invalid").get("ctx", {}).get("error", "")
        return InvalidRequest(f"We could not parse the JSON body of your request: {detail}".rstrip(": "))
    head = errors[0]["loc"][:1]
    group = [e for e in errors if tuple(e["loc"][:1]) == tuple(head)]
    common = list(group[0]["loc"])
    for e in group[1:]:
        n = 0
        while n < min(len(common), len(e["loc"])) and common[n] == e["loc"][n]:
            n += 1
        common = common[:n]
    param = _param(common)
    if len(group) == 1 and group[0]["type"] == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param)
    msgs = list(dict.fromkeys(e["msg"] for e in group))[:3]
    got = group[0].get("input")
    shown = json.dumps(got, ensure_ascii=False)[:80] if not isinstance(got, dict) else "an object"
    text = " or ".join(msgs) if len(group) > 1 else msgs[0]
    return InvalidRequest(f"Invalid value for '{param or 'body'}': {text} (got {shown})", param)
