"""Shared test fixtures: the THUDM reference fixture folder and torch thread settings."""
import json
import logging
import os
from pathlib import Path

import pytest
import torch

# Server and client share 2 cores in tests: one intra-op thread per process (cpu-performance.md §6).
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE_DIR = Path(os.environ.get("CHATGLM_FIXTURE", REPO_ROOT.parent / "shared" / "fixtures" / "chatglm2-tiny"))


def _require_fixture() -> Path:
    if not (FIXTURE_DIR / "expected.json").is_file():
        pytest.fail(f"reference fixture not found at {FIXTURE_DIR} (set CHATGLM_FIXTURE)", pytrace=False)
    return FIXTURE_DIR


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return _require_fixture()


@pytest.fixture(scope="session")
def expected(fixture_dir) -> dict:
    return json.loads((fixture_dir / "expected.json").read_text())


@pytest.fixture(scope="session")
def expected_tensors(fixture_dir) -> dict:
    return torch.load(fixture_dir / "expected.pt", weights_only=True)


def _writes_to_closed_stream(handler: logging.Handler) -> bool:
    return bool(getattr(getattr(handler, "stream", None), "closed", False))


@pytest.fixture(autouse=True)
def _logging_left_usable():
    """Code under test configures logging (server.__main__, training.logs, uvicorn) with handlers on the
    streams of the moment, which under capsys are closed when the test ends. A server thread that outlives
    the test would then fail inside `log.info` (logging's error report itself hits a closed sys.stderr).
    Put the root level back and drop every handler whose stream is closed."""
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)
    loggers = [root, *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    for logger in loggers:
        for handler in [h for h in logger.handlers if _writes_to_closed_stream(h)]:
            logger.removeHandler(handler)
