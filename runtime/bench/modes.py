"""`nemocompile bench`: every mode of one or more artifacts, on the compiled and the eager
backend side by side, over a prompt set.

For each configuration (backend, mode, block length, threshold) every prompt is
decoded greedily; the backends alternate prompt by prompt so both see the same
machine load, and every ratio (speedup over AR, ONNX Runtime over eager) comes
from one run. Rows aggregate over prompts: tokens/s = tokens / wall seconds,
tokens per forward = tokens / forwards, overhead share = runtime seconds /
wall seconds (spec counting; see runtime/stats.py). Memory per artifact:
weights = its precision (the export dtype, or int4/int8 for quantized weights),
weight_bytes = the bytes of weights its graphs read (the shared weights file),
peak_rss_bytes = the process's peak resident memory while that artifact was
loaded and run (Linux: the high-water mark is reset before each artifact).
Backends that cannot run an artifact's weights (torch for int4/int8) are
skipped for it, with a progress line saying so.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

from nemocompile.errors import NemocompileError
from nemocompile.artifact.manifest import Manifest
from nemocompile.text.prompts_file import read_prompts_file

from nemocompile.runtime.runtime import Runtime
from nemocompile.runtime.timing import median_forward_s

DEFAULT_DIFFUSION_THRESHOLDS = (0.9, 0.7)
DEFAULT_LINEAR_SPEC_THRESHOLDS = (0.0,)


def default_prompts_file() -> Path:
    return Path(str(resources.files("nemocompile") / "assets" / "heldout_prompts.txt"))


def load_prompts(path: str | Path | None = None, limit: int | None = None) -> list:
    """Prompts from a prompts file (nemocompile/text/prompts_file.py: JSON lines of {"prompt": text} or
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
    graph_calls: int = 0
    forward_rows: float = 0.0  # summed over the graph calls: the rows each ran (its batch size)
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
        self.graph_calls += s.graph_calls
        self.forward_rows += s.rows_per_forward * s.graph_calls
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
            "rows_per_forward": self.forward_rows / self.graph_calls if self.graph_calls else None,
            "wall_s": self.wall_s, "graph_s": self.graph_s,
        }


def grid(runtime: Runtime, diffusion_thresholds: Sequence, linear_spec_thresholds: Sequence):
    """(mode, block_length, threshold) for every mode the artifact has."""
    thresholds = {"ar": (None,), "diffusion": diffusion_thresholds, "linear-spec": linear_spec_thresholds,
                  "quadratic-spec": (None,)}
    out = []
    for mode in runtime.modes:
        for L in runtime.manifest.block_lengths(mode) if mode != "ar" else (None,):
            out += [(mode, L, t) for t in thresholds[mode]]
    return out


