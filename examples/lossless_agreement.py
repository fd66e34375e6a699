"""How often each lossless mode reproduces AR greedy, token for token, per dtype.

    python examples/lossless_agreement.py --dtypes fp32,bf16 --max-new-tokens 32

Runs the eager decoders (``nemocompile.generate``) of the embedded tiny model (or
``--model DIR``) on the held-out prompts (``nemocompile/assets/heldout_prompts.txt``)
greedy, in ar, linear-spec (one-shot draft) and quadratic-spec, and prints per dtype
and mode how many prompts' outputs equal AR's, and for those that differ the first
output index that differs. At fp32 the modes are exact (spec: lossless). At bf16 or
fp16 a verify forward over a whole block rounds its matmuls differently from AR's
one-token forward, so a near tie between the two best tokens can flip: the output is
then a different, equally greedy-plausible continuation from that index on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import nemocompile
from nemocompile.runtime.bench.modes import load_prompts


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny model)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, fp16, bf16")
    ap.add_argument("--modes", default="linear-spec,quadratic-spec")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--block-length", type=int, default=None, help="default: the config's block_size")
    ap.add_argument("--limit", type=int, default=None, help="first N prompts (default: all 24)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, metavar="FILE")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prompts = load_prompts(None, args.limit)
    report = {"max_new_tokens": args.max_new_tokens, "prompts": len(prompts), "results": {}}
    for dtype in args.dtypes.split(","):
        model = nemocompile.load(args.model, dtype=dtype)
        kw = dict(max_new_tokens=args.max_new_tokens, eos_token_id=-1, temperature=0.0,
                  block_length=args.block_length)
        ar = [nemocompile.generate(model, p["prompt"] if isinstance(p, dict) else p, mode="ar", **kw).tokens
              for p in prompts]
        for mode in args.modes.split(","):
            t0 = time.perf_counter()
            diffs = []
            for p, ref in zip(prompts, ar):
                got = nemocompile.generate(model, p["prompt"] if isinstance(p, dict) else p, mode=mode, **kw).tokens
                diffs.append(first_difference(got, ref))
            same = sum(d is None for d in diffs)
            report["results"][f"{dtype} {mode}"] = {"agree": same, "of": len(prompts),
                                                    "first_difference": [d for d in diffs if d is not None]}
            print(f"{dtype:<5} {mode:<15} {same}/{len(prompts)} equal AR greedy; first differing output index: "
                  f"{sorted(d for d in diffs if d is not None) or '-'} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
