"""ChatGLM2 tokenizer against the THUDM reference fixture (expected.json `tokenizer` section)."""
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatglm.tokenizer import (
    ChatGLMTokenizer,
    IncrementalDetokenizer,
    build_chat_prompt,
    process_response,
)


@pytest.fixture(scope="module")
def tok(fixture_dir) -> ChatGLMTokenizer:
    return ChatGLMTokenizer.from_folder(fixture_dir / "model")


@pytest.fixture(scope="module")
def ref(expected) -> dict:
    return expected["tokenizer"]


def _generate_records(expected):
    sections = [expected["base"]] + list(expected.get("ptuning", {}).values())
    for section in sections:
        for name, run in section.get("generate", {}).items():
            for seq in run["sequences"]:
                yield name, seq


def test_vocabulary_and_special_ids(tok, ref):
    assert tok.sp_vocab_size == ref["sp_vocab_size"] == 3000
    assert tok.vocab_size == ref["vocab_size"]
    specials = ref["special_ids"]
    assert [tok.mask_id, tok.gmask_id, tok.smask_id, tok.sop_id, tok.eop_id] == [
        specials[n] for n in ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")]
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (specials["<pad>"], specials["<bos>"], specials["<eos>"])
    assert tok.pad_id == ref["pad_token_id"] and tok.eos_id == ref["eos_token_id"]
    assert tok.special_ids == frozenset({0, 1, 2, 3000, 3001, 3002, 3003, 3004})
    assert tok.encode("")[:2] == ref["prefix_tokens"]


@pytest.mark.parametrize("index", range(14))
def test_reference_case(tok, ref, index):
    case = ref["cases"][index]
    text = case["text"]
    assert tok.encode(text) == case["ids"], case["name"]
    assert tok.encode(text, add_special_tokens=False) == case["ids_no_special"]
    assert tok.sp.encode(text) == case["sp_raw_ids"]
    assert tok.tokenize(text) == case["tokens"]
    assert tok(text) == case["call_output"]
    assert tok.decode(case["ids"]) == case["decode_ids"]
    assert tok.decode(case["ids"]) == case["decode_ids_skip_special"]
    assert tok.decode(case["ids_no_special"]) == case["decode_ids_no_special"]
    assert tok.convert_ids_to_tokens(case["ids"]) == case["convert_ids_to_tokens"]


def test_all_cases_covered(ref):
    assert len(ref["cases"]) == 14


def test_decode_probes(tok, ref):
    assert ref["decode_probes"]
    for probe in ref["decode_probes"]:
        assert tok.decode(probe["ids"]) == probe["text"]
        assert tok.convert_ids_to_tokens(probe["ids"]) == probe["tokens"]


def test_decode_details(tok):
    assert tok.convert_ids_to_tokens(-1) == "" and tok.convert_ids_to_tokens(13) == "<0x0A>"
    assert tok.decode([-1, 3001, 3050]) == ""  # negative and padding-row ids are empty too
    ni, hao = tok.encode("你好", add_special_tokens=False)
    emoji = tok.encode("👋", add_special_tokens=False)[1:]  # drop the dummy "▁"
    assert len(emoji) == 4
    assert tok.decode([ni, hao, *emoji[:2]]) == "你好\ufffd\ufffd"  # one U+FFFD per byte
    assert tok.decode([231, 192, 163]) == "你"  # the byte pieces of 你 (E4 BD A0)
    assert tok.decode([231, 3001, 192, 163]) == "\ufffd" * 3  # a special splits the byte run
    assert tok.convert_ids_to_tokens(torch.tensor(13)) == "<0x0A>"
    hello = tok.encode("Hello", add_special_tokens=False)
    space = tok.encode("\n", add_special_tokens=False)[0]  # the lone dummy "▁"
    assert tok.convert_ids_to_tokens(space) == "▁"
    assert tok.decode(hello) == "Hello"
    assert tok.decode([space, *hello]) == " Hello"  # only the very first "▁" is dropped
    assert tok.decode([3001, 3003, *hello]) == "Hello"  # specials do not count as text
    assert tok.decode(torch.tensor(hello)) == "Hello"


def test_chat_prompt(tok, ref):
    chat = ref["chat_prompt"]
    history = [tuple(h) for h in chat["history"]]
    assert build_chat_prompt(chat["query"], history) == chat["prompt"]
    assert build_chat_prompt(chat["query"], chat["history"]) == chat["prompt"]  # JSON lists work too
    assert build_chat_prompt(chat["query"]) == chat["prompt_no_history"]
    assert build_chat_prompt(chat["query"], []) == chat["prompt_no_history"]
    assert tok.build_chat_input(chat["query"], history) == chat["input_ids"]
    out = tok(chat["prompt"])
    assert out == {k: chat[k] for k in ("input_ids", "attention_mask", "position_ids")}


def test_batch_left_padding(tok, ref):
    batch = ref["batch_padding"]
    assert tok(batch["texts"], padding=True) == batch["longest"]
    assert tok(batch["texts"], padding="longest") == batch["longest"]
    assert tok(batch["texts"], padding="max_length", max_length=24) == batch["max_length_24"]
    tensors = tok(batch["texts"], padding=True, return_tensors="pt")
    padded = tok.pad([tok.encode(t) for t in batch["texts"]])
    padded24 = tok.pad([tok.encode(t) for t in batch["texts"]], max_length=24)
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert tensors[key].dtype == torch.long
        assert tensors[key].tolist() == batch["longest"][key]
        assert padded[key].dtype == torch.long and padded[key].tolist() == batch["longest"][key]
        assert padded24[key].tolist() == batch["max_length_24"][key]


def test_call_variants(tok):
    unpadded = tok(["你好", "Hello world"])
    assert unpadded["input_ids"] == [tok.encode("你好"), tok.encode("Hello world")]
    assert unpadded["position_ids"][1] == list(range(len(tok.encode("Hello world"))))
    single = tok("你好", return_tensors="pt")
    assert single["input_ids"].shape == (1, 4) and single["position_ids"].tolist() == [[0, 1, 2, 3]]
    assert tok("你好", add_special_tokens=False)["input_ids"] == tok.encode("你好", False)
    with pytest.raises(ValueError):
        tok(["你好", "Hello world!"], return_tensors="pt")
    with pytest.raises(ValueError):
        tok(["你好"], padding="max_length")
    with pytest.raises(ValueError):
        tok.pad([[1, 2, 3]], max_length=2)


def test_truncation_counts_special_tokens(tok):
    text = "Hello world! This is a tokenizer test."
    full = tok.encode(text)
    out = tok(text, max_length=6, truncation=True)
    assert out["input_ids"] == full[:6]
    assert out["position_ids"] == list(range(6))
    assert tok(text, max_length=6, truncation=True, add_special_tokens=False)["input_ids"] == full[2:8]
    assert tok(text, max_length=6)["input_ids"] == full  # no truncation unless asked
    batch = tok(["你好", text], max_length=8, truncation=True, padding="max_length")
    assert batch["input_ids"] == [[0] * 4 + tok.encode("你好"), full[:8]]


def test_generated_ids_decode_like_reference(tok, expected):
    records = list(_generate_records(expected))
    assert records
    for name, seq in records:
        assert tok.decode(seq["new_ids"]) == seq["new_text"], name
        if 0 not in seq["input_ids"]:  # unpadded prompts re-encode exactly
            assert tok.encode(seq["prompt"]) == seq["input_ids"], name


def test_chat_response_post_processing(tok, expected):
    chat = expected["base"]["chat"]
    run = expected["base"]["generate"]["chat_history_prompt"]["sequences"][0]
    assert process_response(tok.decode(run["new_ids"])) == chat["response"]
    assert process_response("  [[训练时间]]发布。\n") == "2023年发布。"
    assert tok.process_response(" x ") == "x"


def test_stream_suffix_ids(tok, ref):
    history = [("你好", "你好！")]
    suffix = tok.build_stream_suffix_ids("What?", history)
    expected_text = "\n\n[Round 2]\n\n问：What?\n\n答："
    full = tok.encode(expected_text, add_special_tokens=False)
    assert tok.convert_ids_to_tokens(full[0]) == "▁" and suffix == full[1:]
    assert suffix[:2] == [13, 13]
    assert tok.decode(suffix) == expected_text
    assert tok.build_stream_suffix_ids("What?", []) == tok.build_chat_input("What?")
    assert tok.build_stream_suffix_ids("What?") == tok.build_chat_input("What?")


def test_save_matches_thudm_layout(tok, fixture_dir, tmp_path):
    tok.save(tmp_path / "out")
    ref_dir = fixture_dir / "ptuning-pre8"
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "out" / name).read_bytes() == (ref_dir / name).read_bytes(), name
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_chatglm.ChatGLMTokenizer"
    again = ChatGLMTokenizer.from_folder(tmp_path / "out")
    assert again.encode("你好") == tok.encode("你好")


