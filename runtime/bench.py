"""`nemocompile bench`: every mode of one or more artifacts, on the compiled and the eager
backend side by side, over a prompt set.

For each configuration (backend, mode, block length, threshold) every prompt is
decoded greedily; the backends alternate prompt by prompt so both see the same
machine load, and every ratio (speedup over AR, ONNX Runtime over eager) comes
from one run. Rows aggregate over prompts: tokens/s = tokens / wall seconds,
tokens per forward = tokens / forwards, overhead share = runtime seconds /
wall seconds (spec counting; see runtime/stats.py).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

from nemocompile.errors import NemocompileError
from nemocompile.prompts_file import read_prompts_file

from .runtime import Runtime

DEFAULT_DIFFUSION_THRESHOLDS = (0.9, 0.7)
DEFAULT_LINEAR_SPEC_THRESHOLDS = (0.0,)


def default_prompts_file() -> Path:
    return Path(str(resources.files("nemocompile") / "assets" / "heldout_prompts.txt"))


def load_prompts(path: str | Path | None = None, limit: int | None = None) -> list:
    """Prompts from a prompts file (nemocompile/prompts_file.py: JSON lines of {"prompt": text} or
    {"ids": [token ids]}, or plain text lines; the format `parity --prompts` reads) or the built-in
    held-out code prompts."""
    path = Path(path) if path is not None else default_prompts_file()
    if not path.is_file():
        raise NemocompileError(f"{path}: no such prompt file" + (
            "; the built-in prompt set ships with the embedded model (pass --prompts FILE)"
            if path == default_prompts_file() else ""))
    prompts = read_prompts_file(path)
    return prompts[:limit] if limit else prompts


@dataclass
class Row:
    """One configuration, aggregated over the prompt set."""

    backend: str
    mode: str
    block_length: int | None
    threshold: float | None
    artifact: str
    model: str  # the artifact's config hash: AR rows of the same model are every mode's baseline
    prompts: int = 0
    generated_tokens: int = 0
    forwards: int = 0
    verifies: int = 0
    accepted: int = 0
    wall_s: float = 0.0
    graph_s: float = 0.0
    cpu_overhead_weighted: float = 0.0  # sum of overhead_cpu_share * wall_s
    ttft_sum: float = 0.0
    tokens: list = field(default_factory=list, repr=False)  # per prompt, to compare backends

    def add(self, result) -> None:
        s = result.stats
        self.prompts += 1
        self.generated_tokens += s.generated_tokens
        self.forwards += s.forwards
        self.verifies += len(s.acceptance_lengths)
        self.accepted += sum(s.acceptance_lengths)
        self.wall_s += s.wall_s
        self.graph_s += s.graph_s
        self.cpu_overhead_weighted += s.overhead_cpu_share * s.wall_s
        self.ttft_sum += s.time_to_first_token_s or 0.0
        self.tokens.append(result.tokens)

    def to_dict(self) -> dict:
        wall = self.wall_s or float("nan")
        return {
            "backend": self.backend, "mode": self.mode, "block_length": self.block_length,
            "threshold": self.threshold, "artifact": self.artifact, "model": self.model, "prompts": self.prompts,
            "generated_tokens": self.generated_tokens, "forwards": self.forwards,
            "tokens_per_second": self.generated_tokens / wall,
            "tokens_per_forward": self.generated_tokens / self.forwards if self.forwards else 0.0,
            "acceptance_length": self.accepted / self.verifies if self.verifies else None,
            "time_to_first_token_s": self.ttft_sum / self.prompts if self.prompts else None,
            "overhead_share": (self.wall_s - self.graph_s) / wall,
            "overhead_cpu_share": self.cpu_overhead_weighted / wall,
            "wall_s": self.wall_s, "graph_s": self.graph_s,
        }


def grid(runtime: Runtime, diffusion_thresholds: Sequence, linear_spec_thresholds: Sequence):
    """(mode, block_length, threshold) for every mode the artifact has."""
    out = []
    for mode in runtime.modes:
        if mode == "ar":
            out.append(("ar", None, None))
        for L in runtime.block_lengths if mode != "ar" else ():
            thresholds = diffusion_thresholds if mode == "diffusion" else linear_spec_thresholds
            out += [(mode, L, t) for t in thresholds]
    return out


def run_bench(artifacts: Sequence[str | Path], prompts: list, backends: Sequence[str] = ("onnxruntime", "torch"),
              max_new_tokens: int = 64, diffusion_thresholds: Sequence = DEFAULT_DIFFUSION_THRESHOLDS,
              linear_spec_thresholds: Sequence = DEFAULT_LINEAR_SPEC_THRESHOLDS, model=None,
              threads: int | None = None, eos: int | None = None,
              progress: Callable[[str], None] | None = None) -> dict:
    """Benchmark every configuration; returns {"results": [row dicts], "summary": {...}}."""
    say = progress or (lambda msg: None)
    rows: list[dict] = []
    for artifact in artifacts:
        runtimes = {}
        for b in backends:
            options = {"threads": threads} if threads else {}
            if b == "torch" and model is not None:
                options["model"] = model
            say(f"loading {artifact} on {b}")
            runtimes[b] = Runtime.load(artifact, backend=b, **options)
        first = runtimes[backends[0]]
        encoded = [_fit(first, p, max_new_tokens) for p in prompts]
        for rt in runtimes.values():  # warm-up: first runs pay for allocations and thread pools
            for mode, L, t in grid(first, diffusion_thresholds, linear_spec_thresholds):
                rt.generate(encoded[0], mode=mode, block_length=L, threshold=t, max_new_tokens=8, eos=eos)
        for mode, L, t in grid(first, diffusion_thresholds, linear_spec_thresholds):
            acc = {b: Row(b, mode, L, t, str(artifact), first.manifest.config_hash) for b in backends}
            for ids in encoded:
                for b in backends:  # alternate backends prompt by prompt: same machine load for both
                    acc[b].add(runtimes[b].generate(ids, mode=mode, block_length=L, threshold=t,
                                                    max_new_tokens=max_new_tokens, eos=eos))
            for b in backends:
                row = acc[b].to_dict()
                row["tokens_equal_eager"] = acc[b].tokens == acc["torch"].tokens if "torch" in acc else None
                rows.append(row)
                say(_line(row))
        for rt in runtimes.values():
            rt.close()
    _add_speedups(rows)
    return {"results": rows, "summary": summarize(rows)}


def _fit(runtime: Runtime, prompt, max_new_tokens: int) -> list[int]:
    """Token ids, cut from the left so prompt + new tokens + one block fit the cache."""
    ids = runtime.encode(prompt)[0][0]
    room = runtime.capacity - max_new_tokens - max(runtime.block_lengths or [0])
    if room < 1:
        raise NemocompileError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the cache "
                               f"(capacity {runtime.capacity}); lower --max-new-tokens")
    return ids[-room:]


def _add_speedups(rows: list[dict]) -> None:
    """speedup_vs_ar: tokens/s over the same backend's AR on the same model (AR does not depend
    on the block length, so one artifact with AR serves every block length), in this run."""
    ar = {}
    for r in rows:
        if r["mode"] == "ar":
            ar.setdefault((r["backend"], r["model"]), r["tokens_per_second"])
    eager = {(r["mode"], r["block_length"], r["threshold"], r["artifact"]): r["tokens_per_second"]
             for r in rows if r["backend"] == "torch"}
    for r in rows:
        base = ar.get((r["backend"], r["model"]))
        r["speedup_vs_ar"] = r["tokens_per_second"] / base if base else None
        e = eager.get((r["mode"], r["block_length"], r["threshold"], r["artifact"]))
        r["speedup_vs_eager"] = r["tokens_per_second"] / e if e else None


def summarize(rows: list[dict]) -> dict:
    """The issue's targets, read off the rows."""
    ort = [r for r in rows if r["backend"] == "onnxruntime"]
    out: dict = {}
    if ort:
        modes = list(dict.fromkeys(r["mode"] for r in ort))
        out["max_overhead_share_by_mode"] = {m: max(r["overhead_share"] for r in ort if r["mode"] == m)
                                             for m in modes}
        out["max_overhead_cpu_share_by_mode"] = {m: max(r["overhead_cpu_share"] for r in ort if r["mode"] == m)
                                                 for m in modes}
        ar = [r for r in ort if r["mode"] == "ar"]
        if ar and ar[0]["speedup_vs_eager"] is not None:
            out["onnxruntime_over_eager_ar"] = ar[0]["speedup_vs_eager"]
        eager = {(r["mode"], r["block_length"], r["threshold"], r["artifact"]): r for r in rows
                 if r["backend"] == "torch"}
        pairs = [(r, eager.get((r["mode"], r["block_length"], r["threshold"], r["artifact"]))) for r in ort]
        pairs = [(a, b) for a, b in pairs if b is not None]
        if pairs:
            out["tokens_per_forward_equal_eager"] = all(a["tokens_per_forward"] == b["tokens_per_forward"]
                                                        for a, b in pairs)
            out["tokens_equal_eager"] = all(a["tokens_equal_eager"] for a, _ in pairs)
        ls = [r for r in ort if r["mode"] == "linear-spec"]
        if ls:
            best = max(ls, key=lambda r: r["tokens_per_second"])
            out["linear_spec_best_block_length"] = best["block_length"]
            out["linear_spec_speedup_vs_ar"] = best["speedup_vs_ar"]
            out["linear_spec_acceptance_length"] = best["acceptance_length"]
    return out


