"""The prefix cache's two targets (issue 26), ONNX Runtime, 1 thread:

1. time to first token of a 400-token prompt whose first 384 tokens an earlier request
   served (the previous turn of one conversation), against the same prompt cold (the
   cache cleared): <= 0.35x, same tokens. Also the same 400 tokens sent again.
2. a multiple-choice item as lm-eval sends it: one 300-token context and 4 short
   continuations, 4 requests of one token each (plain, and with echo + logprobs as
   lm-eval's loglikelihood asks): prompt tokens computed with the cache <= 0.35x of
   those computed without it, same tokens.

    python -m nemocompile export --max-seq-len 1024 --out ART      # the embedded model
    python examples/prefix_cache_targets.py ART [--repeats 5]

TTFT is each request's ``stats.time_to_first_token_s``; cold and warm runs take turns
(``--repeats`` rounds) and the medians are compared, so both see the same machine load.
"""

from __future__ import annotations

import argparse
import statistics

from nemocompile.runtime import Runtime
from nemocompile.runtime.bench.modes import load_prompts


def tokens_of(rt: Runtime, n: int, skip: int = 0) -> list[int]:
    """``n`` token ids of real text: the built-in held-out prompts one after another."""
    text = "\n".join(p for p in load_prompts() if isinstance(p, str))
    ids = rt.tokenizer.encode(text) if rt.tokenizer is not None else list(range(3, 1000))
    ids = ids[skip:] * (n // max(len(ids) - skip, 1) + 2)
    return ids[:n]


def ttft_target(rt: Runtime, repeats: int, prompt_len: int = 400, served: int = 384) -> dict:
    prompt = tokens_of(rt, prompt_len)
    cold, turn, again, same = [], [], [], True
    reference = None
    for _ in range(repeats):
        rt.prefix.clear()
        r = rt.generate(prompt, max_new_tokens=8, eos=-1)
        assert r.stats.cached_prompt_tokens == 0
        cold.append(r.stats.time_to_first_token_s)
        reference = r.tokens
        rt.prefix.clear()
        rt.generate(prompt[:served], max_new_tokens=8, eos=-1)  # the previous turn
        r = rt.generate(prompt, max_new_tokens=8, eos=-1)
        turn.append((r.stats.time_to_first_token_s, r.stats.cached_prompt_tokens))
        same &= r.tokens == reference
        r = rt.generate(prompt, max_new_tokens=8, eos=-1)  # the very same prompt again
        again.append((r.stats.time_to_first_token_s, r.stats.cached_prompt_tokens))
        same &= r.tokens == reference
    c = statistics.median(cold)
    t = statistics.median(s for s, _ in turn)
    a = statistics.median(s for s, _ in again)
    return {"prompt_tokens": prompt_len, "cold_ttft_s": c, "prefix_served_ttft_s": t, "ratio": t / c,
            "reused_tokens": turn[0][1], "same_prompt_ttft_s": a, "same_prompt_ratio": a / c,
            "same_prompt_reused_tokens": again[0][1], "same_tokens": same, "cold_runs_s": cold,
            "prefix_served_runs_s": [s for s, _ in turn]}


def multiple_choice_target(rt: Runtime, context_len: int = 300, echo: bool = False) -> dict:
    """``echo``: as lm-eval's loglikelihood asks (echo, logprobs 1, max_tokens 1), every prompt
    token scored; else plain one-token generations."""
    context = tokens_of(rt, context_len)
    continuations = [tokens_of(rt, n, skip=7 * i + 500) for i, n in enumerate((3, 5, 2, 4))]
    prompts = [context + c for c in continuations]
    kw = dict(max_new_tokens=1, eos=-1, **({"echo": True, "logprobs": 1} if echo else {}))
    rt.prefix.clear()
    warm = [rt.generate(p, **kw) for p in prompts]
    cold = []
    for p in prompts:
        rt.prefix.clear()
        cold.append(rt.generate(p, **kw))
    total = sum(map(len, prompts))
    computed = sum(len(p) - r.stats.cached_prompt_tokens for p, r in zip(prompts, warm))
    return {"prompt_tokens": total, "computed_with_cache": computed, "computed_without": total,
            "ratio": computed / total, "cached_per_request": [r.stats.cached_prompt_tokens for r in warm],
            "same_tokens": [r.tokens for r in warm] == [r.tokens for r in cold],
            "prompt_logprob_max_diff": max((abs(a.logprob - b.logprob) for w, c in zip(warm, cold)
                                            for a, b in zip(w.prompt_logprobs or [], c.prompt_logprobs or [])
                                            if a.logprob is not None), default=0.0),
            "wall_s_with_cache": sum(r.stats.wall_s for r in warm), "wall_s_without": sum(r.stats.wall_s for r in cold)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    with Runtime.load(a.artifact, threads=1, modes=["ar"]) as rt:
        rt.generate(tokens_of(rt, 400), max_new_tokens=2, eos=-1)  # warm-up: allocations, thread pools
        t = ttft_target(rt, a.repeats)
        print(f"1. TTFT, {t['prompt_tokens']}-token prompt, median of {a.repeats}: cold {t['cold_ttft_s'] * 1e3:.1f} ms; "
              f"its first {t['reused_tokens']} tokens served before {t['prefix_served_ttft_s'] * 1e3:.1f} ms = "
              f"{t['ratio']:.3f}x (target <= 0.35); the same prompt again ({t['same_prompt_reused_tokens']} reused) "
              f"{t['same_prompt_ttft_s'] * 1e3:.1f} ms = {t['same_prompt_ratio']:.3f}x; same tokens: {t['same_tokens']}")
        for echo in (False, True):
            m = multiple_choice_target(rt, echo=echo)
            how = "echo + logprobs (lm-eval's loglikelihood)" if echo else "one-token generations"
            print(f"2. multiple choice (300-token context, 4 continuations, {how}): prompt tokens computed "
                  f"{m['computed_with_cache']} with the cache vs {m['computed_without']} without = "
                  f"{m['ratio']:.3f}x (target <= 0.35); reused per request {m['cached_per_request']}; same tokens: "
                  f"{m['same_tokens']}; prompt log-probs differ by at most {m['prompt_logprob_max_diff']:.1e}; "
                  f"wall {m['wall_s_with_cache'] * 1e3:.0f} ms vs {m['wall_s_without'] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
