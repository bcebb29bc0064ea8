"""`python -m server`: parse settings, check the model folder, serve with uvicorn while the engine loads
in the background (/health is 503 until it is ready). SIGTERM drains in-flight requests."""
from __future__ import annotations

import logging
import signal
import sys
import uvicorn

from .app import ServerState, build_app
from .auto_quantize import choose_quantize, quantization_shown
from .deferred import DeferredEngine
from .engine_config import EngineConfig
from .middleware import RequestIdFilter
from .settings import DEMO_MODEL, DType, Quantize, ServerSettings, parse_settings

log = logging.getLogger("server")


class DrainingServer(uvicorn.Server):
    """uvicorn, but the engine starts draining the moment shutdown begins, not after connections close."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state

    async def shutdown(self, sockets=None) -> None:
        self.state.begin_drain()
        await super().shutdown(sockets)


def configure_logging(settings: ServerSettings) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    logging.basicConfig(level=settings.log_level.value.upper(), handlers=[handler], force=True)


def model_problem(settings: ServerSettings) -> str | None:
    path = settings.model_path
    if (path / "config.json").is_file():
        return None
    if settings.model is None:
        return (f"no --model given and the bundled demo model is not at {DEMO_MODEL}. Pass --model PATH (a ChatGLM2 "
                "folder with config.json, weights and tokenizer.model) or create the demo model first.")
    return f"--model {path}: not a ChatGLM2 model folder (no config.json there)"


def quantize_at_load(settings: ServerSettings) -> str | None:
    """What load_model gets: int8/int4, or None (as stored); `auto` is decided here, once, and logged."""
    if settings.quantize is not Quantize.AUTO:
        return None if settings.quantize is Quantize.NONE else settings.quantize.value
    choice = choose_quantize(settings.model_path, settings.checkpoints, settings.adapters)
    log.info("--quantize auto: %s (%s)", choice.quantize or "as stored", choice.reason)
    return choice.quantize


def make_engine(settings: ServerSettings, quantize: str | None) -> DeferredEngine:
    import torch

    from .engine import AsyncEngine

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = None if settings.dtype is DType.AUTO else settings.dtype.value
    limits = settings.engine_limits()
    adapters = {name: str(path) for name, path in settings.adapters.items()}

    def build():
        return AsyncEngine.from_paths(settings.model_path, quantize=quantize, dtype=dtype, device=device,
                                      checkpoints_dir=settings.checkpoints, adapters=adapters,
                                      base_model_id=settings.base_model_id, **limits)

    max_len = limits.get("max_model_len", EngineConfig.max_model_len)
    return DeferredEngine(build, settings.base_model_id, max_len)


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    configure_logging(settings)
    problem = model_problem(settings)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if settings.torch_threads is not None:
        import torch

        torch.set_num_threads(settings.torch_threads)
    quantize = quantize_at_load(settings)
    engine = make_engine(settings, quantize)
    app = build_app(engine, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, lifespan="on",
                            timeout_graceful_shutdown=settings.drain_timeout)
    server = DrainingServer(config, app.state.server)
    app.state.server.on_fatal = lambda: setattr(server, "should_exit", True)
    log.info("listening on http://%s:%d; base %s (quantization %s, dtype %s, device %s); auth %s; checkpoints %s",
             settings.host, settings.port, settings.model_path, quantization_shown(quantize, settings.model_path),
             settings.dtype.value,
             settings.device, f"{len(settings.api_keys)} key(s)" if settings.api_keys else "off",
             settings.checkpoints)
    for name, path in settings.adapters.items():
        log.info("adapter %s requested from %s", name, path)
    # uvicorn re-raises the SIGTERM it handled once it has drained; with this handler in place that
    # re-raise is a no-op, so a clean drain exits 0 instead of dying by the signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: setattr(server, "should_exit", True))
    server.run()
    return 1 if app.state.server.start_error is not None else 0


if __name__ == "__main__":
    sys.exit(main())
