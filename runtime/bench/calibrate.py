"""`nemocompile calibrate`: the cost table `mode="auto"` chooses by (runtime/policy.py).

Two measurements on this machine and backend: the median seconds of one forward
of every graph of the artifact at its static batch (on the runtime's own buffers,
the cache half full, as `bench` times steps), and the mean acceptance length of
each self-speculation mode at each block length over a prompt set, decoded
greedily. The second is the prior a request's own acceptance starts from.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Callable, Sequence

from nemocompile.errors import NemocompileError

from nemocompile.runtime.bench.modes import _fit, step_times
from nemocompile.runtime.policy import Acceptance, Choice, CostTable, choose, graph_key
from nemocompile.runtime.runtime import Runtime

SPECULATIVE_MODES = ("linear-spec", "quadratic-spec")


def measure_steps(runtime: Runtime, repeats: int = 20) -> dict[str, float]:
    """``{"step@L": median seconds per forward}`` for every graph the runtime opened: `bench`'s
    step_times over every step (two untimed warm-up forwards each, the cache half full)."""
    steps = {step for step, _ in runtime.io}
    return {graph_key(t["step"], t["block_length"]): t["ms"] / 1e3 for t in step_times(runtime, steps, repeats)}


def measure_acceptance(runtime: Runtime, prompts: Sequence, max_new_tokens: int = 64) -> dict[str, float]:
    """``{"mode@L": mean acceptance length per cycle}`` of every self-speculation mode and block
    length the artifact has, decoded greedily over ``prompts``. Cycles are pooled over prompts
    (the prior is per cycle: a prompt that stopped after two cycles weighs two cycles)."""
    encoded = [_fit(runtime, p, max_new_tokens) for p in prompts]
    out = {}
    for mode in (m for m in SPECULATIVE_MODES if m in runtime.modes):
        for L in runtime.manifest.block_lengths(mode):
            lengths = []
            for ids in encoded:
                lengths += runtime.generate(ids, mode=mode, block_length=L, max_new_tokens=max_new_tokens,
                                            temperature=0.0).stats.acceptance_lengths
            if not lengths:
                raise NemocompileError(f"no {mode} cycle ran at block length {L} over {len(encoded)} prompt(s) "
                                       "(each ended at its first token); raise --max-new-tokens or give other "
                                       "--prompts")
            out[f"{mode}@{L}"] = sum(lengths) / len(lengths)
    return out


def calibrate(runtime: Runtime, prompts: Sequence, repeats: int = 20, max_new_tokens: int = 64,
              threads: int | None = None, progress: Callable[[str], None] | None = None) -> CostTable:
    """Measure the artifact's cost table on ``runtime``'s backend (``threads``: what the runtime
    was loaded with, recorded in the table)."""
    say = progress or (lambda msg: None)
    say(f"timing {len(runtime.io)} graphs ({repeats} forwards each after 2 warm-up)")
    step_s = measure_steps(runtime, repeats)
    say(f"measuring acceptance over {len(prompts)} prompt(s), {max_new_tokens} new tokens each")
    acceptance = measure_acceptance(runtime, prompts, max_new_tokens)
    return CostTable(runtime.backend.name, threads, runtime.batch_size, step_s, acceptance,
                     datetime.now(timezone.utc).isoformat(timespec="seconds"))


def format_table(table: CostTable, choice: Choice | None = None) -> str:
    """The table as `nemocompile calibrate` prints it."""
    threads = table.threads if table.threads is not None else "default"
    lines = [f"cost table: backend {table.backend}, {threads} thread(s), batch {table.batch_size}, "
             f"measured {table.measured_at}", f"  {'graph':<18} {'ms/forward':>10}"]
    lines += [f"  {k:<18} {v * 1e3:10.3f}" for k, v in sorted(table.step_s.items())]
    if table.acceptance:
        lines.append(f"  {'prior':<18} {'tok/cycle':>10}")
        lines += [f"  {k:<18} {v:10.2f}" for k, v in sorted(table.acceptance.items())]
    if choice is not None:
        lines.append(f"auto, one row at the priors: {choice.reason}")
    return "\n".join(lines)


def one_row_choice(table: CostTable, runtime: Runtime) -> Choice | None:
    """What auto would pick for a lone request that has no record of its own yet."""
    options = runtime.auto_options
    return choose(table, options, [Acceptance()]) if options else None
