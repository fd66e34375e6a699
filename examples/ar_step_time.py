"""Median AR step time of several artifacts, run interleaved so each sees the same machine load
(ONNX Runtime, 1 thread; prompt: 20 token ids; steps after the first token, prefill excluded).

    python examples/ar_step_time.py ART_FP32 ART_INT4 ART_INT8 [--repeats 6] [--tokens 24]
"""

from __future__ import annotations

import argparse
import statistics

from nemocompile.runtime import Runtime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--tokens", type=int, default=24)
    a = p.parse_args()
    runtimes = [Runtime.load(path, threads=1) for path in a.artifacts]
    prompt = list(range(100, 120))
    times: dict[str, list[float]] = {path: [] for path in a.artifacts}
    for _ in range(a.repeats):
        for path, rt in zip(a.artifacts, runtimes):
            r = rt.generate(prompt, mode="ar", max_new_tokens=a.tokens, eos=-1)
            times[path].append((r.stats.wall_s - r.stats.time_to_first_token_s) / (len(r.tokens) - 1))
    base = statistics.median(times[a.artifacts[0]])
    for path, rt in zip(a.artifacts, runtimes):
        med = statistics.median(times[path])
        print(f"{path}: {rt.manifest.weight_precision:>5} AR step median {med * 1e3:.1f} ms, min "
              f"{min(times[path]) * 1e3:.1f} ms, {1 / med:.1f} tok/s, {base / med:.2f}x the first")
        rt.close()


if __name__ == "__main__":
    main()
