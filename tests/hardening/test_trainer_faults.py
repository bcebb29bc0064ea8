"""Trainer faults. kill -9 at three more moments of the second checkpoint save than test_save_safety's
(half-written weights, half-written manifest, and the last instant: complete but not yet renamed into
place; slow tests): only complete checkpoint-N folders are ever visible, the server's discovery never lists the staged
one, and --resume_from_checkpoint from the last good one continues. An output folder that cannot be
written, or whose disk is too full for a checkpoint, is one clear error before any training step."""
from __future__ import annotations

import errno
import os
import runpy
import signal
import subprocess
import sys
import textwrap
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from chatglm.config import ChatGLMConfig
from server.adapter_files import discover, load_version
from tests.training.conftest import adgen, fixture_model, subprocess_env  # noqa: F401 - fixtures
from tests.training.test_resume import args
from tests.training.test_save_safety import is_complete
from training import preflight
from training.run import main

# Stalls at KILL_POINT during the save of step 2 (after writing `marker`), until killed.
STALLING_RUN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import training.trainer as t
    from training.manifest import PTuningManifest
    point, marker = sys.argv[1], Path(sys.argv[2])
    def stall(where):
        marker.write_text(str(where))
        time.sleep(600)
    if point == "publish":
        real_publish = t.publish
        def publish(staged, final):
            if staged.name == "checkpoint-2":
                stall(staged)
            real_publish(staged, final)
        t.publish = publish
    elif point == "weights":
        real_save = t.save_prefix
        def save_prefix(encoder, folder, config):
            real_save(encoder, folder, config)
            if Path(folder).name == "checkpoint-2":
                w = Path(folder) / "pytorch_model.bin"
                w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
                stall(folder)
        t.save_prefix = save_prefix
    elif point == "manifest":
        real_write = PTuningManifest.write
        def write(self, folder):
            if Path(folder).name == "checkpoint-2":
                (Path(folder) / "ptuning_manifest.json").write_text('{"base_model": "x", ')
                stall(folder)
            real_write(self, folder)
        PTuningManifest.write = write
    from training.run import main
    main(sys.argv[3:])
""")


def run_until_stalled(point: str, fixture_model, adgen, out: Path, marker: Path) -> Path:
    cmd = [sys.executable, "-c", STALLING_RUN, point, str(marker),
           *args(fixture_model, adgen, out, 4, "--pre_seq_len", "4", "--save_steps", "1")]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() or not marker.read_text():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "training never reached the second save"
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return Path(marker.read_text())


def check_killed_run(point, fixture_model, adgen, tmp_path):
    out, marker = tmp_path / "runs" / "adgen", tmp_path / "stalled"
    staged = run_until_stalled(point, fixture_model, adgen, out, marker)
    assert staged == out / ".staging" / "checkpoint-2"
    config = ChatGLMConfig.from_json(fixture_model)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-1"]
    assert is_complete(out / "checkpoint-1", config)
    assert (point == "publish") == is_complete(staged, config)  # at "publish" it is whole, but not in place
    found = discover(tmp_path / "runs")  # what a server pointed at the runs folder would list
    assert found == {"adgen": out / "checkpoint-1", "adgen/checkpoint-1": out / "checkpoint-1"}
    assert discover(out) == {"checkpoint-1": out / "checkpoint-1"}  # --checkpoints pointed at the run itself
    v = load_version(out / "checkpoint-1", config, 1, "adgen", dtype=torch.float32, device="cpu", max_prefix_len=8)
    assert v.pre_seq_len == 4
    main(args(fixture_model, adgen, out, 3, "--pre_seq_len", "4", "--save_steps", "1",
              "--resume_from_checkpoint", str(out / "checkpoint-1")))
    assert all(is_complete(out / f"checkpoint-{n}", config) for n in (1, 2, 3))
    assert not staged.exists() and set(discover(tmp_path / "runs")) == {
        "adgen", "adgen/checkpoint-1", "adgen/checkpoint-2", "adgen/checkpoint-3"}


@pytest.mark.slow  # ~25 s each; test_save_safety kills one save point in the default suite
@pytest.mark.parametrize("point", ["publish", "weights", "manifest"])
def test_kill_during_the_save_and_resume(point, fixture_model, adgen, tmp_path):
    check_killed_run(point, fixture_model, adgen, tmp_path)


# ---- the output folder --------------------------------------------------------------------------
@pytest.fixture
def immutable_dir(tmp_path):
    """An existing folder nobody, root included, can create files in (chattr +i; chmod for non-root)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
    yield folder
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o755)


