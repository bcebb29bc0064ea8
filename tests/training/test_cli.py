"""The issue's train.sh line, unchanged except `-m training.run`, a local model and a small --max_steps,
on THUDM's tiny fixture model: printout, loss lines, checkpoint layout, and loading it back."""
import json
import re
import shlex

import pytest
import torch

from chatglm.checkpoint import load_model, load_prefix
from chatglm.config import ChatGLMConfig
from chatglm.prefix import PrefixEncoder
from tests.training.conftest import run_cli
from training.manifest import PTuningManifest, config_hash
from training.run import main

TRAIN_SH = """torchrun --standalone --nnodes=1 --nproc-per-node=$NUM_GPUS main.py \\
  --do_train --train_file AdvertiseGen/train.json --validation_file AdvertiseGen/fval.json \\
  --prompt_column content --response_column summary --overwrite_cache \\
  --model_name_or_path THUDM/chatglm-6b --output_dir output/adgen-chatglm-6b-pt-$PRE_SEQ_LEN-$LR \\
  --overwrite_output_dir --max_source_length 64 --max_target_length 128 \\
  --per_device_train_batch_size 1 --per_device_eval_batch_size 1 --gradient_accumulation_steps 16 \\
  --predict_with_generate --max_steps 3000 --logging_steps 10 --save_steps 1000 \\
  --learning_rate $LR --pre_seq_len $PRE_SEQ_LEN --quantization_bit 4"""
PRE_SEQ_LEN, LR, STEPS = 8, "2e-2", 2


