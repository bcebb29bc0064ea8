"""Loading and saving base folders and P-Tuning v2 checkpoints in THUDM's layouts."""
import json
import shutil

import pytest
import torch

import chatglm
from chatglm.checkpoint import CheckpointError, save_prefix
from tests.tiny_model import tiny_config, tiny_model, tiny_prefix_encoder

IDS = torch.tensor([[5, 17, 300, 42, 9]])


@pytest.mark.parametrize("layout", [dict(safetensors=True), dict(safetensors=False),
                                    dict(safetensors=True, max_shard_bytes=40_000),
                                    dict(safetensors=False, max_shard_bytes=40_000)])
def test_base_folder_layouts_round_trip(tmp_path, layout):
    model = tiny_model()
    chatglm.save_model(model, tmp_path, **layout)
    if layout.get("max_shard_bytes"):
        index = json.loads(next(tmp_path.glob("*.index.json")).read_text())
        assert len(set(index["weight_map"].values())) > 1
    loaded = chatglm.load_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(IDS), model(IDS))
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(a, b)


def test_dtype_on_load(tmp_path):
    chatglm.save_model(tiny_model(), tmp_path)
    assert chatglm.load_model(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_half_vocab_weights_keep_a_half_checkpoint_exact(tmp_path):
    model = tiny_model().to(torch.float16)
    chatglm.save_model(model, tmp_path)
    full = chatglm.load_model(tmp_path, dtype=torch.float32)
    half = chatglm.load_model(tmp_path, dtype=torch.float32, half_vocab_weights=True)
    embedding, output = half.transformer.embedding.word_embeddings.weight, half.transformer.output_layer.weight
    assert embedding.dtype == output.dtype == torch.float16 and half.dtype == torch.float32
    assert torch.equal(output.float(), full.transformer.output_layer.weight)
    assert torch.equal(embedding.float(), full.transformer.embedding.word_embeddings.weight)
    with torch.no_grad():
        logits = half(IDS)
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, full(IDS), rtol=1e-5, atol=1e-5)
        hidden = torch.randn(1, 1, full.config.hidden_size)
        assert torch.equal(half.compute_logits(hidden), full.compute_logits(hidden))  # decode: same bits
    chatglm.save_model(tiny_model(), tmp_path / "fp32")  # nothing to keep: an fp32 file loads as fp32
    kept = chatglm.load_model(tmp_path / "fp32", half_vocab_weights=True)
    assert kept.transformer.output_layer.weight.dtype == kept.transformer.embedding.word_embeddings.weight.dtype
    assert kept.dtype == torch.float32


def test_py_files_are_ignored(tmp_path):
    chatglm.save_model(tiny_model(), tmp_path)
    (tmp_path / "modeling_chatglm.py").write_text("raise SystemExit('executed!')\n")
    chatglm.load_model(tmp_path)


def test_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        chatglm.load_model(tmp_path / "nope")
    tmp_path.joinpath("a").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        chatglm.load_model(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="not a ChatGLM2 config"):
        chatglm.load_model(tmp_path / "a")
    chatglm.save_model(tiny_model(), tmp_path / "b")
    with pytest.raises(CheckpointError, match="no weights"):
        (tmp_path / "b" / "model.safetensors").unlink()
        chatglm.load_model(tmp_path / "b")
    chatglm.save_model(tiny_model(), tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["ffn_hidden_size"] = 80
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatch for .*mlp\.dense_.*checkpoint has \[.*config.json implies"):
        chatglm.load_model(tmp_path / "c")


def test_unknown_config_keys_are_kept():
    cfg = chatglm.ChatGLMConfig.from_dict({**tiny_config().to_dict(), "brand_new_field": 3})
    assert cfg.extra["brand_new_field"] == 3 and cfg.to_dict()["brand_new_field"] == 3


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_checkpoint_round_trip_bit_exact(tmp_path, projection):
    cfg = tiny_config()
    enc = tiny_prefix_encoder(cfg, 6, projection)
    save_prefix(enc, tmp_path, cfg)
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    expected_keys = {"transformer.prefix_encoder.embedding.weight"}
    if projection:
        expected_keys |= {f"transformer.prefix_encoder.trans.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
        assert list(sd["transformer.prefix_encoder.trans.0.weight"].shape) == [cfg.hidden_size, cfg.kv_size]
        assert list(sd["transformer.prefix_encoder.trans.2.weight"].shape) == [cfg.kv_size, cfg.hidden_size]
    assert set(sd) == expected_keys
    assert list(sd["transformer.prefix_encoder.embedding.weight"].shape) == [6, cfg.kv_size]
    saved_cfg = json.loads((tmp_path / "config.json").read_text())
    assert saved_cfg["pre_seq_len"] == 6 and saved_cfg["prefix_projection"] is projection
    again = chatglm.load_prefix_encoder(tmp_path, cfg)
    for (n, a), (m, b) in zip(enc.state_dict().items(), again.state_dict().items()):
        assert n == m and torch.equal(a, b)
    assert torch.equal(chatglm.load_prefix(tmp_path, cfg).kv, chatglm.PrefixKV.from_encoder(enc, cfg).kv.detach())


def test_prefix_that_does_not_fit_says_expected_vs_found(tmp_path, fixture_dir):
    cfg = tiny_config()  # 2 layers; the fixture's prefixes were trained for 3
    with pytest.raises(CheckpointError, match="num_layers expected 2, found 3"):
        chatglm.load_prefix(fixture_dir / "ptuning-pre8", cfg)
    shutil.copytree(fixture_dir / "ptuning-pre8", tmp_path / "p")
    (tmp_path / "p" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"prefix width 384 does not fit the base: expected .* = 128"):
        chatglm.load_prefix(tmp_path / "p", cfg)
    (tmp_path / "p" / "pytorch_model.bin").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        chatglm.load_prefix(tmp_path / "p", cfg)
