"""`python -m server` as a real subprocess on 127.0.0.1 and a free port, for end-to-end tests (web page, README)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import REPO_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    port: int
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"server exited {proc.returncode}:\n{log.read_text(errors='replace')}"
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"server not healthy after {timeout} s:\n{log.read_text(errors='replace')}"
        time.sleep(0.25)


@contextmanager
def live_server(args: Sequence[str], log: Path, *, command: Sequence[str] | None = None, port: int | None = None,
                env: dict[str, str] | None = None, cwd: Path = REPO_ROOT) -> Iterator[LiveServer]:
    """Start `python -m server ARGS --port P` (or `command`, which must listen on `port`), wait for /health, and
    stop it with SIGTERM afterwards."""
    port = port or free_port()
    cmd = list(command) if command is not None else [sys.executable, "-m", "server", *args, "--port", str(port)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log)
        yield LiveServer(url, port, proc, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the session: `make serve` runs python under make
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
