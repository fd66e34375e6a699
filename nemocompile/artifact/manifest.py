"""The artifact manifest: the one contract between the exporter and the runtime.

An artifact directory holds one ONNX graph per step kind, shared weights, the
tokenizer files and ``manifest.json``. The runtime reads only this manifest
(never exporter internals).

Graph I/O (names are fixed; N = the artifact's batch, C = its cache capacity; b and n
are dynamic, named ``batch`` and ``slots`` in the graphs, so a forward's cost follows the
rows in flight and their lengths, never N or C):

inputs
  input_ids   int64 [b, L]                      the block of each of the forward's b rows (1 <= b <= N)
  cache_len   int64 [b]                         each row's committed cache slots; the row's block slots are
                                                cache_len..cache_len+L-1 (rows at different lengths share a step)
  row_start   int64 [b]                         first real slot of each row (left padding); positions = slot - row_start
  rows        int64 [b]                         the cache row each entry reads and writes
  slots       int64 [n]                         0 .. n-1: the slots the forward reads, n >= max(cache_len), n >= 1
  cache_k     dtype [layers, N, kv_heads, C, head_dim]   the preallocated cache (static: memory, not work)
  cache_v     dtype [layers, N, kv_heads, C, head_dim]
outputs
  candidate   int64 [b, T]                      every token's argmax (T = the layout's tokens)
  confidence  float32 [b, T]                    and its softmax probability: a greedy runtime
                                                never reads vocabulary-sized tensors
  logits      float32 [b, T, vocab]             only in graphs that keep them (sampling); a fused step's
                                                are its spine's rows only [b, spine, vocab]
  top_logprobs float32 [b, S, 20]               the 20 best log-probs (log-softmax at temperature 1) of the S
  top_ids     int64 [b, S, 20]                  spine positions (all positions without a spine) and their ids
  next_logprob float32 [b, L]                   input token j+1's log-prob at position j (the last: 0): echo's
                                                prompt scores; these three only in graphs exported with logprobs
  present_k   dtype [b, layers, kv_heads, S, head_dim]   only for steps that write the cache (S = the
  present_v   dtype [b, layers, kv_heads, S, head_dim]   spine's tokens): the runtime places them at cache_len

The manifest records each tensor at its largest shape (b = N, n = C).

Each graph records its token ``layout`` (nemocompile/model/layout.py): the spine
(causal, written to the cache) and the branches (drafts), so a runtime knows
what every output row means without exporter code.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from nemocompile.errors import NemocompileError

FORMAT = "nemocompile-artifact"
# The graph contract's version. 2: token layouts, candidate outputs on every graph, fused steps;
# 3: cache_len per row ([B]), so rows at different lengths (continuous batching) share one step;
# 4: the forward's rows (dynamic batch, ``rows``) and the slots it reads (``slots``), presents batch-first
FORMAT_VERSION = 4
MANIFEST = "manifest.json"

# step kind -> (attention pattern, writes the cache, modes that use it)
STEP_KINDS: dict[str, tuple[str, bool, tuple[str, ...]]] = {
    "prefill": ("causal", True, ("ar", "diffusion", "linear-spec", "quadratic-spec")),
    "ar_step": ("causal", True, ("ar",)),
    "denoise": ("bidirectional", False, ("diffusion",)),
    "commit": ("causal", True, ("diffusion",)),
    "draft": ("bidirectional", False, ("linear-spec",)),
    "verify": ("causal", True, ("linear-spec",)),
    "prefill_draft": ("fused", True, ("quadratic-spec",)),
    "verify_draft": ("fused", True, ("quadratic-spec",)),
}
# the graphs each mode needs
MODE_STEPS = {"ar": {"prefill", "ar_step"}, "diffusion": {"prefill", "denoise", "commit"},
              "linear-spec": {"prefill", "draft", "verify"},
              "quadratic-spec": {"prefill", "prefill_draft", "verify_draft"}}
# the graph whose block length is a mode's block length
BLOCK_STEP = {"diffusion": "denoise", "linear-spec": "draft", "quadratic-spec": "verify_draft"}
DTYPE_NAMES = ("float32", "float16", "bfloat16", "int64")
WEIGHT_PRECISIONS = ("float", "int4", "int8")
PRECISIONS = ("float", "fp8", "int4-awq", "nvfp4")  # TensorRT Q/DQ graphs (passes/quantize_qdq.py)


def parse_modes(value) -> list[str]:
    """Decode modes from a comma-separated string or a list (--modes, a Ray Serve config's ``modes``), without
    repeats; ValueError names the first unknown one. ``auto`` is none: it picks among the modes opened."""
    names = [m.strip() for m in (value.split(",") if isinstance(value, str) else map(str, value)) if m.strip()]
    bad = [m for m in names if m not in MODE_STEPS]
    if bad or not names:
        raise ValueError(f"unknown mode {bad[0] if bad else '(none)'!r}; use a comma-separated list of "
                         f"{', '.join(MODE_STEPS)}")
    return list(dict.fromkeys(names))


class ManifestError(NemocompileError):
    """A manifest is missing, malformed, or does not match its artifact."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: list[int]
    dtype: str  # one of DTYPE_NAMES


@dataclass(frozen=True)
class GraphSpec:
    step: str  # a STEP_KINDS key
    file: str  # ONNX file, relative to the artifact directory
    modes: list[str]
    pattern: str  # "causal" | "bidirectional"
    writes_cache: bool
    lora: bool  # drafter adapter active in this graph
    block_length: int  # L, tokens per call (read from input_ids)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    layout: dict[str, Any]  # the token layout (Layout.to_dict()): spine, branches

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)


