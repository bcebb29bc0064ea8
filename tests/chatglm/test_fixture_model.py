"""The model against what THUDM's chatglm2-6b code computes on the reference fixture."""
import pytest
import torch

import chatglm
from chatglm.attention import DenseKVCache
from chatglm.chat import chat, stream_chat
from chatglm.generation import generate
from chatglm.tokenizer import ChatGLMTokenizer

PREFIX_DIRS = ["ptuning-pre8", "ptuning-pre8-proj"]


@pytest.fixture(scope="module")
def model(fixture_dir):
    return chatglm.load_model(fixture_dir / "model")


@pytest.fixture(scope="module")
def tokenizer(fixture_dir):
    return ChatGLMTokenizer.from_folder(fixture_dir / "model")


def _section(expected, name):
    return expected["base"] if name == "base" else expected["ptuning"][name]


def _prefix(model, fixture_dir, name):
    return None if name == "base" else chatglm.load_prefix(fixture_dir / name, model.config)


def _as_batch(x):
    t = torch.tensor(x)
    return t[None] if t.dim() == 1 else t


@pytest.fixture(params=["fused", "eager"])
def small_ops(request, monkeypatch):
    """The C++ small ops (CPU inference) or the eager code CUDA and training run."""
    from chatglm import fused_ops

    if request.param == "eager":
        monkeypatch.setenv("CHATGLM_FUSED", "0")
    fused_ops.fused_available.cache_clear()
    yield request.param
    fused_ops.fused_available.cache_clear()


@pytest.mark.parametrize("name", ["base", *PREFIX_DIRS])
def test_logits_match_reference(model, fixture_dir, expected, expected_tensors, name, small_ops):
    prefix = _prefix(model, fixture_dir, name)
    for case, rec in _section(expected, name)["logits"].items():
        ids = _as_batch(rec["input_ids"])
        mask = _as_batch(rec["attention_mask"]) if "attention_mask" in rec else None
        pos = _as_batch(rec["position_ids"]) if "position_ids" in rec else None
        with torch.no_grad():
            got = model(ids, mask, pos, prefix=prefix)
        ref = expected_tensors[rec["tensor"]].reshape(got.shape)
        valid = _as_batch(rec["valid_positions"]).bool() if "valid_positions" in rec else torch.ones(ids.shape, dtype=torch.bool)
        err = (got - ref)[valid].abs().max().item()
        assert err <= 1e-4, f"{name}/{case}: max |diff| {err}"
        assert got[valid].argmax(-1).tolist() == ref[valid].argmax(-1).tolist()


def test_prefix_kv_matches_get_prompt(model, fixture_dir, expected, expected_tensors):
    for name in PREFIX_DIRS:
        prefix = chatglm.load_prefix(fixture_dir / name, model.config)
        for layer, (kname, vname) in enumerate(expected["ptuning"][name]["prefix_past_key_values"]["tensors"]):
            k, v = prefix.layer(layer)  # [P, G, D]
            assert torch.allclose(k, expected_tensors[kname][:, 0], atol=1e-6), (name, layer)
            assert torch.allclose(v, expected_tensors[vname][:, 0], atol=1e-6), (name, layer)


@pytest.mark.parametrize("name", ["base", *PREFIX_DIRS])
def test_kv_cache_step_equals_full_forward(model, fixture_dir, expected, expected_tensors, name):
    rec = _section(expected, name)["kv_cache_check"]
    prefix = _prefix(model, fixture_dir, name)
    ids = torch.tensor([rec["prompt_ids"]])
    cache = DenseKVCache(model.config.num_layers)
    with torch.no_grad():
        model(ids, prefix=prefix, cache=cache)
        step = model(torch.tensor([[rec["extra_token"]]]), cache=cache)[:, -1]
        full = model(torch.cat([ids, torch.tensor([[rec["extra_token"]]])], 1), prefix=prefix)[:, -1]
    assert cache.length == rec["past_len"] + 1
    assert (step - full).abs().max() <= 1e-4
    ref_step = expected_tensors[rec["step_logits_tensor"]].reshape(step.shape)
    assert (step - ref_step).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["base", *PREFIX_DIRS])
def test_greedy_generation_token_exact(model, fixture_dir, expected, name):
    prefix = _prefix(model, fixture_dir, name)
    for case, g in _section(expected, name)["generate"].items():
        seqs = g["sequences"]
        ids = torch.tensor([s["input_ids"] for s in seqs])
        mask = torch.tensor([s["attention_mask"] for s in seqs])
        pos = torch.tensor([s["position_ids"] for s in seqs])
        got = generate(model, ids, mask, pos, prefix=prefix, max_new_tokens=g["params"]["max_new_tokens"])
        for row, s in zip(got, seqs):
            assert row == s["new_ids"], f"{name}/{case}"


@pytest.mark.parametrize("name", ["base", *PREFIX_DIRS])
def test_chat_answers_identical(model, tokenizer, fixture_dir, expected, name):
    sec = _section(expected, name)
    prefix = _prefix(model, fixture_dir, name)
    for key in ("chat", "chat_no_history"):
        rec = sec[key]
        history = [tuple(h) for h in rec.get("history", [])]
        response, new_history = chat(model, tokenizer, rec["query"], history, prefix=prefix,
                                     do_sample=False, max_new_tokens=20)
        assert response == rec["response"], f"{name}/{key}"
        assert [list(h) for h in new_history] == rec["new_history"]


def test_stream_chat_reuses_past_like_thudm(model, tokenizer, expected):
    history, past = [], None
    for turn in expected["base"]["stream_chat_with_past"]["turns"]:
        outputs = list(stream_chat(model, tokenizer, turn["query"], history, past=past, return_past=True,
                                   do_sample=False, max_new_tokens=20))
        assert all(not r.endswith("\ufffd") for r, _, _ in outputs[:-1])
        response, history, past = outputs[-1]
        assert response == turn["response"]
