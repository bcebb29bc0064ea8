"""kill -9 in the middle of writing checkpoint-2 leaves no checkpoint-2 at all: only complete folders
appear under output_dir, and the run resumes from the last complete one."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import torch
from transformers.trainer_utils import get_last_checkpoint

from chatglm.checkpoint import load_prefix
from chatglm.config import ChatGLMConfig
from tests.training.conftest import subprocess_env
from tests.training.test_resume import args
from training.manifest import PTuningManifest
from training.run import main

# Runs training.run with the rng-state write of step 2 (half way through the checkpoint: weights,
# optimizer and scheduler already written, trainer state and manifest not yet) stalled until killed.
STALLING_RUN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from training.trainer import PrefixTrainer
    original = PrefixTrainer._save_rng_state
    def stalling(self, output_dir):
        if self.state.global_step == 2:
            Path(sys.argv[1]).write_text(output_dir)
            time.sleep(600)
        original(self, output_dir)
    PrefixTrainer._save_rng_state = stalling
    from training.run import main
    main(sys.argv[2:])
""")


def is_complete(folder, config) -> bool:
    try:
        PTuningManifest.read(folder)
        load_prefix(folder, config)
        torch.load(folder / "optimizer.pt", weights_only=True)
        return (folder / "trainer_state.json").is_file() and (folder / "rng_state.pth").is_file()
    except (OSError, ValueError, RuntimeError):
        return False


def test_kill_during_save_leaves_no_incomplete_checkpoint(fixture_model, adgen, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "stalled"
    cmd = [sys.executable, "-c", STALLING_RUN, str(marker),
           *args(fixture_model, adgen, out, 4, "--pre_seq_len", "4", "--save_steps", "1")]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "training never reached the second save"
            time.sleep(0.2)
        staged = marker.read_text()
        assert staged.endswith("checkpoint-2") and ".staging" in staged
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    config = ChatGLMConfig.from_json(fixture_model)
    visible = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert visible == ["checkpoint-1"]
    assert is_complete(out / "checkpoint-1", config)
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-1")
    partial = out / ".staging" / "checkpoint-2"
    assert (partial / "pytorch_model.bin").is_file() and not is_complete(partial, config)

    # the same command resumes from the last complete checkpoint and cleans the leftovers
    main(args(fixture_model, adgen, out, 3, "--pre_seq_len", "4", "--save_steps", "1",
              "--resume_from_checkpoint", str(out / "checkpoint-1")))
    assert all(is_complete(out / f"checkpoint-{n}", config) for n in (1, 2, 3))
    assert not partial.exists()