def step_times(runtime: Runtime, steps: Sequence[str] = ("verify", "verify_draft"), repeats: int = 20) -> list[dict]:
    """Median milliseconds per forward of each of ``steps`` at each of its block lengths, with
    the cache half full: what the fused step's B x (B+1) rows cost against a plain verify."""
    graphs = [g for g in runtime.manifest.graphs if g.step in steps]

    def half_full(key) -> None:
        runtime.cache.reset(length=(runtime.capacity - key[1]) // 2)

    with runtime.exclusive():
        medians = median_forward_s(runtime, [(g.step, g.block_length) for g in graphs], repeats, warmup=2,
                                   prepare=half_full)
    return [{"step": g.step, "block_length": g.block_length, "tokens": _tokens(g),
             "ms": medians[(g.step, g.block_length)] * 1e3} for g in graphs]


def _tokens(graph) -> int:
    from nemocompile.model.layout import Layout

    return Layout.from_dict(graph.layout).tokens


def run_bench(artifacts: Sequence[str | Path], prompts: list, backends: Sequence[str] = ("onnxruntime", "torch"),
              max_new_tokens: int = 64, diffusion_thresholds: Sequence = DEFAULT_DIFFUSION_THRESHOLDS,
              linear_spec_thresholds: Sequence = DEFAULT_LINEAR_SPEC_THRESHOLDS, model=None,
              threads: int | None = None, eos: int | None = None, thinking: dict | None = None,
              progress: Callable[[str], None] | None = None, modes: Sequence[str] | None = None) -> dict:
    """Benchmark every configuration; returns {"results": [row dicts], "summary": {...}}.
    ``thinking``: the thinking budget of every request (max_thinking_tokens, end_think_token_id).
    ``modes``: open (and run) only these modes' graphs (default: every mode of each artifact)."""
    thinking = thinking or {}
    say = progress or (lambda msg: None)
    check_artifacts(artifacts, modes)  # every artifact before the first is benchmarked
    rows: list[dict] = []
    step_rows: list[dict] = []
    all_backends = backends
    for artifact in artifacts:
        manifest = Manifest.load(artifact)
        quantized = manifest.weight_precision if manifest.weight_precision != "float" else manifest.precision
        backends = [b for b in all_backends if b == "onnxruntime" or quantized == "float"]
        if len(backends) < len(all_backends):
            say(f"{artifact}: {quantized} weights run on onnxruntime only; skipping "
                f"{', '.join(b for b in all_backends if b not in backends)}")
        if not backends:
            continue
        first_row = len(rows)
        reset_peak_rss()
        runtimes = {}
        for b in backends:
            # cold prefills: every configuration runs the same prompts, and a prompt another one
            # left in the cache would skip its prefill
            options = {"threads": threads, "prefix_cache": False} if threads else {"prefix_cache": False}
            if modes:
                options["modes"] = modes
            if b == "torch" and model is not None:
                options["model"] = model
            say(f"loading {artifact} on {b}")
            runtimes[b] = Runtime.load(artifact, backend=b, **options)
        first = runtimes[backends[0]]
        encoded = [_fit(first, p, max_new_tokens) for p in prompts]
        for rt in runtimes.values():  # warm-up: first runs pay for allocations and thread pools
            for mode, L, t in grid(first, diffusion_thresholds, linear_spec_thresholds):
                rt.generate(encoded[0], mode=mode, block_length=L, threshold=_threshold(mode, t), max_new_tokens=8,
                            eos=eos, **thinking)
        for mode, L, t in grid(first, diffusion_thresholds, linear_spec_thresholds):
            acc = {b: Row(b, mode, L, t, str(artifact), first.manifest.config_hash) for b in backends}
            for ids in encoded:
                for b in backends:  # alternate backends prompt by prompt: same machine load for both
                    acc[b].add(runtimes[b].generate(ids, mode=mode, block_length=L, threshold=_threshold(mode, t),
                                                    max_new_tokens=max_new_tokens, eos=eos, **thinking))
            for b in backends:
                row = acc[b].to_dict()
                row["tokens_equal_eager"] = acc[b].tokens == acc["torch"].tokens if "torch" in acc else None
                rows.append(row)
                say(_line(row))
        times = [dict(t, backend=b, artifact=str(artifact)) for b, rt in runtimes.items() for t in step_times(rt)]
        step_rows.extend(times)
        for t in times:
            say(f"{t['backend']:<11} {t['step']:<13} B={t['block_length']:<3} {t['tokens']:>5} tokens "
                f"{t['ms']:8.2f} ms/forward")
        memory = {"weights": quantized if quantized != "float" else manifest.dtype,
                  "weight_bytes": weight_bytes(artifact, manifest), "peak_rss_bytes": peak_rss_bytes()}
        for row in rows[first_row:]:
            row.update(memory)
        for rt in runtimes.values():
            rt.close()
    _add_speedups(rows)
    settings = {"artifacts": [str(a) for a in artifacts], "backends": list(all_backends), "prompts": len(prompts),
                "max_new_tokens": max_new_tokens, "threads": threads, "modes": list(modes) if modes else None}
    return {"results": rows, "step_times": step_rows, "summary": summarize(rows, step_rows), "settings": settings}


def check_artifacts(artifacts: Sequence[str | Path], modes: Sequence[str] | None = None) -> None:
    """Each artifact's manifest reads, holds ``modes`` and has its graph files (sizes): a bad one
    is named before any is benchmarked."""
    from nemocompile.artifact.files import usable_graphs

    for artifact in artifacts:
        manifest = Manifest.load(artifact)
        if modes:
            try:
                manifest = manifest.for_modes(modes)
            except NemocompileError as e:
                raise NemocompileError(f"{artifact}: {e}") from None
        usable_graphs(artifact, manifest)


def _threshold(mode: str, t):
    """A row's threshold as generate() takes it: diffusion's None is the fixed schedule ("none";
    generate's None would be its default, 0.9)."""
    return "none" if mode == "diffusion" and t is None else t


def weight_bytes(artifact: str | Path, manifest: Manifest) -> int:
    """Bytes of weights on disk: the shared weights file, else every graph's own data file and graph."""
    artifact = Path(artifact)
    if manifest.weights_file:
        return (artifact / manifest.weights_file).stat().st_size
    files = {artifact / g.file for g in manifest.graphs} | {(artifact / g.file).with_suffix(".data")
                                                             for g in manifest.graphs}
    return sum(f.stat().st_size for f in files if f.is_file())


def reset_peak_rss() -> bool:
    """Restart the process's peak-RSS high-water mark (Linux /proc/self/clear_refs); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process (since the last reset_peak_rss, where supported)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    except (ImportError, OSError):
        return None


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


def summarize(rows: list[dict], step_rows: Sequence[dict] = ()) -> dict:
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
        # quadratic-spec against linear-spec at the same block length: tokens per forward, tokens/s
        linear = {(r["block_length"], r["artifact"]): r for r in ls if r["threshold"] in (0, 0.0)}
        ratios = {}
        for r in ort:
            other = linear.get((r["block_length"], r["artifact"])) if r["mode"] == "quadratic-spec" else None
            if other and other["tokens_per_forward"] and other["tokens_per_second"]:
                ratios[r["block_length"]] = {
                    "tokens_per_forward": r["tokens_per_forward"] / other["tokens_per_forward"],
                    "tokens_per_second": r["tokens_per_second"] / other["tokens_per_second"]}
        if ratios:
            out["quadratic_over_linear"] = ratios
    # per fused graph (an artifact may have fewer draft groups): its time over a plain verify's
    # at the same block length (from the same artifact where it has one)
    times = [t for t in step_rows if t["backend"] == "onnxruntime"]
    verify = {t["block_length"]: t["ms"] for t in times if t["step"] == "verify"}
    verify.update({(t["artifact"], t["block_length"]): t["ms"] for t in times if t["step"] == "verify"})
    fused = [{"artifact": t["artifact"], "block_length": t["block_length"], "tokens": t["tokens"],
              "ratio": t["ms"] / verify.get((t["artifact"], t["block_length"]), verify.get(t["block_length"]))}
             for t in times if t["step"] == "verify_draft" and t["block_length"] in verify]
    if fused:
        out["fused_step_over_verify_time"] = fused
    return out


# (row key, header, width, format of a present value); None prints as "-"
COLUMNS = (
    ("backend", "backend", -11, "{}"), ("mode", "mode", -14, "{}"), ("block_length", "block", 5, "{}"),
    ("threshold", "thr", 5, "{:g}"), ("tokens_per_second", "tok/s", 8, "{:.1f}"),
    ("tokens_per_forward", "tok/fw", 6, "{:.2f}"), ("acceptance_length", "accept", 6, "{:.2f}"),
    ("time_to_first_token_s", "ttft_ms", 8, "{:.1f}"), ("overhead_share", "ovhd", 6, "{:.1%}"),
    ("overhead_cpu_share", "ovhd_cpu", 8, "{:.1%}"), ("rows_per_forward", "rows/fw", 7, "{:.2f}"),
    ("speedup_vs_ar", "x_ar", 6, "{:.2f}"),
    ("speedup_vs_eager", "x_eager", 7, "{:.2f}"), ("weights", "weights", 7, "{}"),
    ("weight_bytes", "wt_MB", 7, "{:.1f}"), ("peak_rss_bytes", "rss_MB", 7, "{:.0f}"),
)


def _line(row: dict) -> str:
    cells = []
    for key, _, width, fmt in COLUMNS:
        value = row.get(key)
        if key == "time_to_first_token_s" and value is not None:
            value *= 1e3
        if key in ("weight_bytes", "peak_rss_bytes") and value is not None:
            value /= 1e6
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
        for L, q in s.get("quadratic_over_linear", {}).items():
            lines.append(f"quadratic-spec / linear-spec at block {L}: {q['tokens_per_forward']:.2f}x tokens per "
                         f"forward, {q['tokens_per_second']:.2f}x tokens/s")
        for f in s.get("fused_step_over_verify_time", []):
            lines.append(f"fused verify_draft forward ({f['tokens']} tokens) / plain verify forward at block "
                         f"{f['block_length']}: {f['ratio']:.2f}x time")
    return "\n".join(lines)


def require_matplotlib():
    """matplotlib, or a clear error (callers check this before benchmarking)."""
    try:
        import matplotlib
    except ImportError:
        raise NemocompileError("--plot needs matplotlib: pip install 'nemocompile[plot]'") from None
    return matplotlib


def check_plot_file(path: str | Path) -> None:
    """--plot: matplotlib is installed and writes this file type (checked before any benchmark)."""
    matplotlib = require_matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix not in kinds:
        shown = "no extension" if not suffix else f".{suffix}"
        raise NemocompileError(f"--plot {path}: matplotlib cannot write {shown}; name a .png, .svg or .pdf file "
                               f"(any of {', '.join('.' + k for k in sorted(kinds))})")
    del matplotlib


def plot(report: dict, path: str | Path) -> None:
    """Tokens/s and tokens per forward per configuration, grouped by mode."""
    matplotlib = require_matplotlib()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    labels = list(dict.fromkeys(_label(r) for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(labels)), 4.8))
    width = 0.8 / max(len(backends), 1)
    # tokens/s spans orders of magnitude across modes (quadratic-spec's wide step on a CPU): a log
    # axis keeps every bar visible; tokens per forward stays linear (1 to a block)
    for ax, key, title, log in ((axes[0], "tokens_per_second", "tokens / s (log scale)", True),
                                (axes[1], "tokens_per_forward", "tokens per forward", False)):
        for i, b in enumerate(backends):
            values = {_label(r): r[key] for r in rows if r["backend"] == b}
            xs = [j + i * width for j in range(len(labels))]
            ax.bar(xs, [values.get(lab) or float("nan") for lab in labels], width, label=b)
        if log:
            ax.set_yscale("log")
        ax.set_xticks([j + width * (len(backends) - 1) / 2 for j in range(len(labels))])
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(plot_title(report), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_title(report: dict) -> str:
    """What a picture shows: the artifact(s) and the settings the numbers depend on."""
    s = report.get("settings") or {}
    artifacts = ", ".join(Path(a).name for a in s.get("artifacts") or sorted({r["artifact"] for r in report["results"]}))
    parts = [f"nemocompile bench: {artifacts}"]
    if s:
        parts.append(f"{s['prompts']} prompts x {s['max_new_tokens']} new tokens, greedy, "
                     f"{s['threads'] or 'default'} thread(s), {os.cpu_count()} CPUs")
    return "\n".join(parts)


def _label(r: dict) -> str:
    """A configuration's name: the threshold only where the mode has one (diffusion without
    one runs the fixed schedule)."""
    if r["mode"] == "ar":
        return "ar"
    label = f"{r['mode']} B={r['block_length']}"
    if r["mode"] == "diffusion":
        return label + (" fixed steps" if r["threshold"] is None else f" t={r['threshold']:g}")
    return label + (f" t={r['threshold']:g}" if r["threshold"] is not None else "")


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