def test_unwritable_existing_folder(immutable_dir):
    with pytest.raises(preflight.OutputDirError, match="is not writable"):
        preflight.check_writable(immutable_dir)
    with pytest.raises(preflight.OutputDirError, match="is not writable"):
        preflight.check_writable(immutable_dir / "sub")


def test_output_dir_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(preflight.OutputDirError, match="NotADirectoryError"):
        preflight.check_writable(tmp_path / "file" / "out")
    preflight.check_writable(tmp_path / "fresh" / "out")  # creatable: fine, and no probe left behind
    assert list((tmp_path / "fresh" / "out").iterdir()) == []


def test_full_disk(tmp_path, monkeypatch):
    real_open = Path.open

    def full(self, *a, **kw):
        if self.name == preflight.PROBE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(self, *a, **kw)

    monkeypatch.setattr(Path, "open", full)
    with pytest.raises(preflight.OutputDirError, match="disk is full"):
        preflight.check_writable(tmp_path)


def test_too_little_free_space_for_a_checkpoint(tmp_path, monkeypatch, fixture_model):
    model = torch.nn.Linear(1000, 1000)  # 4 MB of trainable fp32: about 12.5 MiB per checkpoint
    need = preflight.checkpoint_bytes(model, fixture_model)
    assert need == 3 * 4 * 1001000 + (fixture_model / "tokenizer.model").stat().st_size + preflight.SMALL_FILES
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(100 * 2**20, 90 * 2**20, 10 * 2**20))
    with pytest.raises(preflight.OutputDirError, match=r"10\.0 MiB free .* needs about 12\.5 MiB"):
        preflight.check_free_space(tmp_path, need)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(100 * 2**20, 60 * 2**20, 40 * 2**20))
    preflight.check_free_space(tmp_path, need)


# ---- python -m training.run: the checks run before the model is loaded / before the first step ------------
@pytest.mark.filterwarnings("ignore:'training.run' found in sys.modules")
def test_cli_unwritable_output_dir_is_one_line_before_loading(immutable_dir, fixture_model, adgen, monkeypatch):
    def no_model(*a, **kw):
        raise AssertionError("the model was loaded for a run that cannot save")

    monkeypatch.setattr("training.run.build_model", no_model)
    argv = args(fixture_model, adgen, immutable_dir, 2, "--pre_seq_len", "4")
    monkeypatch.setattr(sys, "argv", ["training.run", *argv])
    with pytest.raises(SystemExit) as e:  # `python -m training.run ...`, in this process
        runpy.run_module("training.run", run_name="__main__", alter_sys=False)
    assert str(e.value.code).startswith(f"error: --output_dir {immutable_dir} is not writable: ")
    assert "\n" not in str(e.value.code) and list(immutable_dir.iterdir()) == []


def test_full_disk_stops_the_run_before_the_first_step(fixture_model, adgen, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(2**30, 2**30 - 2**19, 2**19))  # 0.5 MiB
    out = tmp_path / "out"
    with pytest.raises(preflight.OutputDirError, match=r"0\.5 MiB free on its disk, but a checkpoint"):
        main(args(fixture_model, adgen, out, 2, "--pre_seq_len", "4"))
    assert not any(out.glob("checkpoint-*")) and not (out / "trainer_state.json").exists()