def test_from_folder_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        ChatGLMTokenizer.from_folder(tmp_path)


# ---- incremental detokenizer -------------------------------------------------------------

def _stream(tok, ids, chunk=1):
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(detok.flush())
    return detok, deltas


def test_incremental_never_emits_half_a_character(tok):
    ids = tok.encode("你好 😀🎉 罕见字：龘 ñ ok", add_special_tokens=False)
    assert sum(i in tok.byte_values for i in ids) >= 12
    detok, deltas = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == detok.text == "你好 😀🎉 罕见字：龘 ñ ok"
    assert all("\ufffd" not in d for d in deltas)
    # Push an emoji byte by byte after some text: nothing until the fourth byte.
    detok = IncrementalDetokenizer(tok)
    assert detok.push(tok.encode("你好", add_special_tokens=False)) == "你好"
    emoji = tok.encode("👋", add_special_tokens=False)[1:]
    assert [detok.push([b]) for b in emoji] == ["", "", "", "👋"]
    assert detok.flush() == "" and detok.text == "你好👋"


def test_incremental_flushes_invalid_bytes(tok):
    e4, a, cont = tok.sp.piece_to_id("<0xE4>"), tok.sp.piece_to_id("<0x41>"), tok.sp.piece_to_id("<0x80>")
    detok = IncrementalDetokenizer(tok)
    assert detok.push([cont]) == "\ufffd"  # a stray continuation byte can never become valid
    assert detok.push([e4]) == ""  # might still start a character
    assert detok.push([a]) == "\ufffdA"  # ...but "A" is not a continuation byte
    assert detok.push([e4, 3001]) == "\ufffd"  # a special ends the byte run
    assert detok.push([e4, tok.sp.piece_to_id("<0xBD>")]) == ""
    assert detok.flush() == "\ufffd\ufffd"  # incomplete at the end: one U+FFFD per byte
    with pytest.raises(RuntimeError):
        detok.push([a])


