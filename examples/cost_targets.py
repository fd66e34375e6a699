"""What a forward costs against what is in flight (issue 23's targets), measured in one run with the
artifacts taking turns, so machine load weighs on all alike (ONNX Runtime, 1 thread by default).

1. AR ms/token with a ~256-token context on an artifact of a small capacity (``--small``, e.g.
   ``--max-seq-len 512``) and of a large one (``--large``, e.g. 16384): the ratio should be near 1,
   since a forward reads only the slots its rows hold.
2. One request on a batch-N artifact (``--batched``) against the batch-1 ``--small``: tok/s ratio in
   ar and linear-spec (where the batched artifact has it), near 1 since a forward runs only the rows
   in flight.

    nemocompile export --mode ar,linear-spec --max-seq-len 512 --out /tmp/c512 --force
    nemocompile export --mode ar --max-seq-len 16384 --out /tmp/c16k --force
    nemocompile export --mode ar,linear-spec --max-seq-len 512 --batch-size 8 --out /tmp/c512b8 --force
    python examples/cost_targets.py --small /tmp/c512 --large /tmp/c16k --batched /tmp/c512b8
"""

from __future__ import annotations

import argparse
import statistics

from nemocompile.runtime import Runtime


def step_ms(rt: Runtime, prompt: list[int], mode: str, tokens: int) -> float:
    """Milliseconds per generated token after the first (prefill excluded)."""
    r = rt.generate(prompt, mode=mode, max_new_tokens=tokens, eos=-1)
    return (r.stats.wall_s - r.stats.time_to_first_token_s) / max(len(r.tokens) - 1, 1) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", required=True, help="batch-1 artifact of a small capacity (the baseline)")
    p.add_argument("--large", help="batch-1 artifact of a large capacity")
    p.add_argument("--batched", help="an artifact exported with --batch-size N > 1")
    p.add_argument("--context", type=int, default=256, help="prompt tokens (default 256)")
    p.add_argument("--tokens", type=int, default=24, help="tokens generated per timing (default 24)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    runtimes = {"small": Runtime.load(a.small, threads=a.threads)}
    if a.large:
        runtimes["large"] = Runtime.load(a.large, threads=a.threads)
    if a.batched:
        runtimes["batched"] = Runtime.load(a.batched, threads=a.threads)
    vocab = runtimes["small"].vocab_size
    prompt = [100 + (7 * i) % (vocab - 200) for i in range(a.context - 8)]
    cases = [("small", "ar"), ("large", "ar"), ("batched", "ar"), ("small", "linear-spec"), ("batched", "linear-spec")]
    cases = [(name, mode) for name, mode in cases if name in runtimes and mode in runtimes[name].modes]
    times: dict = {case: [] for case in cases}
    for case in cases:  # warm up: first runs bind buffers and fault pages in
        step_ms(runtimes[case[0]], prompt, case[1], 4)
    for _ in range(a.repeats):
        for case in cases:
            times[case].append(step_ms(runtimes[case[0]], prompt, case[1], a.tokens))
    med = {case: statistics.median(t) for case, t in times.items()}
    for (name, mode), ms in med.items():
        rt = runtimes[name]
        base = med[("small", mode)]
        print(f"{mode:<12} {name:<8} C={rt.capacity:<6} batch={rt.batch_size:<2} {ms:7.2f} ms/token  "
              f"{1e3 / ms:7.1f} tok/s  {ms / base:5.2f}x the time of C={runtimes['small'].capacity} batch 1")
    for rt in runtimes.values():
        rt.close()


if __name__ == "__main__":
    main()