@dataclass(frozen=True)
class Manifest:
    model_config: dict[str, Any]  # config.json contents (ModelConfig.to_dict())
    config_hash: str
    dtype: str  # "fp32" | "fp16" | "bf16": weights and cache
    batch_size: int
    cache_capacity: int  # C: max tokens (prompt + generated + one block) per sequence
    block_length: int  # B of diffusion/self-speculation blocks
    prefill_length: int  # P: prompt chunk size of the prefill graph
    has_lora: bool
    graphs: list[GraphSpec]
    tokenizer_files: list[str] = field(default_factory=list)
    weights_file: str | None = None  # shared external-data file, if any
    opset: int = 18
    source: str | None = None  # checkpoint the artifact came from
    # weight-only quantization: "float" (weights in `dtype`), "int4" or "int8" (MatMulNBits, ONNX Runtime only)
    weight_precision: str = "float"
    quantization: dict[str, Any] | None = None  # method, block_size, symmetric, what stayed in float
    # TensorRT Q/DQ precision: "float" or "fp8" / "int4-awq" (ModelOpt Q/DQ; TensorRT and ONNX Runtime) /
    # "nvfp4" (TensorRT only: its activations are quantized by trt::TRT_FP4DynamicQuantize)
    precision: str = "float"
    precision_details: dict[str, Any] | None = None  # library, mode, block size, calibration, what stayed float
    # file name -> {"size": bytes, "sha256": hex digest}, every file the export wrote but this
    # manifest (see nemocompile/artifact/files.py); empty in manifests written before it existed
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    # ---- lookups -------------------------------------------------------------
    def graph(self, step: str, block_length: int | None = None) -> GraphSpec:
        for g in self.graphs:
            if g.step == step and (block_length is None or g.block_length == block_length):
                return g
        have = sorted({(g.step, g.block_length) for g in self.graphs})
        want = step if block_length is None else f"{step} with block length {block_length}"
        raise ManifestError(f"the artifact has no {want} graph (it has {have}); re-export with the needed mode/block length")

    @property
    def modes(self) -> list[str]:
        steps = {g.step for g in self.graphs}
        return [m for m, s in MODE_STEPS.items() if s <= steps]

    def for_modes(self, modes) -> "Manifest":
        """The manifest with only the graphs ``modes`` run: a runtime then opens no other (ONNX Runtime
        keeps each session's own prepacked copy of quantized weights, so every graph costs their size)."""
        import dataclasses

        missing = [m for m in modes if m not in self.modes]
        if missing:
            raise ManifestError(f"the artifact has no {missing[0]} graphs (it has: {', '.join(self.modes)}); "
                                f"drop it from --modes or re-export with --mode {missing[0]}")
        steps = set().union(*(MODE_STEPS[m] for m in modes))
        return dataclasses.replace(self, graphs=[g for g in self.graphs if g.step in steps])

    def block_lengths(self, mode: str) -> list[int]:
        """The block lengths ``mode`` can run at (its block graph's lengths)."""
        return sorted({g.block_length for g in self.graphs if g.step == BLOCK_STEP.get(mode)})

    @property
    def sampling(self) -> bool:
        """Whether the graphs return logits (temperature > 0 needs them)."""
        return all(g.output("logits") is not None for g in self.graphs if g.pattern != "fused")

    # ---- (de)serialisation -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, raw: Any, source: str = MANIFEST) -> "Manifest":
        if not isinstance(raw, dict):
            raise ManifestError(f"{source}: expected a JSON object")
        if raw.get("format") != FORMAT:
            raise ManifestError(f"{source}: field 'format' is {raw.get('format')!r}, expected {FORMAT!r}; "
                                "is this a nemocompile artifact? (create one with `nemocompile export`)")
        version = raw.get("format_version")
        if version in (2, 3):
            raise ManifestError(f"{source}: this artifact has graph contract version {version}, whose every "
                                f"forward reads all cache slots of all rows; this nemocompile's graphs read only "
                                f"the rows in flight up to their length (version {FORMAT_VERSION}): re-export the "
                                "artifact with `nemocompile export`")
        if version != FORMAT_VERSION:
            raise ManifestError(f"{source}: format_version {version!r} is not supported "
                                f"(this nemocompile reads version {FORMAT_VERSION}); re-export the artifact")
        kwargs = _take(cls, raw, source, ("graphs",))
        graphs_raw = raw.get("graphs")
        if not isinstance(graphs_raw, list) or not graphs_raw:
            raise ManifestError(f"{source}: field 'graphs' must be a non-empty list")
        graphs = []
        for i, g in enumerate(graphs_raw):
            where = f"{source}: graphs[{i}]"
            if not isinstance(g, dict):
                raise ManifestError(f"{where}: expected an object")
            gk = _take(GraphSpec, g, where, ("inputs", "outputs"))
            for key in ("inputs", "outputs"):
                specs = g.get(key)
                if not isinstance(specs, list):
                    raise ManifestError(f"{where}: field {key!r} must be a list")
                gk[key] = [TensorSpec(**_take(TensorSpec, t, f"{where}.{key}[{j}]", ()))
                           for j, t in enumerate(specs)]
            graphs.append(GraphSpec(**gk))
        manifest = cls(graphs=graphs, **kwargs)
        manifest.validate(source)
        return manifest

    @classmethod
    def load(cls, directory: str | Path) -> "Manifest":
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise ManifestError(f"{path}: missing; {directory} is not an exported artifact "
                                "(create one with `nemocompile export --out DIR`)")
        try:
            raw = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ManifestError(f"{path}: not UTF-8 text (invalid byte at offset {e.start}); the artifact is "
                                "damaged, re-export it") from None
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    def validate(self, source: str = MANIFEST) -> None:
        if self.dtype not in ("fp32", "fp16", "bf16"):
            raise ManifestError(f"{source}: field 'dtype' is {self.dtype!r}; expected fp32, fp16 or bf16")
        if self.precision not in PRECISIONS:
            raise ManifestError(f"{source}: field 'precision' is {self.precision!r}; expected one of "
                                f"{', '.join(PRECISIONS)}")
        if self.weight_precision not in WEIGHT_PRECISIONS:
            raise ManifestError(f"{source}: field 'weight_precision' is {self.weight_precision!r}; expected one of "
                                f"{', '.join(WEIGHT_PRECISIONS)}")
        for name in ("batch_size", "cache_capacity", "block_length", "prefill_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ManifestError(f"{source}: field {name!r} must be a positive integer")
        if not isinstance(self.files, dict) or not all(
                isinstance(name, str) and isinstance(rec, dict) and isinstance(rec.get("size"), int)
                and not isinstance(rec.get("size"), bool) and rec["size"] >= 0 and isinstance(rec.get("sha256"), str)
                for name, rec in self.files.items()):
            raise ManifestError(f"{source}: field 'files' must map file names to {{\"size\": bytes, "
                                "\"sha256\": hex}}; re-export the artifact")
        for g in self.graphs:
            if g.step not in STEP_KINDS:
                raise ManifestError(f"{source}: unknown step kind {g.step!r}; expected one of {list(STEP_KINDS)}")
            pattern, writes, _ = STEP_KINDS[g.step]
            if g.pattern != pattern or g.writes_cache != writes:
                raise ManifestError(f"{source}: graph {g.step!r} must be {pattern} and "
                                    f"{'write' if writes else 'not write'} the cache")
            if g.block_length > self.cache_capacity:
                raise ManifestError(f"{source}: graph {g.step!r} block length {g.block_length} exceeds the "
                                    f"cache capacity {self.cache_capacity}")
            for t in (*g.inputs, *g.outputs):
                if t.dtype not in DTYPE_NAMES or not all(isinstance(d, int) and d > 0 for d in t.shape):
                    raise ManifestError(f"{source}: graph {g.step!r} tensor {t.name!r} needs a static positive "
                                        f"shape and a dtype in {DTYPE_NAMES}")


def _take(cls, raw: dict, where: str, skip: tuple[str, ...]) -> dict[str, Any]:
    """The dataclass fields of ``cls`` from ``raw``: missing required ones are errors."""
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: expected an object")
    out = {}
    for f in fields(cls):
        if f.name in skip:
            continue
        if f.name in raw:
            out[f.name] = raw[f.name]
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ManifestError(f"{where}: missing field {f.name!r}")
    return out