# (row key, header, width, format of a present value); None prints as "-"
COLUMNS = (
    ("backend", "backend", -11, "{}"), ("mode", "mode", -11, "{}"), ("block_length", "block", 5, "{}"),
    ("threshold", "thr", 5, "{:g}"), ("tokens_per_second", "tok/s", 8, "{:.1f}"),
    ("tokens_per_forward", "tok/fw", 6, "{:.2f}"), ("acceptance_length", "accept", 6, "{:.2f}"),
    ("time_to_first_token_s", "ttft_ms", 8, "{:.1f}"), ("overhead_share", "ovhd", 6, "{:.1%}"),
    ("overhead_cpu_share", "ovhd_cpu", 8, "{:.1%}"), ("speedup_vs_ar", "x_ar", 6, "{:.2f}"),
    ("speedup_vs_eager", "x_eager", 7, "{:.2f}"),
)


def _line(row: dict) -> str:
    cells = []
    for key, _, width, fmt in COLUMNS:
        value = row.get(key)
        if key == "time_to_first_token_s" and value is not None:
            value *= 1e3
        text = "-" if value is None else fmt.format(value)
        cells.append(text.ljust(-width) if width < 0 else text.rjust(width))
    return " ".join(cells)


def format_table(report: dict) -> str:
    head = " ".join(h.ljust(-w) if w < 0 else h.rjust(w) for _, h, w, _ in COLUMNS)
    lines = [head, "-" * len(head)] + [_line(r) for r in report["results"]]
    s = report.get("summary", {})
    if s:
        lines.append("")
        if "max_overhead_share_by_mode" in s:
            lines.append("runtime overhead (onnxruntime, worst config per mode, wall / cpu): " + ", ".join(
                f"{m} {v:.1%} / {s['max_overhead_cpu_share_by_mode'][m]:.1%}"
                for m, v in s["max_overhead_share_by_mode"].items()))
        if "onnxruntime_over_eager_ar" in s:
            lines.append(f"onnxruntime / eager tokens/s in AR: {s['onnxruntime_over_eager_ar']:.2f}x")
        if "tokens_per_forward_equal_eager" in s:
            lines.append(f"tokens per forward equal to eager: {s['tokens_per_forward_equal_eager']}; "
                         f"tokens equal: {s['tokens_equal_eager']}")
        if "linear_spec_best_block_length" in s:
            speedup = s["linear_spec_speedup_vs_ar"]
            lines.append(f"linear-spec: fastest block length {s['linear_spec_best_block_length']}, "
                         + (f"{speedup:.2f}x AR tokens/s, " if speedup is not None else "no AR run to compare, ")
                         + f"acceptance length {s['linear_spec_acceptance_length']:.2f}")
    return "\n".join(lines)


