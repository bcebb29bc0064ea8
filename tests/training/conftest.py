"""Fixtures for the training tests: the THUDM fixture's tokenizer/model folder and generated data."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatglm.tokenizer import ChatGLMTokenizer
from training.gen_data import generate, write_jsonl

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def fixture_model(fixture_dir) -> Path:
    """THUDM's tiny reference model folder (3 layers, hidden 128, vocab 3072, pytorch_model.bin)."""
    return fixture_dir / "model"


@pytest.fixture(scope="session")
def tok(fixture_model) -> ChatGLMTokenizer:
    return ChatGLMTokenizer.from_folder(fixture_model)


@pytest.fixture(scope="session")
def adgen(tmp_path_factory) -> Path:
    """AdvertiseGen/ with train.json (64 rows), dev.json and fval.json (8 rows), as the walkthrough names them."""
    folder = tmp_path_factory.mktemp("data") / "AdvertiseGen"
    folder.mkdir()
    train, dev = generate(64, 8, seed=0)
    write_jsonl(train, folder / "train.json")
    write_jsonl(dev, folder / "dev.json")
    write_jsonl(dev, folder / "fval.json")
    return folder


def subprocess_env() -> dict[str, str]:
    """One intra-op thread per process (the machine has 2 cores), repo importable, no GPU."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_cli(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run a command line with the test interpreter's bin dir first on PATH (for torchrun)."""
    env = subprocess_env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
