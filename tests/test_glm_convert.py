"""bench/glm_convert.py: our ChatGLM2 and the converted transformers GlmForCausalLM give the same logits
(fp32, atol 1e-4), and the converted folder's tokenizer.json gives our tokenizer's ids."""
from __future__ import annotations

import random

import pytest
import torch

import transformers  # noqa: F401  (the [train] extra, installed by `make test`)

from bench.glm_convert import convert_folder, convert_model, convert_state_dict  # noqa: E402
from bench.glm_tokenizer import build_tokenizer, check_same_ids  # noqa: E402
from chatglm.checkpoint import load_model, save_model  # noqa: E402
from chatglm.tokenizer import ChatGLMTokenizer  # noqa: E402
from tests.tiny_model import copy_tokenizer, tiny_config, tiny_model  # noqa: E402

ATOL = 1e-4


def _logits_both(model, ids: torch.Tensor, attn: str) -> tuple[torch.Tensor, torch.Tensor]:
    glm = convert_model(model, torch.float32)
    glm.config._attn_implementation = attn
    with torch.no_grad():
        return model(ids), glm(input_ids=ids).logits


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fixture_logits_equal(fixture_dir, attn):
    model = load_model(fixture_dir / "model", dtype=torch.float32)
    ids = torch.randint(3, model.config.padded_vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    ours, theirs = _logits_both(model, ids, attn)
    assert ours.abs().max() > 0.1  # not trivially equal
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize("overrides", [
    dict(),  # MQA with 2 groups, qkv bias
    dict(multi_query_group_num=1, add_qkv_bias=False, kv_channels=32, num_attention_heads=2, hidden_size=96),
    dict(multi_query_attention=False, num_layers=3, ffn_hidden_size=72),  # plain MHA: G = H
])
def test_random_config_logits_equal(overrides):
    model = tiny_model(tiny_config(**overrides), seed=3)
    ids = torch.randint(0, model.config.padded_vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    ours, theirs = _logits_both(model, ids, "sdpa")
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


def test_decode_with_cache_matches():
    """Token-by-token decode through GLM's cache equals our full forward (positions, rope, GQA)."""
    model = tiny_model(seed=5)
    glm = convert_model(model, torch.float32)
    ids = torch.randint(0, 3000, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids)
        out = glm(input_ids=ids[:, :6], use_cache=True)
        steps = [out.logits]
        cache = out.cache
        for t in range(6, 10):
            out = glm(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True,
                      position_ids=torch.tensor([[t]]))
            cache = out.cache
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), ours, atol=ATOL, rtol=0)


def test_qkv_split_rows():
    cfg = tiny_config()
    model = tiny_model(cfg)
    sd = convert_state_dict(model.state_dict(), cfg)
    fused = model.transformer.encoder.layers[1].self_attention.query_key_value.weight
    H, G, D = cfg.num_attention_heads, cfg.num_kv_groups, cfg.kv_channels
    assert torch.equal(sd["model.layers.1.self_attn.q_proj.weight"], fused[:H * D])
    assert torch.equal(sd["model.layers.1.self_attn.k_proj.weight"], fused[H * D:H * D + G * D])
    assert torch.equal(sd["model.layers.1.self_attn.v_proj.weight"], fused[H * D + G * D:])


def test_tokenizer_json_same_ids(fixture_dir):
    mf = fixture_dir / "model" / "tokenizer.model"
    sp = ChatGLMTokenizer(mf).sp
    rng = random.Random(0)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not sp.is_byte(i)]
    chars = list("abc xyz 0123 你好世界。，！？\n\t  ABC-_=+中文长城é😀Ａ")
    texts = ["", " ", "  a", "hello world", "问：你好\n\n答：", "[Round 1]\n\n问：写一首诗\n\n答：", "2023年 1234.56"]
    texts += ["".join(rng.choice(pieces).replace("▁", " ") for _ in range(rng.randint(1, 12))) for _ in range(300)]
    texts += ["".join(rng.choice(chars) for _ in range(rng.randint(1, 30))) for _ in range(300)]
    assert check_same_ids(mf, texts) == []
    tok = build_tokenizer(mf)
    ours = ChatGLMTokenizer(mf)
    for t in texts[:50]:
        ids = ours.encode(t, add_special_tokens=False)
        assert tok.decode(ids) == ours.decode(ids)


def test_folder_loads_in_transformers(tmp_path, fixture_dir):
    """convert_folder -> AutoModelForCausalLM / AutoTokenizer: same ids and (fp32) logits as ours."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tmp_path / "chatglm"
    model = tiny_model(seed=7)
    save_model(model, src)
    copy_tokenizer(fixture_dir, src)
    dst = convert_folder(src, tmp_path / "glm", dtype=torch.float32)
    glm = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(dst)
    text = "问：小明介绍了长城 hello 2023\n\n答："
    ids = tok(text)["input_ids"]
    assert ids == ChatGLMTokenizer.from_folder(src).encode(text)
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(glm(input_ids=x).logits, model(x), atol=ATOL, rtol=0)
