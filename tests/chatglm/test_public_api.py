"""The names other code and users' scripts rely on."""
import torch

import chatglm


def test_public_api_round_trip(fixture_dir, expected):
    tok = chatglm.load_tokenizer(fixture_dir / "model")
    model = chatglm.load_model(fixture_dir / "model", dtype=torch.float32, device="cpu")
    prefix = chatglm.load_prefix(fixture_dir / "ptuning-pre8", model.config)
    case = expected["tokenizer"]["cases"][0]
    assert tok.encode(case["text"]) == case["ids"]
    assert tok.decode(tok.encode("你好")) == "你好"
    ids = torch.tensor([tok.build_chat_input("你好")])
    assert model(ids, prefix=prefix).shape == (1, ids.shape[1], model.config.padded_vocab_size)
    rec = expected["ptuning"]["ptuning-pre8"]["chat_no_history"]
    response, history = chatglm.chat(model, tok, rec["query"], prefix=prefix, do_sample=False, max_new_tokens=20)
    assert response == rec["response"] and history == [(rec["query"], rec["response"])]
    grown = [r for r, _ in chatglm.stream_chat(model, tok, rec["query"], prefix=prefix, do_sample=False, max_new_tokens=20)]
    assert grown[-1] == rec["response"] and all(rec["response"].startswith(g) or g == rec["response"] for g in grown)
    # sampling with a seeded generator is reproducible
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert chatglm.chat(model, tok, "你好", generator=g1, max_new_tokens=10) == chatglm.chat(model, tok, "你好", generator=g2, max_new_tokens=10)
