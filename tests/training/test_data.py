"""Preprocessing equals THUDM's preprocess_function_train/_eval (reference §6.3) on the same rows.

Expected ids come from the fixture's expected.json, which THUDM's own tokenizer produced: the
two-round history prompt's ids and plain-text ids of answer strings."""
import json

import pytest

from training.data import (IGNORE_INDEX, Columns, DataError, Row, collate, preprocess_eval, preprocess_train,
                           read_rows)

GMASK, SOP, EOS, PAD = 3001, 3003, 2, 0


@pytest.fixture(scope="module")
def golden(expected):
    t = expected["tokenizer"]
    cases = {c["name"]: c for c in t["cases"]}
    return t["chat_prompt"], cases


def history_row(chat_prompt, answer):
    return Row(chat_prompt["query"], answer, [tuple(p) for p in chat_prompt["history"]])


def test_train_row_with_history_matches_thudm(tok, golden):
    chat_prompt, cases = golden
    answer = cases["zh_sentence"]
    a_ids = chat_prompt["input_ids"]  # THUDM: [gMASK] sop + build_prompt(query, history)
    b_ids = answer["ids_no_special"]
    src, tgt = len(a_ids) + 5, len(b_ids) + 3  # no truncation
    (feat,) = preprocess_train([history_row(chat_prompt, answer["text"])], tok, src, tgt)
    pad = src + tgt + 1 - (len(a_ids) + len(b_ids) + 1)
    assert feat["input_ids"] == a_ids + b_ids + [EOS] + [PAD] * pad
    assert feat["labels"] == [IGNORE_INDEX] * len(a_ids) + b_ids + [EOS] + [IGNORE_INDEX] * pad
    assert len(feat["input_ids"]) == len(feat["labels"]) == src + tgt + 1


def test_train_truncation_counts_specials_and_keeps_pad_labels_without_ignore(tok, golden):
    chat_prompt, cases = golden
    b_ids = cases["mixed"]["ids_no_special"]
    (feat,) = preprocess_train([history_row(chat_prompt, cases["mixed"]["text"])], tok, 30, 10,
                               ignore_pad_token_for_loss=False)
    # right truncation: the 2 specials count towards max_source_length, so the trailing 答： is lost
    assert feat["input_ids"] == chat_prompt["input_ids"][:30] + b_ids[:10] + [EOS]
    assert feat["labels"] == [PAD] * 30 + b_ids[:10] + [EOS]


def test_source_prefix_goes_before_the_template(tok):
    row = Row("类型#裙*颜色#红色", "这条裙子，红色。", None)
    (feat,) = preprocess_train([row], tok, 64, 32, source_prefix="广告：")
    prompt_ids = [GMASK, SOP] + tok.sp.encode("广告：[Round 1]\n\n问：类型#裙*颜色#红色\n\n答：")
    answer_ids = tok.sp.encode("这条裙子，红色。")
    n = len(prompt_ids)
    assert feat["input_ids"][: n + len(answer_ids) + 1] == prompt_ids + answer_ids + [EOS]
    assert set(feat["labels"][:n]) == {IGNORE_INDEX}
    assert tok.decode(feat["input_ids"][:n]).startswith("广告：[Round 1]")


def test_rows_with_empty_prompt_or_response_are_skipped(tok):
    rows = [Row("", "x", None), Row("q", "", None), Row(None, "x", None), Row("q", "a", None)]
    assert len(preprocess_train(rows, tok, 16, 8)) == 1
    assert len(preprocess_eval(rows, tok, 16, 8)) == 1


def test_eval_rows_left_pad_prompts_and_keep_specials_in_labels(tok, golden):
    chat_prompt, cases = golden
    rows = [history_row(chat_prompt, cases["zh_sentence"]["text"]), Row("你好", cases["numbers"]["text"], None)]
    feats = preprocess_eval(rows, tok, 128, 12)
    long_ids = chat_prompt["input_ids"]
    assert feats[0]["input_ids"] == long_ids
    assert feats[0]["position_ids"] == list(range(len(long_ids)))
    short = [GMASK, SOP] + tok.sp.encode("[Round 1]\n\n问：你好\n\n答：")
    n_pad = len(long_ids) - len(short)
    assert feats[1]["input_ids"] == [PAD] * n_pad + short
    assert feats[1]["attention_mask"] == [0] * n_pad + [1] * len(short)
    assert feats[1]["position_ids"] == [0] * n_pad + list(range(len(short)))
    # THUDM's tokenizer(text_target=...): [gMASK] sop + ids, truncated to max_target_length
    assert feats[0]["labels"] == [GMASK, SOP] + cases["zh_sentence"]["ids_no_special"][:10]
    assert feats[1]["labels"] == [GMASK, SOP] + cases["numbers"]["ids_no_special"][:10]


def test_collate_left_pads_labels_with_ignore_index():
    batch = collate([{"input_ids": [1, 2, 3], "labels": [5]}, {"input_ids": [7, 8, 9], "labels": [6, 7, 8]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [7, 8, 9]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 5], [6, 7, 8]]


def write(tmp_path, text):
    path = tmp_path / "data.json"
    path.write_text(text, encoding="utf-8")
    return path


COLS = Columns("content", "summary")


@pytest.mark.parametrize("text, line, problem", [
    ('{"content": "a", "summary": "b"}\n{"content": "a", "summary": "b"\n', 2, "not valid JSON"),
    ('{"content": "a", "summary": "b"}\n\n{"content": "a"}\n', 3, "missing column 'summary'"),
    ('[1, 2]\n', 1, "expected a JSON object"),
    ('{"content": 5, "summary": "b"}\n', 1, "column 'content' must be a string"),
])
def test_malformed_lines_name_file_line_and_problem(tmp_path, text, line, problem):
    path = write(tmp_path, text)
    with pytest.raises(DataError) as e:
        read_rows(path, COLS)
    assert f"{path}:{line}:" in str(e.value) and problem in str(e.value)


def test_history_must_be_pairs(tmp_path):
    path = write(tmp_path, json.dumps({"prompt": "q", "response": "a", "history": [["only one"]]}) + "\n")
    with pytest.raises(DataError, match=r"data.json:1: column 'history' must be a list of \[query, response\]"):
        read_rows(path, Columns("prompt", "response", "history"))


def test_read_rows_limit_and_history(tmp_path):
    lines = [{"prompt": f"q{i}", "response": f"a{i}", "history": [["h", "r"]] if i else None} for i in range(5)]
    path = write(tmp_path, "".join(json.dumps(x) + "\n" for x in lines))
    rows = read_rows(path, Columns("prompt", "response", "history"), limit=3)
    assert [r.query for r in rows] == ["q0", "q1", "q2"]
    assert rows[0].history is None and rows[1].history == [("h", "r")]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_rows(tmp_path / "nope.json", COLS)
