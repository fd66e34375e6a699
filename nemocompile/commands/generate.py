"""`nemocompile generate`: one generation with the eager reference decoders."""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    from .common import add_decode_args, add_model_arg

    p = sub.add_parser("generate", help="generate with the eager PyTorch model (the reference)")
    add_model_arg(p)
    add_decode_args(p)
    p.add_argument("--dtype", default=None,
                   help="fp32, fp16 or bf16 (default: the checkpoint's torch_dtype, else fp32)")
    p.add_argument("--draft-groups", type=int, default=None, metavar="G",
                   help="quadratic-spec: draft for the first G acceptance points only (default: all)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..decode import generate
    from nemocompile.model.loader import load
    from .common import chat_options, sampling_options

    from ..progress import Heartbeat, counting_forwards

    model = load(args.model, dtype=args.dtype)
    count, unhook = counting_forwards(model)
    try:  # a long eager run (quadratic-spec's wide fused step on a CPU) says it is alive on stderr
        with Heartbeat(f"generating ({args.mode})", count=count):
            result = generate(model, args.prompt, mode=args.mode, max_new_tokens=args.max_new_tokens,
                              block_length=args.block_length, threshold=args.threshold,
                              temperature=args.temperature, seed=args.seed, draft_groups=args.draft_groups,
                              max_thinking_tokens=args.max_thinking_tokens,
                              end_think_token_id=args.end_think_token_id, **chat_options(args),
                              **sampling_options(args))
    finally:
        unhook()
    if args.json:
        print(json.dumps({"text": result.text, "tokens": result.tokens, "stats": result.stats.to_dict()}))
    else:
        print(result.text)
        print(f"[{result.stats.summary()}]", file=sys.stderr)  # as `run` does: stdout holds only the text
    return 0
