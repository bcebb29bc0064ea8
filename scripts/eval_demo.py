"""Greedy attribute recall of the demo model on held-out generated rows, base alone and with the
adapter, on the base quantized as the server serves it: `python scripts/eval_demo.py [--write]`.

Held-out rows come from training.gen_data with their own seed, minus every attribute combination
the pretraining corpus or the P-tuning data contains. Each row is asked as THUDM's chat prompt
(`[Round 1]\\n\\n问：<content>\\n\\n答：`) and answered greedily by chatglm.generation; recall is the
fraction of the row's attribute values found verbatim in the answer (training.gen_data's oracle).
With --write the numbers go into checkpoints/demo-adgen/recall.json and both model cards.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from demo_settings import ADAPTER, BASE, EVAL, PRETRAIN, PTUNE, SEEDS  # noqa: E402

RECALL_BEGIN, RECALL_END = "<!-- recall:begin -->", "<!-- recall:end -->"


def held_out_rows(n: int = EVAL["rows"]) -> list[dict[str, str]]:
    """n generated rows (seed SEEDS["eval"]) whose content the build never trained on."""
    from training.gen_data import generate

    pre_ads, _ = generate(PRETRAIN["ad_rows"], 0, SEEDS["pretrain_ads"])
    tune, dev = generate(PTUNE["train_rows"], PTUNE["dev_rows"], SEEDS["ptune"])
    seen = {r["content"] for r in pre_ads + tune + dev}
    rows, _ = generate(4 * n, 0, SEEDS["eval"])
    out = []
    for r in rows:
        if r["content"] not in seen:
            seen.add(r["content"])
            out.append(r)
    if len(out) < n:
        raise ValueError(f"only {len(out)} unseen rows out of {4 * n}")
    return out[:n]


def answers(model, tok, contents: list[str], prefix=None, max_new_tokens: int = EVAL["max_new_tokens"],
            batch_size: int = 20) -> list[str]:
    """Greedy answers to THUDM chat prompts, in left-padded batches."""
    from chatglm.generation import generate
    from chatglm.tokenizer import process_response

    out: list[str] = []
    for i in range(0, len(contents), batch_size):
        ids = [tok.build_chat_input(c) for c in contents[i:i + batch_size]]
        batch = tok.pad(ids)
        new = generate(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"], prefix=prefix,
                       max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_id)
        out += [process_response(tok.decode([t for t in row if t != tok.eos_id])) for row in new]
    return out


def evaluate(base_dir: Path, adapter_dir: Path, rows: list[dict[str, str]] | Path | None = None, *,
             quantize: str | None = EVAL["quantize"], threads: int = 2, samples: int = 5) -> dict:
    import torch

    from chatglm.checkpoint import load_model, load_prefix
    from chatglm.tokenizer import ChatGLMTokenizer
    from training.gen_data import attribute_recall

    torch.set_num_threads(threads)
    if rows is None:
        rows = held_out_rows()
    elif isinstance(rows, Path):
        rows = [json.loads(line) for line in rows.read_text(encoding="utf-8").splitlines() if line.strip()]
    model = load_model(base_dir, quantize=quantize)
    tok = ChatGLMTokenizer.from_folder(base_dir)
    prefix = load_prefix(adapter_dir, model.config).to(model.dtype)
    contents = [r["content"] for r in rows]
    t = time.time()
    base = answers(model, tok, contents)
    tuned = answers(model, tok, contents, prefix=prefix)
    seconds = time.time() - t
    recall = {name: [attribute_recall(a, c) for a, c in zip(texts, contents)] for name, texts in
              (("base", base), ("adapter", tuned))}
    return {
        "rows": len(rows), "quantize": quantize or "none", "decoding": "greedy",
        "max_new_tokens": EVAL["max_new_tokens"], "eval_seed": SEEDS["eval"],
        "base_recall": round(sum(recall["base"]) / len(rows), 4),
        "adapter_recall": round(sum(recall["adapter"]) / len(rows), 4),
        "seconds": round(seconds, 1),
        "samples": [{"content": c, "base": b, "adapter": a} for c, b, a in list(zip(contents, base, tuned))[:samples]],
    }


def recall_section(result: dict) -> str:
    lines = [RECALL_BEGIN,
             f"Greedy attribute recall on {result['rows']} held-out generated rows (seed {result['eval_seed']}, "
             f"no attribute combination seen in training), base quantized {result['quantize']} as served, "
             f"up to {result['max_new_tokens']} new tokens, THUDM chat prompt:", "",
             "| model | attribute recall |", "|---|---|",
             f"| `{BASE}` alone | {result['base_recall']:.2f} |",
             f"| `{BASE}` + `{ADAPTER}` | {result['adapter_recall']:.2f} |", "",
             "Examples (first rows):", ""]
    for s in result["samples"][:3]:
        lines += [f"- `{s['content']}`", f"  - base: {s['base']!r}", f"  - adapter: {s['adapter']!r}"]
    lines += ["", f"Reproduce: `python scripts/eval_demo.py` ({result['seconds']} s on the build machine).", RECALL_END]
    return "\n".join(lines)


def write_recall(result: dict, cards: list[Path]) -> None:
    """Replace the recall block of each model card (between the recall markers)."""
    section = recall_section(result)
    pattern = re.compile(re.escape(RECALL_BEGIN) + ".*?" + re.escape(RECALL_END), re.S)
    for card in cards:
        text = card.read_text(encoding="utf-8")
        if RECALL_BEGIN not in text:
            raise ValueError(f"{card} has no {RECALL_BEGIN} block")
        card.write_text(pattern.sub(lambda _: section, text), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, default=ROOT / "checkpoints" / BASE)
    p.add_argument("--adapter", type=Path, default=ROOT / "checkpoints" / ADAPTER)
    p.add_argument("--rows", type=int, default=EVAL["rows"])
    p.add_argument("--quantize", default=EVAL["quantize"], help="int8 (as served), int4 or none")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true", help="update recall.json and the model cards")
    a = p.parse_args(argv)
    result = evaluate(a.base, a.adapter, held_out_rows(a.rows), quantize=None if a.quantize == "none" else a.quantize,
                      threads=a.threads)
    print(f"attribute recall on {result['rows']} held-out rows ({result['quantize']}, greedy): "
          f"base {result['base_recall']:.3f}, adapter {result['adapter_recall']:.3f} ({result['seconds']} s)")
    if a.write:
        (a.adapter / "recall.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        write_recall(result, [a.base / "README.md", a.adapter / "README.md"])


if __name__ == "__main__":
    main()
