"""JSON-lines rows -> token ids and labels, exactly as THUDM's preprocess_function_train/_eval
(chatglm2-reference.md §6.3), plus the collator and the example printout."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chatglm.tokenizer import ChatGLMTokenizer, build_chat_prompt

IGNORE_INDEX = -100
EVAL_MAP_BATCH = 1000  # datasets.map's default batch: THUDM's eval rows are padded per 1000 raw rows


class DataError(ValueError):
    """A data file that cannot be used, with file, line number and what is wrong."""


@dataclass(frozen=True)
class Columns:
    prompt: str
    response: str
    history: str | None = None


@dataclass(frozen=True)
class Row:
    query: str | None
    answer: str | None
    history: list[tuple[str, str]] | None


Feature = dict[str, list[int]]


def _text(value: Any, where: str, column: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise DataError(f"{where}: column {column!r} must be a string, got {type(value).__name__}")


def _history(value: Any, where: str, column: str) -> list[tuple[str, str]] | None:
    if value is None:
        return None
    bad = DataError(f"{where}: column {column!r} must be a list of [query, response] string pairs")
    if not isinstance(value, list):
        raise bad
    for pair in value:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise bad
    return [(q, r) for q, r in value]


def read_rows(path: str | Path, columns: Columns, limit: int | None = None) -> list[Row]:
    """Read a JSON-lines file; blank lines are skipped, anything else malformed is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows: list[Row] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                                "expected one JSON object per line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            needed = [c for c in (columns.prompt, columns.response, columns.history) if c is not None]
            missing = [c for c in needed if c not in obj]
            if missing:
                raise DataError(f"{where}: missing column {', '.join(map(repr, missing))} "
                                f"(the line has {', '.join(map(repr, obj)) or 'no columns'})")
            history = _history(obj[columns.history], where, columns.history) if columns.history else None
            rows.append(Row(_text(obj[columns.prompt], where, columns.prompt),
                            _text(obj[columns.response], where, columns.response), history))
    return rows


def preprocess_train(rows: Sequence[Row], tok: ChatGLMTokenizer, max_source_length: int, max_target_length: int,
                     source_prefix: str = "", ignore_pad_token_for_loss: bool = True) -> list[Feature]:
    """[gMASK] sop prompt | answer | eos, right-padded to source+target+1; prompt labels masked."""
    max_seq_length = max_source_length + max_target_length + 1
    out: list[Feature] = []
    for row in rows:
        if not row.query or not row.answer:  # THUDM skips rows with an empty prompt or response
            continue
        prompt = source_prefix + build_chat_prompt(row.query, row.history)
        a_ids = tok(prompt, max_length=max_source_length, truncation=True)["input_ids"]
        b_ids = tok.encode(row.answer, add_special_tokens=False)[:max_target_length]
        input_ids = a_ids + b_ids + [tok.eos_id]
        labels = [tok.pad_id] * len(a_ids) + b_ids + [tok.eos_id]
        pad = max_seq_length - len(input_ids)
        input_ids += [tok.pad_id] * pad
        labels += [tok.pad_id] * pad
        if ignore_pad_token_for_loss:
            labels = [IGNORE_INDEX if t == tok.pad_id else t for t in labels]
        out.append({"input_ids": input_ids, "labels": labels})
    return out


def preprocess_eval(rows: Sequence[Row], tok: ChatGLMTokenizer, max_source_length: int, max_target_length: int,
                    source_prefix: str = "", ignore_pad_token_for_loss: bool = True) -> list[Feature]:
    """Left-padded prompts (per 1000-row map batch, as datasets.map did) and unpadded target ids."""
    out: list[Feature] = []
    for start in range(0, len(rows), EVAL_MAP_BATCH):
        kept = [r for r in rows[start:start + EVAL_MAP_BATCH] if r.query and r.answer]
        if not kept:
            continue
        prompts = [source_prefix + build_chat_prompt(r.query, r.history) for r in kept]
        inputs = tok(prompts, max_length=max_source_length, truncation=True, padding=True)
        targets = tok([r.answer for r in kept], max_length=max_target_length, truncation=True)["input_ids"]
        for i, target in enumerate(targets):
            labels = [IGNORE_INDEX if ignore_pad_token_for_loss and t == tok.pad_id else t for t in target]
            out.append({k: inputs[k][i] for k in ("input_ids", "attention_mask", "position_ids")} | {"labels": labels})
    return out


def collate(features: Sequence[Feature], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Left-pad every key to the batch's longest row (a no-op for THUDM's fixed-length rows):
    ids with pad_id, masks and positions with 0, labels with -100."""
    fill = {"input_ids": pad_id, "attention_mask": 0, "position_ids": 0, "labels": IGNORE_INDEX}
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        longest = max(len(f[key]) for f in features)
        batch[key] = torch.tensor([[fill[key]] * (longest - len(f[key])) + list(f[key]) for f in features],
                                  dtype=torch.long)
    return batch


def print_dataset_example(example: Feature, tok: ChatGLMTokenizer) -> None:
    print("input_ids", example["input_ids"])
    print("inputs", tok.decode(example["input_ids"]))
    print("label_ids", example["labels"])
    print("labels", tok.decode(example["labels"]))