@pytest.fixture(scope="module")
def trained(adgen, fixture_model):
    line = (TRAIN_SH.replace("main.py", "-m training.run").replace("THUDM/chatglm-6b", str(fixture_model))
            .replace("--max_steps 3000", f"--max_steps {STEPS}").replace("--logging_steps 10", "--logging_steps 1"))
    script = f"NUM_GPUS=1 PRE_SEQ_LEN={PRE_SEQ_LEN} LR={LR}\n{line}\n"
    proc = run_cli(["bash", "-c", script], cwd=adgen.parent, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return adgen.parent / f"output/adgen-chatglm-6b-pt-{PRE_SEQ_LEN}-{LR}", out


def test_prints_the_walkthrough_block(trained, fixture_model):
    _, out = trained
    kv = ChatGLMConfig.from_json(fixture_model).kv_size
    expected = ["***** Running training *****", "  Num examples = 64", "  Num Epochs = 1",
                "  Instantaneous batch size per device = 1",
                "  Total train batch size (w. parallel, distributed & accumulation) = 16",
                "  Gradient Accumulation steps = 16", f"  Total optimization steps = {STEPS}",
                f"  Number of trainable parameters = {PRE_SEQ_LEN * kv:,}", "Quantized to 4 bit",
                "Saving PrefixEncoder", "***** train metrics *****"]
    for line in expected:
        assert line in out, line
    losses = re.findall(r"\{'loss': ([\d.]+), 'learning_rate': ([\d.e-]+), 'epoch': ([\d.]+)\}", out)
    assert len(losses) == STEPS and float(losses[0][1]) == 2e-2
    metrics = out[out.index("***** train metrics *****"):].splitlines()[1:7]
    assert [m.split("=")[0].strip() for m in metrics] == [
        "epoch", "train_loss", "train_runtime", "train_samples", "train_samples_per_second", "train_steps_per_second"]


def test_checkpoint_layout(trained, fixture_model):
    output, _ = trained
    ckpt = output / f"checkpoint-{STEPS}"
    names = {p.name for p in ckpt.iterdir()}
    assert names == {"pytorch_model.bin", "config.json", "generation_config.json", "tokenizer.model",
                     "tokenizer_config.json", "special_tokens_map.json", "training_args.bin", "optimizer.pt",
                     "scheduler.pt", "rng_state.pth", "trainer_state.json", "ptuning_manifest.json"}
    base = ChatGLMConfig.from_json(fixture_model)
    sd = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    assert list(sd) == ["transformer.prefix_encoder.embedding.weight"]
    emb = sd["transformer.prefix_encoder.embedding.weight"]
    assert emb.dtype == torch.float32 and tuple(emb.shape) == (PRE_SEQ_LEN, base.kv_size)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert (cfg["pre_seq_len"], cfg["prefix_projection"], cfg["quantization_bit"]) == (PRE_SEQ_LEN, False, 4)
    assert cfg["num_layers"] == base.num_layers and cfg["architectures"] == ["ChatGLMForConditionalGeneration"]
    assert json.loads((ckpt / "generation_config.json").read_text())["eos_token_id"] == 2
    assert (ckpt / "tokenizer.model").read_bytes() == (fixture_model / "tokenizer.model").read_bytes()
    assert PTuningManifest.read(ckpt) == PTuningManifest(
        base_model=str(fixture_model), base_config_hash=config_hash(fixture_model), quantization_bit=4,
        source_prefix="", max_source_length=64, max_target_length=128, pre_seq_len=PRE_SEQ_LEN,
        prefix_projection=False, prompt_column="content", response_column="summary", history_column=None)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS and len([e for e in state["log_history"] if "loss" in e]) == STEPS
    for name in ("trainer_state.json", "all_results.json", "train_results.json"):
        assert (output / name).is_file(), name
    assert (output / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (output / ".staging").exists()


def test_web_demo_recipe_and_server_loader_read_the_checkpoint(trained, fixture_model):
    ckpt = trained[0] / f"checkpoint-{STEPS}"
    config = ChatGLMConfig.from_json(fixture_model)
    # ptuning/web_demo.py: torch.load the bin, keep transformer.prefix_encoder.*, strip, load strictly
    sd = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    stripped = {k[len("transformer.prefix_encoder."):]: v for k, v in sd.items() if k.startswith("transformer.prefix_encoder.")}
    encoder = PrefixEncoder(config, PRE_SEQ_LEN, prefix_projection=False)
    encoder.load_state_dict(stripped, strict=True)
    kv = load_prefix(ckpt, config).kv
    assert tuple(kv.shape) == (config.num_layers, 2, PRE_SEQ_LEN, config.num_kv_groups, config.kv_channels)
    base = load_model(fixture_model)
    ids = torch.tensor([[3001, 3003, 382, 2788]])
    with torch.no_grad():
        assert not torch.equal(base(ids, prefix=load_prefix(ckpt, config)), base(ids))


def test_eval_and_predict_from_the_checkpoint(trained, fixture_model, adgen, tmp_path):
    ckpt = trained[0] / f"checkpoint-{STEPS}"
    out = tmp_path / "predict"
    metrics = main(shlex.split(
        f"--do_eval --do_predict --validation_file {adgen / 'dev.json'} --test_file {adgen / 'dev.json'} "
        f"--prompt_column content --response_column summary --model_name_or_path {fixture_model} "
        f"--ptuning_checkpoint {ckpt} --pre_seq_len {PRE_SEQ_LEN} --output_dir {out} --max_source_length 64 "
        "--max_target_length 8 --per_device_eval_batch_size 4 --predict_with_generate --max_eval_samples 4 "
        "--max_predict_samples 4 --disable_tqdm 1"))
    for key in ("eval_bleu-4", "eval_rouge-1", "eval_rouge-2", "eval_rouge-l", "predict_bleu-4", "predict_rouge-l"):
        assert 0.0 <= metrics[key] <= 100.0, key
    lines = [json.loads(x) for x in (out / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 4 and all(set(x) == {"labels", "predict"} for x in lines)
    dev = [json.loads(x) for x in (adgen / "dev.json").read_text(encoding="utf-8").splitlines()]
    assert dev[0]["summary"].startswith(lines[0]["labels"][:3])  # labels: 8 tokens, [gMASK] sop dropped
    for name in ("eval_results.json", "predict_results.json", "all_results.json"):
        assert (out / name).is_file(), name
