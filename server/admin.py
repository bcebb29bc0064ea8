"""Adapter admin routes (load, reload, unload), key-guarded by the Gatekeeper and confined to --checkpoints:
names and paths are NAME or NAME/checkpoint-N, nothing else, and must resolve inside that folder."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from fastapi import APIRouter
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from .client import EngineClient, ModelInfo
from .errors import InvalidRequest, ModelNotFound, ServingError
from .http_errors import from_validation_error
from .metrics import Metrics
from .protocol import AdapterRequest, ModelCard

log = logging.getLogger("server.admin")
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_CHECKPOINT = re.compile(r"^checkpoint-[0-9]{1,12}$")


def checked_name(name: str, param: str = "name") -> str:
    """NAME or NAME/checkpoint-N; '..', other slashes, backslashes, '%' escapes, absolute paths refused."""
    parts = name.split("/")
    ok = (0 < len(parts) <= 2 and ".." not in name and all(_SEGMENT.match(p) for p in parts)
          and (len(parts) == 1 or _CHECKPOINT.match(parts[1])))
    if not ok:
        raise InvalidRequest(f"{param} {name!r} is not allowed: use a checkpoint folder name, or "
                             "name/checkpoint-N, made of letters, digits, '.', '_' and '-'", param)
    return name


def confined_path(root: Path, relative: str, param: str) -> Path:
    """The folder `relative` names under `root`, refusing anything that resolves outside it (symlinks too)."""
    checked_name(relative, param)
    base = root.resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base):
        raise InvalidRequest(f"{param} {relative!r} resolves outside the checkpoints folder", param)
    if not path.is_dir():
        raise ModelNotFound(f"There is no checkpoint folder {relative!r} in the checkpoints folder", param)
    return path


def model_card(info: ModelInfo, engine: EngineClient) -> ModelCard:
    return ModelCard(id=info.id, created=info.created, owned_by="chatglm-ptuning-serve",
                     root=info.parent or info.id, parent=info.parent, max_model_len=engine.max_model_len,
                     kind=info.kind, state=info.state, pre_seq_len=info.pre_seq_len,
                     prefix_projection=info.prefix_projection, version=info.version, fingerprint=info.fingerprint,
                     error=info.error, warnings=list(info.warnings))


def admin_router(engine: EngineClient, checkpoints: Path, metrics: Metrics) -> APIRouter:
    router = APIRouter(prefix="/v1/adapters")

    async def parse(request: Request) -> AdapterRequest:
        try:
            return AdapterRequest.model_validate_json(await request.body() or b"{}", strict=True)
        except ValidationError as e:
            raise from_validation_error(e) from None

    async def run(action: str, name: str, call) -> Response:
        label = metrics.labels(name)
        try:
            result = await call
        except ServingError as e:
            metrics.adapter_events.labels(label, action, "refused").inc()
            log.warning("adapter %s %s refused: %s", name, action, e.message)
            raise
        metrics.adapter_events.labels(label, action, "ok").inc()
        if isinstance(result, ModelInfo):
            log.info("adapter %s %s: state=%s version=%s", name, action, result.state.value, result.version)
            return Response(model_card(result, engine).model_dump_json(), media_type="application/json")
        log.info("adapter %s %s", name, action)
        return Response(json.dumps({"id": name, "object": "model", "deleted": True}), media_type="application/json")

    @router.post("/load")
    async def load(request: Request) -> Response:
        req = await parse(request)
        name = checked_name(req.name)
        path = confined_path(checkpoints, req.path or name, "path" if req.path else "name")
        return await run("load", name, engine.load_adapter(name, str(path)))

    @router.post("/reload")
    async def reload(request: Request) -> Response:
        req = await parse(request)
        return await run("reload", checked_name(req.name), engine.reload_adapter(req.name))

    @router.post("/unload")
    async def unload(request: Request) -> Response:
        req = await parse(request)
        return await run("unload", checked_name(req.name), engine.unload_adapter(req.name))

    return router
