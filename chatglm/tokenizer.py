"""ChatGLM2 tokenizer: SentencePiece plus five special ids, the chat template, and a streaming
detokenizer. Behaviour follows THUDM's tokenizer under transformers 4.30.2 (reference §3, §4)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm
import torch

TOKENIZER_FILE = "tokenizer.model"
SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
# What THUDM's PrefixTrainer writes next to a checkpoint (transformers 4.30.2, sort_keys + indent 2).
TOKENIZER_CONFIG = {
    "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    "clean_up_tokenization_spaces": False,
    "do_lower_case": False,
    "model_max_length": int(1e30),
    "padding_side": "left",
    "remove_space": False,
    "tokenizer_class": "ChatGLMTokenizer",
}
History = Sequence[Sequence[str]]  # (query, response) pairs, tuples or JSON lists


def build_chat_prompt(query: str, history: History | None = None) -> str:
    """THUDM `build_prompt`: one `[Round i]` block per past exchange, then the open round."""
    rounds = [f"[Round {i}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(history or [], 1)]
    rounds.append(f"[Round {len(rounds) + 1}]\n\n问：{query}\n\n答：")
    return "".join(rounds)


def process_response(text: str) -> str:
    """THUDM `process_response`: strip, then fill in the training-time placeholder."""
    return text.strip().replace("[[训练时间]]", "2023年")


class ChatGLMTokenizer:
    """SentencePiece model with [MASK] [gMASK] [sMASK] sop eop appended after its vocabulary."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, model_file: str | Path) -> None:
        self.model_bytes = Path(model_file).read_bytes()  # kept so `save` copies byte for byte
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
        self.sp_vocab_size: int = self.sp.get_piece_size()
        self.vocab_size: int = self.sp_vocab_size + len(SPECIAL_TOKENS)
        extra = range(self.sp_vocab_size, self.vocab_size)
        self.mask_id, self.gmask_id, self.smask_id, self.sop_id, self.eop_id = extra
        self.special_ids: frozenset[int] = frozenset({self.pad_id, self.bos_id, self.eos_id, *extra})
        self.special_tokens: dict[str, int] = dict(zip(SPECIAL_TOKENS, extra))
        byte_ids = ((b, self.sp.piece_to_id(f"<0x{b:02X}>")) for b in range(256))
        self.byte_values: dict[int, int] = {i: b for b, i in byte_ids if self.sp.is_byte(i)}
        self._anchor, self._probe = self._pick_context_pieces()

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ChatGLMTokenizer":
        path = Path(folder) / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {folder}: expected a ChatGLM2 model folder")
        return cls(path)

    # ---- encoding -------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`[gMASK] sop` + SentencePiece ids; special-token names inside `text` are plain text."""
        ids = self.sp.encode(text)
        return [self.gmask_id, self.sop_id, *ids] if add_special_tokens else ids

    def build_chat_input(self, query: str, history: History | None = None) -> list[int]:
        return self.encode(build_chat_prompt(query, history))

    def build_stream_suffix_ids(self, query: str, history: History | None = None) -> list[int]:
        """Ids for the next round when the KV cache of the earlier rounds is reused (§4.3)."""
        if not history:
            return self.build_chat_input(query)
        ids = self.encode(f"\n\n[Round {len(history) + 1}]\n\n问：{query}\n\n答：", add_special_tokens=False)
        return ids[1:]  # drop the dummy-prefix "▁"

    process_response = staticmethod(process_response)

    def __call__(self, texts: str | list[str], max_length: int | None = None, truncation: bool = False,
                 padding: bool | str = False, add_special_tokens: bool = True,
                 return_tensors: str | None = None) -> dict:
        """HF-style call: `input_ids`, `attention_mask`, `position_ids`, always left padded."""
        single = isinstance(texts, str)
        seqs = [self.encode(t, add_special_tokens=False) for t in ([texts] if single else texts)]
        if truncation and max_length is not None:  # right side; the two specials count (as HF)
            seqs = [s[:max(max_length - (2 if add_special_tokens else 0), 0)] for s in seqs]
        if add_special_tokens:
            seqs = [[self.gmask_id, self.sop_id, *s] for s in seqs]
        if padding in (True, "longest"):
            target = max((len(s) for s in seqs), default=0)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError('padding="max_length" needs max_length')
            target = max_length
        elif padding in (False, "do_not_pad"):
            target = 0
        else:
            raise ValueError(f"unknown padding {padding!r}")
        out = self._left_pad(seqs, target)
        if return_tensors == "pt":
            if len({len(s) for s in out["input_ids"]}) > 1:
                raise ValueError("sequences differ in length: pass padding=True for tensors")
            return {k: torch.tensor(v, dtype=torch.long).reshape(len(seqs), -1) for k, v in out.items()}
        if return_tensors is not None:
            raise ValueError(f"unsupported return_tensors {return_tensors!r}")
        return {k: v[0] for k, v in out.items()} if single else out

    def _left_pad(self, seqs: Sequence[Sequence[int]], target: int) -> dict[str, list[list[int]]]:
        out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "position_ids": []}
        for s in seqs:
            n_pad = max(target - len(s), 0)
            out["input_ids"].append([self.pad_id] * n_pad + [int(i) for i in s])
            out["attention_mask"].append([0] * n_pad + [1] * len(s))
            out["position_ids"].append([0] * n_pad + list(range(len(s))))
        return out

    def pad(self, sequences: Sequence[Sequence[int]], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Left-pad id lists into long tensors (pad id 0, mask 0, position 0 on pads)."""
        longest = max((len(s) for s in sequences), default=0)
        target = longest if max_length is None else max_length
        if longest > target:
            raise ValueError(f"a sequence has {longest} ids, more than max_length={target}")
        out = self._left_pad(sequences, target)
        return {k: torch.tensor(v, dtype=torch.long).reshape(len(sequences), target) for k, v in out.items()}

    # ---- decoding -------------------------------------------------------------------------
    def _piece(self, i: int) -> str:
        # Specials, negative ids and ids past the SentencePiece vocabulary (padding rows) are "".
        return "" if i in self.special_ids or not 0 <= i < self.sp_vocab_size else self.sp.id_to_piece(i)

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        if isinstance(ids, int) or getattr(ids, "ndim", None) == 0:  # also numpy / 0-d tensor scalars
            return self._piece(int(ids))
        return [self._piece(int(i)) for i in ids]

    def decode(self, ids: Iterable[int]) -> str:
        """SentencePiece joins the pieces: specials are "", one U+FFFD per bad byte, first "▁" dropped."""
        return self.sp.decode_pieces(self.convert_ids_to_tokens(ids))

    def _pick_context_pieces(self) -> tuple[str, str | None]:
        """An anchor piece (plain text, no "▁") to decode a chunk as if text came before it, and a
        probe piece ("▁x") whose leading space shows whether the decoder is still at its start."""
        anchor = probe = None
        for i in range(self.sp_vocab_size):
            if self.sp.is_control(i) or self.sp.is_unknown(i) or self.sp.is_byte(i) or self.sp.is_unused(i):
                continue
            p = self.sp.id_to_piece(i)
            if anchor is None and p and "▁" not in p and self.sp.decode_pieces([p]) == p:
                anchor = p
            if probe is None and len(p) > 1 and p[0] == "▁" and "▁" not in p[1:]:
                probe = p
            if anchor and probe:
                break
        if anchor is None:
            raise ValueError("tokenizer.model has no plain-text piece to anchor incremental decoding")
        return anchor, probe

    def decode_continuation(self, ids: Sequence[int]) -> str:
        """Decode `ids` as they read after non-empty text (no dummy-prefix stripping). `ids` must not
        begin inside a UTF-8 character split over byte pieces."""
        text = self.sp.decode_pieces([self._anchor, *self.convert_ids_to_tokens(ids)])
        assert text.startswith(self._anchor)
        return text[len(self._anchor):]

    def still_at_start(self, ids: Sequence[int]) -> bool:
        """Whether a decoder that has just read `ids` (from the start) would still drop a "▁"."""
        if self._probe is None:
            return False
        pieces = self.convert_ids_to_tokens(ids)
        plain = self.sp.decode_pieces(pieces) + self.sp.decode_pieces([self._probe])
        return self.sp.decode_pieces([*pieces, self._probe]) == plain

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.model (byte copy) and THUDM-shaped tokenizer_config.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / TOKENIZER_FILE).write_bytes(self.model_bytes)
        config = json.dumps(TOKENIZER_CONFIG, indent=2, sort_keys=True, ensure_ascii=False)
        (folder / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")
        (folder / "special_tokens_map.json").write_text("{}\n", encoding="utf-8")


def _utf8_length(lead: int) -> int:
    """Bytes a UTF-8 lead byte announces (1 for ASCII and for bytes that cannot start a character)."""
    return 2 if lead & 0xE0 == 0xC0 else 3 if lead & 0xF0 == 0xE0 else 4 if lead & 0xF8 == 0xF0 else 1


class IncrementalDetokenizer:
    """Streaming decode: each `push` returns only text that later ids cannot change. All pushes
    plus `flush` concatenate to `tokenizer.decode(all_ids)`; each call decodes only the new ids
    plus at most three held-back byte pieces of an unfinished UTF-8 character."""

    def __init__(self, tokenizer: ChatGLMTokenizer) -> None:
        self.tokenizer = tokenizer
        self._tail: list[int] = []  # ids not yet turned into text
        self._at_start = True  # decoder would still drop a leading "▁"
        self._parts: list[str] = []
        self._closed = False

    @property
    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def push(self, new_ids: Iterable[int]) -> str:
        if self._closed:
            raise RuntimeError("IncrementalDetokenizer.push after flush")
        self._tail.extend(int(i) for i in new_ids)
        return self._emit(self._stable_end())

    def flush(self) -> str:
        """Emit whatever is held back (an unfinished character becomes U+FFFD per byte)."""
        text = self._emit(len(self._tail))
        self._closed = True
        return text

    def _stable_end(self) -> int:
        """End of the prefix of `_tail` whose text is final: everything but an unfinished
        multi-byte character at the end of a trailing run of byte pieces."""
        tail, n = self._tail, len(self._tail)
        for back in range(1, min(4, n) + 1):
            byte = self.tokenizer.byte_values.get(tail[n - back])
            if byte is None:
                return n  # the trailing byte run (if any) holds only continuation bytes
            if byte & 0xC0 != 0x80:  # lead byte: a character starts here
                return n - back if back < _utf8_length(byte) else n
        return n

    def _emit(self, end: int) -> str:
        if end == 0:
            return ""
        ids, self._tail = self._tail[:end], self._tail[end:]
        tok = self.tokenizer
        if not self._at_start:
            text = tok.decode_continuation(ids)
        elif all(i in tok.special_ids or not 0 <= i < tok.sp_vocab_size for i in ids):
            return ""  # only empty pieces: nothing shown, still at the start
        else:
            text = tok.decode(ids)
            self._at_start = tok.still_at_start(ids)
        if text:
            self._parts.append(text)
        return text
