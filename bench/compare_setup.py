"""The weights and prompts of bench/compare.py: a mid-size ChatGLM2 with random weights in the published
folder layout, its transformers GLM conversion, and prompts that tokenize identically on both servers.

The output layer keeps random N(0, 0.02) rows only for ordinary SentencePiece pieces (no byte, control,
special or padding ids); the other rows are 1000x smaller, so greedy decoding only ever emits pieces
that decode to text on their own. Each generated token is then one streamed text chunk on both
servers, and TTFT/ITL measure the same thing. The matmul work is unchanged (all 65024 rows stay).
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from chatglm.checkpoint import save_model
from chatglm.config import ChatGLMConfig
from chatglm.model import ChatGLM
from chatglm.tokenizer import ChatGLMTokenizer

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_MODEL = ROOT.parent / "shared" / "fixtures" / "chatglm2-tiny" / "model"
# The engine issue's mid-size shape: chatglm2-6b's layout reduced to fit a 2-core run.
MID_SHAPE = dict(num_layers=24, hidden_size=1024, num_attention_heads=8, kv_channels=128, multi_query_attention=True,
                 multi_query_group_num=2, ffn_hidden_size=3424, padded_vocab_size=65024, seq_length=4096,
                 add_qkv_bias=True, torch_dtype="bfloat16")
SHARD_BYTES = 200 * 2**20


def text_piece_ids(tok: ChatGLMTokenizer) -> list[int]:
    """Ids of pieces that decode to non-blank text by themselves (what greedy decoding may emit)."""
    sp = tok.sp
    ids = []
    for i in range(tok.sp_vocab_size):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i):
            continue
        if sp.decode_pieces([sp.id_to_piece(i)]).strip():
            ids.append(i)
    return ids


@torch.no_grad()
def build_mid_model(tok: ChatGLMTokenizer, seed: int = 0) -> ChatGLM:
    config = ChatGLMConfig(**MID_SHAPE)
    with torch.device("meta"):
        model = ChatGLM(config)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "layernorm" in name:
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    out = model.transformer.output_layer.weight  # [V, hidden]
    keep = torch.zeros(out.shape[0], dtype=torch.bool)
    keep[text_piece_ids(tok)] = True
    out[~keep] *= 1e-3
    return model.to(torch.bfloat16).eval()


def ensure_models(workdir: Path, tokenizer_dir: Path = FIXTURE_MODEL) -> tuple[Path, Path]:
    """(ChatGLM2 folder, GLM folder) under `workdir`, created once and reused while the shape matches."""
    from bench.glm_convert import convert_folder

    ours, theirs = workdir / "chatglm2-mid", workdir / "glm-mid"
    stamp = json.dumps({"shape": MID_SHAPE, "tokenizer": str(tokenizer_dir), "v": 1}, sort_keys=True)
    if (workdir / "STAMP").is_file() and (workdir / "STAMP").read_text() == stamp:
        return ours, theirs
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    tok = ChatGLMTokenizer.from_folder(tokenizer_dir)
    model = build_mid_model(tok)
    save_model(model, ours, safetensors=False, max_shard_bytes=SHARD_BYTES)  # THUDM's pytorch_model-*.bin + index
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, ours / name)
    del model
    convert_folder(ours, theirs, dtype=torch.bfloat16)
    (workdir / "STAMP").write_text(stamp)
    return ours, theirs


def make_prompts(tokenizer_dir: Path, n: int, input_len: int, seed: int) -> list[str]:
    """n texts of exactly `input_len` tokens ([gMASK] sop included) under ours and the tokenizer.json."""
    from bench.glm_tokenizer import build_tokenizer

    ours = ChatGLMTokenizer.from_folder(tokenizer_dir)
    theirs = build_tokenizer(tokenizer_dir / "tokenizer.model")
    pieces = text_piece_ids(ours)
    rng = random.Random(seed)
    prompts: list[str] = []
    while len(prompts) < n:
        ids = [rng.choice(pieces) for _ in range(input_len + 8)]
        text = ours.decode(ids)
        got = ours.encode(text)[:input_len]
        text = ours.decode(got[2:])
        a, b = ours.encode(text), theirs.encode(text).ids
        if len(a) == input_len and a == b:
            prompts.append(text)
    return prompts