def require_matplotlib():
    """matplotlib, or a clear error (callers check this before benchmarking)."""
    try:
        import matplotlib
    except ImportError:
        raise NemocompileError("--plot needs matplotlib: pip install 'nemocompile[plot]'") from None
    return matplotlib


def plot(report: dict, path: str | Path) -> None:
    """Tokens/s and tokens per forward per configuration, grouped by mode."""
    matplotlib = require_matplotlib()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    labels = list(dict.fromkeys(_label(r) for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(labels)), 4.5))
    width = 0.8 / max(len(backends), 1)
    for ax, key, title in ((axes[0], "tokens_per_second", "tokens / s"),
                           (axes[1], "tokens_per_forward", "tokens per forward")):
        for i, b in enumerate(backends):
            values = {_label(r): r[key] for r in rows if r["backend"] == b}
            xs = [j + i * width for j in range(len(labels))]
            ax.bar(xs, [values.get(lab, 0) for lab in labels], width, label=b)
        ax.set_xticks([j + width * (len(backends) - 1) / 2 for j in range(len(labels))])
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _label(r: dict) -> str:
    if r["mode"] == "ar":
        return "ar"
    return f"{r['mode']} B={r['block_length']} t={r['threshold']}"


def write_json(report: dict, path: str | Path) -> None:
    """Written to a temporary sibling then renamed: a failed write leaves no half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise NemocompileError(f"--json {path}: cannot write it ({e.strerror})") from None


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
