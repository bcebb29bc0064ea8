"""A `tokenizer.json` (HF tokenizers) equivalent to our ChatGLM2 SentencePiece tokenizer, so that
`transformers serve` loads the converted GLM folder without remote code and sees the same ids.

Built from the SentencePiece model itself: pieces and scores via `sentencepiece`, and the few
normalizer/trainer fields from the model's protobuf, read with a minimal wire-format parser (the
`protobuf` package is not a dependency). BPE merges are ranked by piece score, as SentencePiece
does; the text gets `[gMASK] sop` in front, as `ChatGLMTokenizer.encode` does.
`check_same_ids` proves the two agree on a set of texts.
"""
from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm

from chatglm.tokenizer import SPECIAL_TOKENS, ChatGLMTokenizer


def _fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message; value is int or bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, i = _varint(buf, i)
        elif wt == 2:
            n, i = _varint(buf, i)
            val, i = buf[i:i + n], i + n
        elif wt == 5:
            val, i = buf[i:i + 4], i + 4
        elif wt == 1:
            val, i = buf[i:i + 8], i + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        yield num, wt, val


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = val = 0
    while True:
        b = buf[i]
        i += 1
        val |= (b & 0x7F) << shift
        if b < 0x80:
            return val, i
        shift += 7


def spm_settings(model_bytes: bytes) -> dict:
    """model type, byte fallback and normalizer spec of a SentencePiece ModelProto."""
    s = {"model_type": 1, "byte_fallback": False, "charsmap": b"", "add_dummy_prefix": True,
         "remove_extra_whitespaces": True, "escape_whitespaces": True}
    for num, _, val in _fields(model_bytes):
        if num == 2:  # TrainerSpec
            for n, _, v in _fields(val):
                if n == 3:
                    s["model_type"] = v  # 1 unigram, 2 bpe
                elif n == 35:
                    s["byte_fallback"] = bool(v)
        elif num == 3:  # NormalizerSpec
            for n, _, v in _fields(val):
                key = {2: "charsmap", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces",
                       5: "escape_whitespaces"}.get(n)
                if key:
                    s[key] = v if key == "charsmap" else bool(v)
    return s


def build_tokenizer(model_file: str | Path):
    """A tokenizers.Tokenizer that encodes like ChatGLMTokenizer.encode (with its two special ids)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    ours = ChatGLMTokenizer(model_file)
    sp: spm.SentencePieceProcessor = ours.sp
    s = spm_settings(ours.model_bytes)
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    if s["model_type"] != 2:
        raise ValueError(f"SentencePiece model type {s['model_type']} is not BPE (ChatGLM2's tokenizer is)")
    # The special ids are vocabulary entries that no merge reaches: like ours, their names in a text
    # are plain text, and the post-processor alone puts [gMASK] sop in front.
    vocab = {p: i for i, p in enumerate(pieces)} | dict(zip(SPECIAL_TOKENS, range(n, n + len(SPECIAL_TOKENS))))
    normal = {p: (sp.get_score(i), i) for i, p in enumerate(pieces)
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
    ranked = sorted((-normal[p][0], normal[p][1], p[:k], p[k:]) for p in normal for k in range(1, len(p))
                    if p[:k] in normal and p[k:] in normal)
    model = BPE(vocab=vocab, merges=[(a, b) for *_, a, b in ranked], unk_token=sp.id_to_piece(sp.unk_id()),
                fuse_unk=True, byte_fallback=s["byte_fallback"])
    tok = Tokenizer(model)
    norm = [normalizers.Precompiled(s["charsmap"])] if s["charsmap"] else []
    if s["remove_extra_whitespaces"]:
        norm += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if s["add_dummy_prefix"]:
        norm.append(normalizers.Prepend("▁"))
    if s["escape_whitespaces"]:
        norm.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(norm)
    # SentencePiece words: a run of "▁" starts a word that goes on to the next "▁" run; digits alone
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("▁*[^▁]+|▁+"), behavior="isolated"),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    dec = [decoders.Replace("▁", " ")]
    if s["byte_fallback"]:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if s["add_dummy_prefix"]:
        dec.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(dec)
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK] sop $A", pair="[gMASK] sop $A $B",
        special_tokens=[("[gMASK]", ours.gmask_id), ("sop", ours.sop_id)])
    return tok


def write_tokenizer(model_file: str | Path, folder: str | Path) -> None:
    """tokenizer.json + tokenizer_config.json for AutoTokenizer."""
    folder = Path(folder)
    tok = build_tokenizer(model_file)
    tok.save(str(folder / "tokenizer.json"))
    # No special-token names: transformers would match them inside texts, which ours never does.
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "padding_side": "left", "model_max_length": 1 << 30}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def check_same_ids(model_file: str | Path, texts: list[str]) -> list[str]:
    """Texts on which the built tokenizer's ids differ from ours (empty: they agree)."""
    ours = ChatGLMTokenizer(model_file)
    theirs = build_tokenizer(model_file)
    return [t for t in texts if theirs.encode(t).ids != ours.encode(t)]
