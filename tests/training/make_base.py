"""Build the tiny pretrained base the learning tests P-tune: `python -m tests.training.make_base OUT`.

The base is a 2-layer ChatGLM2 with its own SentencePiece tokenizer, fully fine-tuned by
`python -m training.run` (no --pre_seq_len) on generated ad rows in which an instruction decides
the answer: "写广告：<attributes>" gets the ad copy, bare "<attributes>" gets "好的。". Untuned, the
base therefore answers plain prompts with "好的。" (attribute recall 0) although it can write ads;
P-Tuning v2 on plain prompts -> ad copy must learn a prefix that plays the instruction's part, the
soft-prompt-replaces-instruction effect P-tuning is used for. Pretraining takes CPU minutes, too
long for CI (about 40 minutes on one busy core), so the result is committed under
tests/training/assets/ (fp32, 0.8 MB).
"""
from __future__ import annotations

import argparse
import math
import shutil
import tempfile
from pathlib import Path

import torch

from chatglm.checkpoint import save_model
from chatglm.config import ChatGLMConfig
from chatglm.model import ChatGLM
from chatglm.tokenizer import ChatGLMTokenizer, build_chat_prompt
from training.gen_data import generate, write_jsonl

INSTRUCTION = "写广告："
REFUSAL = "好的。"
ASSET = Path(__file__).with_name("assets") / "adgen-tiny-base"
SEED = 0
PRETRAIN_ROWS, TUNE_ROWS, DEV_ROWS = 24000, 2000, 48
MAX_SOURCE, MAX_TARGET = 48, 40


def pretrain_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Two of three rows instructed (ad copy), one plain (refusal)."""
    return [{"content": INSTRUCTION + r["content"], "summary": r["summary"]} if i % 3 else
            {"content": r["content"], "summary": REFUSAL} for i, r in enumerate(rows)]


def split() -> tuple[list[dict], list[dict], list[dict]]:
    """(pretraining rows, P-tuning train rows, held-out dev rows), deterministic."""
    train, dev = generate(PRETRAIN_ROWS + TUNE_ROWS, DEV_ROWS, seed=SEED)
    return pretrain_rows(train[:PRETRAIN_ROWS]), train[PRETRAIN_ROWS:], dev


def train_tokenizer(rows: list[dict[str, str]], folder: Path, vocab_size: int = 800) -> ChatGLMTokenizer:
    import sentencepiece as spm

    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(build_chat_prompt(r["content"]) + r["summary"] for r in rows[:6000]), encoding="utf-8")
    spm.SentencePieceTrainer.train(  # ChatGLM2-style: BPE, byte fallback, identity normalization
        input=str(corpus), model_prefix=str(folder / "sp"), vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, num_threads=1, minloglevel=2)
    return ChatGLMTokenizer(folder / "sp.model")


def random_base(tok: ChatGLMTokenizer, hidden: int = 64, layers: int = 2) -> ChatGLM:
    config = ChatGLMConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=4, kv_channels=hidden // 4,
        ffn_hidden_size=hidden * 8 // 3 // 8 * 8, padded_vocab_size=math.ceil(tok.vocab_size / 64) * 64,
        seq_length=256, multi_query_attention=True, multi_query_group_num=2, add_qkv_bias=True,
        torch_dtype="float32")
    torch.manual_seed(SEED)
    model = ChatGLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
        # copying prior: the output layer starts as the embedding, so a token moved by attention
        # to the last position votes for itself (untied afterwards; training moves both)
        model.transformer.output_layer.weight.copy_(model.transformer.embedding.word_embeddings.weight)
    return model


PHASES = ((1500, 1e-2, 0), (2500, 6e-3, 1))  # (steps, peak learning rate, data-order seed), batch 16


def pretrain(init: Path, data: Path, out: Path, steps: int, lr: float, seed: int) -> Path:
    from training.run import main as train

    train(["--do_train", "--train_file", str(data), "--prompt_column", "content", "--response_column", "summary",
           "--model_name_or_path", str(init), "--output_dir", str(out), "--max_source_length", str(MAX_SOURCE),
           "--max_target_length", str(MAX_TARGET), "--per_device_train_batch_size", "16", "--max_steps", str(steps),
           "--learning_rate", str(lr), "--warmup_steps", "30", "--logging_steps", "50", "--save_steps", str(steps),
           "--disable_tqdm", "1", "--seed", str(seed), "--report_to", "none"])
    return out / f"checkpoint-{steps}"


def build(out: Path) -> None:
    """Random init -> full fine-tuning in two phases (the second reshuffles and cools down) -> `out`."""
    pre, _, _ = split()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = train_tokenizer(pre, tmp)
        folder = tmp / "init"
        save_model(random_base(tok), folder)
        tok.save(folder)
        write_jsonl(pre, tmp / "pre.json")
        for n, (steps, lr, seed) in enumerate(PHASES):
            folder = pretrain(folder, tmp / "pre.json", tmp / f"phase{n}", steps, lr, seed)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"):
            shutil.copy(folder / name, out / name)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, nargs="?", default=ASSET)
    torch.set_num_threads(1)
    build(p.parse_args().out)
