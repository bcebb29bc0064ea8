"""Resume: 2N steps in one go equal N steps, stop, then --resume_from_checkpoint for N more.
Full fine-tuning (no --pre_seq_len) writes a model folder chatglm.load_model reads, and resumes too."""
import json
import shlex

import torch

from chatglm.checkpoint import load_model
from training.run import main

N = 2


def args(model, data, out, steps, *extra):
    return shlex.split(
        f"--do_train --train_file {data / 'train.json'} --prompt_column content --response_column summary "
        f"--model_name_or_path {model} --output_dir {out} --max_source_length 24 --max_target_length 16 "
        f"--per_device_train_batch_size 4 --max_steps {steps} --save_steps {N} --logging_steps 1 "
        f"--lr_scheduler_type constant --disable_tqdm 1 --report_to none") + list(extra)


def losses(out):
    state = json.loads((out / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def prefix(ckpt):
    return torch.load(ckpt / "pytorch_model.bin", weights_only=True)["transformer.prefix_encoder.embedding.weight"]


def test_resume_equals_one_go(fixture_model, adgen, tmp_path):
    ptuning = ("--pre_seq_len", "4", "--learning_rate", "2e-2")
    main(args(fixture_model, adgen, tmp_path / "once", 2 * N, *ptuning))
    main(args(fixture_model, adgen, tmp_path / "split", N, *ptuning))
    resumed = main(args(fixture_model, adgen, tmp_path / "split", 2 * N, *ptuning,
                        "--resume_from_checkpoint", str(tmp_path / "split" / f"checkpoint-{N}")))
    once, split = losses(tmp_path / "once"), losses(tmp_path / "split")
    assert len(once) == len(split) == 2 * N
    torch.testing.assert_close(torch.tensor(split), torch.tensor(once), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(prefix(tmp_path / "split" / f"checkpoint-{2 * N}"),
                               prefix(tmp_path / "once" / f"checkpoint-{2 * N}"), rtol=1e-5, atol=1e-6)
    assert resumed["epoch"] > 0


def test_full_finetune_checkpoint_is_a_model_folder(fixture_model, adgen, tmp_path):
    out = tmp_path / "ft"
    main(args(fixture_model, adgen, out, N, "--learning_rate", "1e-3"))
    ckpt = out / f"checkpoint-{N}"
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.model",
            "optimizer.pt", "ptuning_manifest.json"} <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "ptuning_manifest.json").read_text())["pre_seq_len"] is None
    base, tuned = load_model(fixture_model), load_model(ckpt)
    changed = [n for (n, a), (_, b) in zip(base.state_dict().items(), tuned.state_dict().items()) if not torch.equal(a, b)]
    assert len(changed) == len(base.state_dict())  # every weight trained
    main(args(fixture_model, adgen, out, 2 * N, "--learning_rate", "1e-3", "--resume_from_checkpoint", str(ckpt)))
    assert len(losses(out)) == 2 * N and (out / f"checkpoint-{2 * N}" / "model.safetensors").is_file()
