"""The OpenAPI document: the routes read their bodies themselves (to answer schema errors as OpenAI 400s and
to stream), so FastAPI cannot see their schemas. This fills them in from protocol.py: request bodies,
200 bodies (JSON, or an SSE stream for generation), and every error status each route can answer, all in
the one ErrorResponse shape. FastAPI's own 422 entries are dropped: this server never answers 422."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from .protocol import (AdapterRequest, ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                       CompletionResponse, ErrorResponse, ModelCard, ModelList)

GENERATION_ERRORS = (400, 401, 404, 413, 429, 500, 503)
BODIES = {
    ("/v1/chat/completions", "post"): ChatCompletionRequest,
    ("/v1/completions", "post"): CompletionRequest,
    ("/v1/adapters/load", "post"): AdapterRequest,
    ("/v1/adapters/reload", "post"): AdapterRequest,
    ("/v1/adapters/unload", "post"): AdapterRequest,
}
SSE = {"text/event-stream": {"schema": {  # one server-sent event: `data: <chunk JSON>`, the last `data: [DONE]`
    "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}}
DELETED = {"type": "object", "required": ["id", "object", "deleted"],
           "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "deleted": {"type": "boolean"}}}
HEALTH = {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}
OK: dict[tuple[str, str], Any] = {
    ("/v1/chat/completions", "post"): (ChatCompletionResponse, SSE),
    ("/v1/completions", "post"): (CompletionResponse, SSE),
    ("/v1/models", "get"): (ModelList, None),
    ("/v1/models/{model_id}", "get"): (ModelCard, None),
    ("/v1/adapters/load", "post"): (ModelCard, None),
    ("/v1/adapters/reload", "post"): (ModelCard, None),
    ("/v1/adapters/unload", "post"): (DELETED, None),
    ("/health", "get"): (HEALTH, None),
    ("/metrics", "get"): ({"type": "string"}, None),
}
ERRORS = {
    ("/v1/chat/completions", "post"): GENERATION_ERRORS,
    ("/v1/completions", "post"): GENERATION_ERRORS,
    ("/v1/models", "get"): (401, 503),
    ("/v1/models/{model_id}", "get"): (401, 404, 503),
    ("/v1/adapters/load", "post"): (400, 401, 403, 404, 413, 503),
    ("/v1/adapters/reload", "post"): (400, 401, 403, 404, 413, 503),
    ("/v1/adapters/unload", "post"): (400, 401, 403, 404, 413),
    ("/health", "get"): (500, 503),
    ("/metrics", "get"): (401,),
}


def _component(components: dict, model: type[BaseModel], mode: str) -> dict:
    schema = model.model_json_schema(mode=mode, ref_template="#/components/schemas/{model}")
    for name, sub in schema.pop("$defs", {}).items():
        components.setdefault(name, sub)
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _schema(components: dict, body: Any, mode: str) -> dict:
    return _component(components, body, mode) if isinstance(body, type) else body


def build_openapi(app: FastAPI) -> dict:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    error = _component(components, ErrorResponse, "serialization")
    for (path, method), op in ((k, doc["paths"].get(k[0], {}).get(k[1])) for k in OK):
        if op is None:
            continue
        if (path, method) in BODIES:
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": _component(components, BODIES[path, method], "validation")}}}
        body, stream = OK[path, method]
        media = "text/plain" if path == "/metrics" else "application/json"
        content = {media: {"schema": _schema(components, body, "serialization")}, **(stream or {})}
        responses = {"200": {"description": "OK", "content": content}}
        for status in ERRORS[path, method]:
            responses[str(status)] = {"description": "Error (OpenAI shape)",
                                      "content": {"application/json": {"schema": error}}}
        op["responses"] = responses
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return doc


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
