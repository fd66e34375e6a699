"""What a generation reports: counts (spec section 3) and where the time went."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from nemocompile.decode.common import GenerationStats


@dataclass
class RuntimeStats(GenerationStats):
    """The eager decoders' counts (``GenerationStats``: ``forwards`` includes the
    prefill, one forward however many prefill-graph calls a long prompt takes:
    see ``graph_calls``) plus where the time went.

    Times are seconds of one sequence from its submission to its last commit
    (``queue_s`` of it waiting for a free row); ``graph_s`` sums the backend's
    executions of the steps it took part in (shared with the other rows of each
    step) and ``runtime_s`` is everything else (host work, other rows' steps). ``overhead_share``
    is runtime_s / wall_s; ``overhead_cpu_share`` the same ratio in CPU seconds.
    """

    backend: str = ""
    graph_calls: int = 0  # backend executions (chunked prefills count each chunk)
    acceptance_histogram: dict[int, int] = field(default_factory=dict)  # n -> verifies that accepted n
    batch_size: int = 1  # prompts decoded together
    rows_per_forward: float = 0.0  # mean rows of the forwards this sequence took part in (a forward runs the rows in flight)
    time_to_first_token_s: float | None = None
    wall_s: float = 0.0
    graph_s: float = 0.0
    runtime_s: float = 0.0
    overhead_share: float = 0.0  # runtime_s / wall_s
    # the same split in process CPU time: unlike wall time it does not charge the runtime for
    # moments the OS gave the core to another process (a busy, shared machine)
    overhead_cpu_share: float = 0.0
    tokens_per_second: float = 0.0  # this row's tokens / wall_s
    queue_s: float = 0.0  # waiting for a free row (included in wall_s and time_to_first_token_s)
    cached_prompt_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (not prefilled)
    mode_mix: dict[str, int] = field(default_factory=dict)  # decode cycles run per mode (auto: its choices)
    auto_reason: str | None = None  # mode "auto": why the last cycle's mode was chosen

    def finish(self, generated: int) -> "RuntimeStats":
        super().finish(generated)
        if self.acceptance_lengths:
            self.acceptance_histogram = dict(sorted(Counter(self.acceptance_lengths).items()))
        self.tokens_per_second = generated / self.wall_s if self.wall_s > 0 else 0.0
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["acceptance_histogram"] = {str(k): v for k, v in self.acceptance_histogram.items()}
        return d

    def summary(self) -> str:
        s = (f"mode={self.mode} backend={self.backend} tokens={self.generated_tokens} forwards={self.forwards} "
             f"tokens/forward={self.tokens_per_forward:.2f}")
        if self.acceptance_length is not None:
            s += f" acceptance={self.acceptance_length:.2f}"
        ttft = self.time_to_first_token_s
        s += (f" tokens/s={self.tokens_per_second:.1f} ttft={1e3 * ttft:.1f}ms" if ttft is not None else "")
        return s + f" runtime overhead={100 * self.overhead_share:.1f}%"


class StepTimer:
    """Wall clock of one generation and the share spent inside backend calls."""

    __slots__ = ("start", "start_cpu", "graph_s", "graph_cpu_s", "calls", "rows", "first_token")

    def __init__(self, start: float | None = None):
        self.start = time.perf_counter() if start is None else start
        self.start_cpu = time.process_time()
        self.graph_s = 0.0
        self.graph_cpu_s = 0.0
        self.calls = 0
        self.rows = 0  # summed over the calls: the rows each ran
        self.first_token: float | None = None

    def mark_first_token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter() - self.start

    def fill(self, stats: RuntimeStats) -> None:
        wall = time.perf_counter() - self.start
        stats.wall_s = wall
        stats.graph_s = self.graph_s
        stats.graph_calls = self.calls
        stats.rows_per_forward = self.rows / self.calls if self.calls else 0.0
        stats.runtime_s = max(wall - self.graph_s, 0.0)
        stats.overhead_share = stats.runtime_s / wall if wall > 0 else 0.0
        stats.time_to_first_token_s = self.first_token
        cpu = time.process_time() - self.start_cpu
        stats.overhead_cpu_share = min(max(cpu - self.graph_cpu_s, 0.0) / cpu, 1.0) if cpu > 0 else 0.0
