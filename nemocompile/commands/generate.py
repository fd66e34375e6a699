"""`nemocompile generate`: one generation with the eager reference decoders."""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    from .common import add_decode_args, add_model_arg

    p = sub.add_parser("generate", help="generate with the eager PyTorch model (the reference)")
    add_model_arg(p)
    add_decode_args(p)
    p.add_argument("--dtype", default=None, help="fp32 (default), fp16 or bf16")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..decode import generate
    from ..loader import load

    model = load(args.model, dtype=args.dtype)
    result = generate(model, args.prompt, mode=args.mode, max_new_tokens=args.max_new_tokens,
                      block_length=args.block_length, threshold=args.threshold,
                      temperature=args.temperature, seed=args.seed, chat=args.chat)
    if args.json:
        print(json.dumps({"text": result.text, "tokens": result.tokens, "stats": result.stats.to_dict()}))
    else:
        print(result.text)
        print(f"[{result.stats.summary()}]", file=sys.stderr)  # as `run` does: stdout holds only the text
    return 0
