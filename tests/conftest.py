"""Shared test fixtures: the THUDM reference fixture folder and torch thread settings."""
import json
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
        pytest.skip(f"reference fixture not found at {FIXTURE_DIR} (set CHATGLM_FIXTURE)")
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
