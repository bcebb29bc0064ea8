"""`torchrun --nproc-per-node=2` on CPU (gloo DDP) matches one process with the same total batch;
only rank 0 writes checkpoint files (each rank adds its own rng state)."""
import json
import shlex

import torch

from tests.training.conftest import run_cli
from training.run import main

STEPS = 4


def common(model, data, out):
    return (f"--do_train --train_file {data / 'train.json'} --prompt_column content --response_column summary "
            f"--model_name_or_path {model} --output_dir {out} --max_source_length 24 --max_target_length 16 "
            f"--per_device_train_batch_size 2 --max_steps {STEPS} --save_steps {STEPS} --logging_steps 1 "
            "--learning_rate 2e-2 --pre_seq_len 4 --disable_tqdm 1 --report_to none")


def failure_report(out: str) -> str:
    """What the ranks said, without torchrun's own launcher traceback (which fills the tail)."""
    launcher = out.find("Traceback (most recent call last)")
    own = out[:launcher] if launcher > 0 else out
    clues = [line for line in own.splitlines()
             if any(w in line for w in ("rror", "terminate", "what()", "bort", "Signal", "[rank", "WARNING"))]
    return "\n".join(clues[-40:]) + "\n----- tail -----\n" + own[-3000:]


def test_two_processes_match_one_with_the_same_total_batch(fixture_model, adgen, tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    proc = run_cli(["torchrun", "--standalone", "--nnodes=1", "--nproc-per-node=2", "-m", "training.run",
                    *shlex.split(common(fixture_model, adgen, ddp))], cwd=tmp_path, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, failure_report(out)
    assert "Total train batch size (w. parallel, distributed & accumulation) = 4" in out
    assert out.count("***** train metrics *****") == 1  # printed by rank 0 only
    main(shlex.split(common(fixture_model, adgen, single)) + ["--gradient_accumulation_steps", "2"])

    ckpt = ddp / f"checkpoint-{STEPS}"
    names = {p.name for p in ckpt.iterdir()}
    assert {"rng_state_0.pth", "rng_state_1.pth", "pytorch_model.bin", "ptuning_manifest.json"} <= names
    assert "rng_state.pth" not in names

    def losses(folder):
        return torch.tensor([e["loss"] for e in json.loads((folder / "trainer_state.json").read_text())["log_history"]
                             if "loss" in e])

    # same rows per optimizer step; only the prefix-dropout masks of rank 1's half-batch differ
    torch.testing.assert_close(losses(ddp), losses(single), rtol=0.02, atol=0.0)
