"""`python -m chatglm`: a terminal chat like THUDM's cli_demo ("clear" resets, "stop" exits)."""
from __future__ import annotations

import argparse
import sys

import torch

from .chat import stream_chat
from .checkpoint import load_model, load_prefix
from .tokenizer import ChatGLMTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WELCOME = "ChatGLM2 terminal chat. Type a message; 'clear' resets the history, 'stop' exits."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chatglm", description=__doc__)
    p.add_argument("--model", required=True, help="a chatglm2 folder (config.json, weights, tokenizer.model)")
    p.add_argument("--ptuning-checkpoint", help="a P-Tuning v2 checkpoint folder to apply")
    p.add_argument("--quantize", choices=["int8", "int4"], help="quantize the base at load")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--greedy", action="store_true", help="deterministic answers (no sampling)")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)

    model = load_model(args.model, dtype=DTYPES[args.dtype], quantize=args.quantize)
    tokenizer = ChatGLMTokenizer.from_folder(args.model)
    prefix = load_prefix(args.ptuning_checkpoint, model.config) if args.ptuning_checkpoint else None
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    interactive = sys.stdin.isatty()
    history: list[tuple[str, str]] = []
    if interactive:
        print(WELCOME)
    while True:
        try:
            query = input("\n用户：" if interactive else "")
        except EOFError:
            return 0
        query = query.strip()
        if query == "stop":
            return 0
        if query == "clear":
            history = []
            if interactive:
                print(WELCOME)
            continue
        if not query:
            continue
        if interactive:
            print("\nChatGLM：", end="", flush=True)
        shown = ""
        for response, history in stream_chat(model, tokenizer, query, history, prefix=prefix,
                                             do_sample=not args.greedy, max_new_tokens=args.max_new_tokens,
                                             temperature=args.temperature, top_p=args.top_p, generator=generator):
            if interactive and response.startswith(shown):
                print(response[len(shown):], end="", flush=True)
                shown = response
        print("" if interactive else history[-1][1], flush=True)


if __name__ == "__main__":
    sys.exit(main())
