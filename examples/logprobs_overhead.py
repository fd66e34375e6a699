"""What log-probabilities cost: AR tokens/s with ``logprobs=5`` against without, on the
embedded model (issue 24's target: at least 0.9x).

Three runs of the same greedy AR generations:
- ``no-logprobs``: an artifact exported with ``logprobs=False`` (graphs without the top-20 outputs);
- ``off``: the default artifact (graphs return top-20 log-probs), requests without logprobs;
- ``logprobs=5``: the default artifact, every request asking for 5 alternatives per token.

    python examples/logprobs_overhead.py [--tokens 128] [--repeats 5] [--backend onnxruntime] [--device cpu]

Each figure is the median over ``repeats`` generations of ``tokens`` new tokens (EOS ignored).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from nemocompile.graphs.export import export_artifact
from nemocompile.runtime import Runtime

PROMPT = "def fibonacci(n):\n    "


def tokens_per_second(runtime: Runtime, tokens: int, repeats: int, **kw) -> float:
    runtime.generate(PROMPT, max_new_tokens=8, ignore_eos=True, **kw)  # warm up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = runtime.generate(PROMPT, max_new_tokens=tokens, ignore_eos=True, **kw)
        rates.append(len(r.tokens) / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rates = {}
        for name, logprobs in (("no-logprobs", False), ("logprobs graphs", True)):
            out = Path(tmp) / name
            export_artifact(None, out, modes=["ar"], max_seq_len=args.tokens + 64, logprobs=logprobs)
            with Runtime.load(out, backend=args.backend, device=args.device, threads=args.threads) as rt:
                if logprobs:
                    rates["off"] = tokens_per_second(rt, args.tokens, args.repeats)
                    rates["logprobs=5"] = tokens_per_second(rt, args.tokens, args.repeats, logprobs=5)
                else:
                    rates["no-logprobs"] = tokens_per_second(rt, args.tokens, args.repeats)
                device = rt.backend.device
    print(f"AR on the embedded model, {args.backend} ({device}), {args.tokens} tokens, median of {args.repeats}:")
    for name, rate in rates.items():
        print(f"  {name:12s} {rate:8.1f} tok/s  ({rate / rates['no-logprobs']:.3f}x of no-logprobs, "
              f"{rate / rates['off']:.3f}x of off)")


if __name__ == "__main__":
    main()