def test_incremental_matches_reference_generations(tok, expected):
    for name, seq in _generate_records(expected):
        for chunk in (1, 3):
            detok, deltas = _stream(tok, seq["new_ids"], chunk)
            assert "".join(deltas) == seq["new_text"] == detok.text, name


def test_incremental_dummy_prefix(tok):
    space = tok.encode("\n", add_special_tokens=False)[0]
    hello = tok.encode("Hello world", add_special_tokens=False)
    for ids in ([3001, 3003, *hello], [space, *hello], [3001, space, space, *hello], [0, 1, 2]):
        assert "".join(_stream(tok, ids)[1]) == tok.decode(ids)


def test_incremental_work_is_bounded(fixture_dir):
    """Each push decodes only the new ids (plus held bytes and one context piece)."""
    tok = ChatGLMTokenizer.from_folder(fixture_dir / "model")  # private copy: its `sp` is spied on
    sizes = []

    class Spy:
        def __init__(self, sp):
            self.sp = sp

        def __getattr__(self, name):
            return getattr(self.sp, name)

        def decode_pieces(self, pieces):
            sizes.append(len(pieces))
            return self.sp.decode_pieces(pieces)

    ids = tok.encode("你好，我是人工智能助手。😀 Hello world! " * 40, add_special_tokens=False)
    tok.sp = Spy(tok.sp)
    detok, deltas = _stream(tok, ids)
    assert len(ids) > 500 and max(sizes) <= 6
    assert "".join(deltas) == tok.decode(ids)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_incremental_equals_decode_property(tok, data):
    byte_ids = sorted(tok.byte_values)
    id_strategy = st.one_of(
        st.integers(-2, tok.vocab_size + 3),
        st.sampled_from(byte_ids),
        st.sampled_from([tok.sp.piece_to_id(f"<0x{b:02X}>") for b in (0xE4, 0xF0, 0x9F, 0xBD, 0xA0, 0x80)]),
        st.sampled_from([0, 1, 2, 3001, 3003, 2703, 13]),
    )
    ids = data.draw(st.lists(id_strategy, max_size=40))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(ids)), max_size=8)))
    detok = IncrementalDetokenizer(tok)
    pieces, start = [], 0
    for cut in cuts + [len(ids)]:
        pieces.append(detok.push(ids[start:cut]))
        start = cut
    pieces.append(detok.flush())
    assert "".join(pieces) == tok.decode(ids) == detok.text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(exclude_characters="\ufffd", exclude_categories=("Cs",)), max_size=30),
       chunk=st.integers(1, 4))
def test_incremental_text_never_shows_replacement_chars(tok, text, chunk):
    ids = tok.encode(text)
    detok, deltas = _stream(tok, ids, chunk)
    assert "".join(deltas) == tok.decode(ids)
    assert all("\ufffd" not in d for d in deltas)
