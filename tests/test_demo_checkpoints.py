"""The bundled demo model (checkpoints/demo-base + checkpoints/demo-adgen, built by
scripts/build_demo.py): layout, sizes, config, model cards, and the adapter's measurable effect
through the server's engine."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

import chatglm

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "checkpoints" / "demo-base"
ADAPTER = ROOT / "checkpoints" / "demo-adgen"
SCRIPTS = ROOT / "scripts"
ROWS = 12
STATE_FILES = {"optimizer.pt", "scheduler.pt", "training_args.bin", "rng_state.pth"}


@pytest.fixture(scope="module")
def scripts():
    """scripts/eval_demo.py and scripts/demo_settings.py, imported as the build imports them."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        import demo_settings
        import eval_demo

        yield eval_demo, demo_settings
    finally:
        sys.path.remove(str(SCRIPTS))


def test_base_folder_is_the_published_layout(scripts):
    _, settings = scripts
    names = {p.name for p in BASE.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json", "README.md"} <= names
    assert not names & STATE_FILES
    config = json.loads((BASE / "config.json").read_text())
    assert config["model_type"] == "chatglm" and config["torch_dtype"] == "float16"
    assert config["multi_query_attention"] and config["add_qkv_bias"]
    for key, value in settings.MODEL.items():  # the folder is what demo_settings.py describes
        assert config[key] == value, key
    tok = chatglm.load_tokenizer(BASE)
    assert tok.vocab_size == tok.sp_vocab_size + 5  # [MASK] [gMASK] [sMASK] sop eop after the SP vocab
    assert config["padded_vocab_size"] % 64 == 0 and 0 <= config["padded_vocab_size"] - tok.vocab_size < 64
    assert tok.encode("你好")[:2] == [tok.gmask_id, tok.sop_id]
    # attribute values are single pieces, the same ids in the attribute list and in running text
    red = tok.encode("红色", add_special_tokens=False)[-1:]
    assert tok.decode(red) == "红色"
    assert red[0] in tok.encode("颜色#红色", add_special_tokens=False)
    assert red[0] in tok.encode("经典的红色百搭耐看", add_special_tokens=False)
    assert (BASE / "model.safetensors").stat().st_size < 12e6  # a few MB (fp16)
    assert sum(p.stat().st_size for p in BASE.iterdir()) < 13e6


def test_adapter_folder_is_a_thudm_checkpoint_of_this_base(scripts):
    _, settings = scripts
    names = {p.name for p in ADAPTER.iterdir()}
    assert {"pytorch_model.bin", "config.json", "tokenizer.model", "ptuning_manifest.json", "README.md",
            "loss_curve.png", "train.log", "eval_metrics.json", "recall.json"} <= names
    assert not names & STATE_FILES
    assert not any(p.is_dir() for p in ADAPTER.iterdir())
    state = torch.load(ADAPTER / "pytorch_model.bin", weights_only=True)
    assert list(state) == ["transformer.prefix_encoder.embedding.weight"]
    manifest = json.loads((ADAPTER / "ptuning_manifest.json").read_text())
    assert manifest["base_model"] == "checkpoints/demo-base"
    assert manifest["base_config_hash"] == hashlib.sha256((BASE / "config.json").read_bytes()).hexdigest()
    assert manifest["quantization_bit"] == 8 and manifest["pre_seq_len"] == state[next(iter(state))].shape[0]
    assert manifest["pre_seq_len"] == settings.PTUNE["pre_seq_len"]
    assert (ADAPTER / "tokenizer.model").read_bytes() == (BASE / "tokenizer.model").read_bytes()
    assert (ADAPTER / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "train_loss" in (ADAPTER / "train.log").read_text(encoding="utf-8")
    metrics = json.loads((ADAPTER / "eval_metrics.json").read_text())
    assert {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l",
            "predict_attribute_recall"} <= set(metrics)
    assert sum(p.stat().st_size for p in ADAPTER.iterdir()) < 1e6


def test_committed_recall_meets_the_acceptance_targets():
    result = json.loads((ADAPTER / "recall.json").read_text())
    assert result["rows"] == 100 and result["decoding"] == "greedy" and result["quantize"] == "int8"
    assert result["through"] == "server.engine.AsyncEngine"
    assert result["adapter_recall"] >= 0.8 and result["base_recall"] <= 0.2
    for card in (BASE / "README.md", ADAPTER / "README.md"):
        text = card.read_text(encoding="utf-8")
        assert f"{result['adapter_recall']:.2f}" in text and f"{result['base_recall']:.2f}" in text
    base_card = (BASE / "README.md").read_text(encoding="utf-8")
    info = json.loads((BASE / "build_info.json").read_text())
    assert f"{info['pretrain']['final_loss']:.2f}" in base_card and f"{info['pretrain']['steps']} steps" in base_card


def test_adapter_effect_is_measurable_on_held_out_rows(scripts):
    """Greedy answers from the server's engine (base int8, adapter loaded by the server's registry)
    on a handful of held-out rows: the adapter writes the attributes into its copy, the base does not."""
    eval_demo, _ = scripts
    from training.gen_data import mean_attribute_recall

    torch.set_num_threads(1)
    engine = eval_demo.make_engine(BASE, ADAPTER, quantize="int8")
    contents = [r["content"] for r in eval_demo.held_out_rows()[:ROWS]]
    base = mean_attribute_recall(eval_demo.engine_answers(engine, "demo-base", contents), contents)
    tuned = mean_attribute_recall(eval_demo.engine_answers(engine, "demo-adgen", contents), contents)
    assert base <= 0.3, base
    assert tuned >= 0.7, tuned
    assert tuned - base >= 0.5
