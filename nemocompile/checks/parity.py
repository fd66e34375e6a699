"""Parity of an exported artifact against the eager PyTorch model.

Two levels, both at temperature 0:

- per step (:func:`step_parity`): every graph of the artifact runs on ONNX
  Runtime (CPU provider) and ``TriModeModel.step`` runs the same inputs
  eagerly, at cache lengths 0, mid and near capacity, with left padding on
  the rows after the first. The cache prefix holds the model's own keys and
  values; the slots beyond ``cache_len`` hold noise, so a graph that failed to
  mask them would show. Reported per step kind: max and mean absolute logit
  difference (graphs without logits: of the confidences), max difference of the
  written (present) cache rows, top-1 agreement. The verdict fails closed: any
  NaN/inf in the graph's outputs, a difference above the dtype's tolerance, or a
  top-1 disagreement where the eager logits prefer their own token by more than
  that tolerance fails. Fused graphs are also compared with the separate steps
  they replace.
- whole generations (:func:`generation_parity`): the runtime
  (``nemocompile.runtime``, ONNX Runtime backend) against the eager decoders
  (``nemocompile.generate``) in every mode of the artifact; the token
  sequences must be identical.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from nemocompile.artifact.files import check_files
from nemocompile.errors import NemocompileError
from nemocompile.artifact.manifest import Manifest
from nemocompile.text.prompts_file import read_prompts_file
from nemocompile.model import TriModeModel
from nemocompile.model.layout import Layout
from nemocompile.model.modeling import greedy_candidates

# Max abs logit (and cache row) difference allowed per artifact dtype. fp32 is
# absolute (1e-4). Half precisions are relative to the step's largest |logit|
# (for the cache rows: the largest |key or value|):
# one fp16 ulp at a logit of 20 is already 0.016, and eager PyTorch and ONNX
# Runtime round in different places (ORT's CPU provider computes several fp16
# ops in fp32).
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
RELATIVE = {"fp32": False, "fp16": True, "bf16": True}
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ParityError(NemocompileError):
    """Parity could not run (wrong model for the artifact, unreadable prompts, ...)."""


@dataclass
class StepParity:
    step: str
    cases: list[str]  # "cache_len=..": the situations compared
    logits_max: float  # max |onnx - eager| over every logit of every case
    logits_mean: float
    cache_max: float | None  # max |onnx - eager| of the present rows; None: the step does not write
    top1: float  # fraction of positions whose argmax agrees
    tolerance: float  # the absolute bound applied (half precisions: relative to the largest |logit|)
    ok: bool
    nonfinite: int = 0  # NaN/inf values among the graph's logits and written cache rows (any fails)
    top1_flips: int = 0  # positions whose argmax differs while eager prefers its own by more than tolerance


@dataclass
class GenerationParity:
    mode: str
    prompts: int
    identical: int  # prompts whose token sequences are identical
    token_agreement: float  # fraction of aligned positions with the same token
    first_divergence: list[dict] = field(default_factory=list)  # per differing prompt: index, position, tokens
    ok: bool = True


@dataclass
class ParityReport:
    artifact: str
    dtype: str
    steps: list[StepParity]
    generations: list[GenerationParity]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps) and all(g.ok for g in self.generations)

    def to_dict(self) -> dict:
        return {"artifact": self.artifact, "dtype": self.dtype, "ok": self.ok,
                "steps": [asdict(s) for s in self.steps], "generations": [asdict(g) for g in self.generations]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        lines = [f"parity of {self.artifact} ({self.dtype}) against eager PyTorch",
                 f"{'step':<23}{'cases':>6}{'logits max':>13}{'logits mean':>13}{'cache max':>12}{'top-1':>8}"
                 f"{'tol':>9}  result"]
        for s in self.steps:
            cache = "-" if s.cache_max is None else f"{s.cache_max:.2e}"
            lines.append(f"{s.step:<23}{len(s.cases):>6}{s.logits_max:>13.2e}{s.logits_mean:>13.2e}{cache:>12}"
                         f"{s.top1:>8.1%}{s.tolerance:>9.1e}  {'ok' if s.ok else 'FAIL'}")
            if s.nonfinite:
                lines.append(f"    {s.step}: {s.nonfinite} NaN/inf values in the graph's outputs")
            if s.top1_flips:
                lines.append(f"    {s.step}: top-1 differs at {s.top1_flips} positions where eager prefers its token "
                             f"by more than the tolerance")
        if self.generations:
            lines.append(f"{'mode':<15}{'prompts':>8}{'identical':>11}{'tokens':>9}  result")
            for g in self.generations:
                lines.append(f"{g.mode:<15}{g.prompts:>8}{g.identical:>11}{g.token_agreement:>9.1%}  "
                             f"{'ok' if g.ok else 'FAIL'}")
                for d in g.first_divergence:
                    lines.append(f"    prompt {d['prompt']}: first divergence at token {d['position']}: "
                                 f"onnx {d['onnx']} vs eager {d['eager']}")
        lines.append("(graphs without logits are compared on their confidences, a fused graph's spine logits on "
                     "its spine rows; <step>=separate: a fused graph against the separate steps it replaces)")
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)


# ---- entry point -------------------------------------------------------------
def check_parity(artifact_dir: str | Path, model: TriModeModel | str | Path | None = None,
                 prompts: Sequence | None = None, max_new_tokens: int = 32, generations: bool = True,
                 seed: int = 0, progress: Callable[[str], None] | None = None) -> ParityReport:
    """Per-step parity of every graph, then whole-generation parity in every mode
    of the artifact. ``model``: a loaded model, a checkpoint directory, or None
    (the manifest's source checkpoint, else the embedded model). ``progress``: told
    each graph and each mode's prompts as they start."""
    manifest = Manifest.load(artifact_dir)
    check_files(artifact_dir, manifest)
    model = reference_model(manifest, model)
    steps = step_parity(artifact_dir, model, manifest=manifest, seed=seed, progress=progress)
    gens = (generation_parity(artifact_dir, model, prompts, max_new_tokens, manifest=manifest, progress=progress)
            if generations else [])
    return ParityReport(str(artifact_dir), manifest.dtype, steps, gens)


def reference_model(manifest: Manifest, model: TriModeModel | str | Path | None) -> TriModeModel:
    """The eager model in the artifact's dtype; refuses one with a different architecture."""
    dtype = _TORCH_DTYPES[manifest.dtype]
    if model is None or isinstance(model, (str, Path)):
        from nemocompile.model.loader import embedded_model_dir, load

        path = model or manifest.source or embedded_model_dir()
        model = load(path, dtype=dtype)
    else:
        from nemocompile.graphs.export import cast_model

        model = cast_model(model, dtype)
    if model.config.hash() != manifest.config_hash:
        raise ParityError(f"the model's config hash {model.config.hash()} differs from the artifact's "
                          f"{manifest.config_hash}; pass --model with the checkpoint the artifact was exported from")
    if model.has_lora != manifest.has_lora:
        raise ParityError(f"the artifact was exported {'with' if manifest.has_lora else 'without'} a drafter LoRA "
                          f"but the model has {'one' if model.has_lora else 'none'}; pass the matching checkpoint")
    return model.eval()


# ---- per step ----------------------------------------------------------------


def step_parity(artifact_dir: str | Path, model: TriModeModel, *, manifest: Manifest | None = None,
                cache_lens: Sequence[int] | None = None, seed: int = 0,
                progress: Callable[[str], None] | None = None) -> list[StepParity]:
    """Every graph on ORT CPU against ``model.step`` on the same inputs. A fused graph
    is also compared row by row with the separate steps it replaces (a causal step over
    its spine, one draft per branch on the cache extended by the spine prefix): the
    row ``<step>=separate``."""
    import onnxruntime as ort

    manifest = manifest or Manifest.load(artifact_dir)
    C, B = manifest.cache_capacity, manifest.batch_size
    so = ort.SessionOptions()
    so.log_severity_level = 3
    out = []
    for i, g in enumerate(manifest.graphs, 1):
        if progress is not None:
            progress(f"parity: graph {i}/{len(manifest.graphs)} {g.step} (B={g.block_length}) against eager")
        layout = Layout.from_dict(g.layout)
        L = g.block_length
        # a step's cache slots are its L input tokens (a fused graph's masks write nothing)
        lens = cache_lens if cache_lens is not None else sorted({0, (C - L) // 2, C - L})
        try:
            session = ort.InferenceSession(str(Path(artifact_dir) / g.file), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types
            hint = ("bf16 artifacts do not run on ORT's CPU provider: export fp32 or fp16 for CPU parity"
                    if manifest.dtype == "bf16" else "re-export the artifact (`nemocompile check` lints it)")
            reason = " ".join(str(e).split())[:300]
            raise ParityError(f"{g.file}: ONNX Runtime (CPU) cannot load it ({reason}); {hint}") from None
        names = [o.name for o in session.get_outputs()]
        direct, separate = OutputComparison(g.step, manifest.dtype), OutputComparison(f"{g.step}=separate", manifest.dtype)
        gen = torch.Generator().manual_seed(seed)
        for cache_len in lens:
            if cache_len < 0 or cache_len + L > C:
                continue
            everything = _step_inputs(model, layout, B, C, cache_len, gen)
            for b in sorted({1, B}):  # one row, and every row (the batch dimension is dynamic)
                feed, inputs = _forward_inputs(everything, list(range(B))[::-1][:b])
                got = dict(zip(names, session.run(None, {k: _numpy(v) for k, v in feed.items()})))
                with torch.no_grad():
                    ref = model.step(inputs["input_ids"], inputs["cache_k"], inputs["cache_v"], inputs["cache_len"],
                                     inputs["row_start"], layout=layout)
                case = f"b={b} cache_len={cache_len}"
                direct.add(case, got, ref)
                if layout.pattern == "fused":
                    separate.add(case, got, separate_steps(model, layout, inputs))
        out.append(direct.result())
        if separate.cases:
            out.append(separate.result())
    return out


class OutputComparison:
    """One graph's outputs against eager over several cases, failing closed.

    Graphs that keep logits are compared on them, the others (fused, greedy-only)
    on their confidences. ``max`` over a Python list drops a NaN that is not
    first, so every reduction here is numpy's, which propagates it; non-finite
    graph outputs are counted separately. A top-1 disagreement is excused only
    where the eager logits themselves put the two tokens within the tolerance (a
    near tie), and the tolerance is known only after every case ran (half
    precisions scale it by the largest |logit|), so the margins of disagreeing
    positions are kept.
    """

    def __init__(self, step: str = "step", dtype: str = "fp32"):
        self.step, self.dtype = step, dtype
        self.cases: list[str] = []
        self.diffs: list[float] = []
        self.means: list[float] = []
        self.cache_diffs: list[float] = []
        self.margins: list[np.ndarray] = []  # eager margin of its own top-1 over the graph's, where they differ
        self.agree = self.total = self.nonfinite = 0
        self.scale = self.cache_scale = 1.0

    def add(self, case: str, got: dict, ref: tuple) -> None:
        """``got``: the graph's outputs by name; ``ref``: eager (logits [B, T, V], k, v)."""
        ref_logits = ref[0].float()
        theirs_top, theirs_conf = (t.numpy() for t in greedy_candidates(ref_logits))
        ref_logits = ref_logits.numpy().astype(np.float64)
        self.scale = max(self.scale, _nanmax(np.abs(ref_logits)))
        if "logits" in got:  # a fused graph's are its spine's rows only: their confidences cover the rest
            rows = got["logits"].shape[1]
            pairs = [(got["logits"], ref_logits[:, :rows])]
            if rows < ref_logits.shape[1]:
                pairs.append((got["confidence"], theirs_conf))
        else:
            pairs = [(got["confidence"], theirs_conf)]
        for ours, theirs in pairs:
            ours = ours.astype(np.float64)
            self.nonfinite += int((~np.isfinite(ours)).sum())
            d = np.abs(ours - theirs)
            self.diffs.append(_nanmax(d))
            self.means.append(float(d.mean()))
        cand = got["candidate"]
        differ = cand != theirs_top
        self.agree += int((~differ).sum())
        self.total += differ.size
        if differ.any():
            rows = ref_logits[differ]  # [n, V]
            idx = np.arange(len(rows))
            self.margins.append(rows[idx, theirs_top[differ]] - rows[idx, cand[differ]])
        if "present_k" in got and ref[1] is not None:
            for name, r in (("present_k", ref[1]), ("present_v", ref[2])):  # graphs' presents are batch-first
                ours, theirs = _f32(got[name]), r.transpose(0, 1).float().numpy()
                self.nonfinite += int((~np.isfinite(ours)).sum())
                self.cache_diffs.append(_nanmax(np.abs(ours - theirs)))
                self.cache_scale = max(self.cache_scale, float(np.abs(theirs).max()))
        self.cases.append(case)

    @property
    def logits_max(self) -> float:
        return _nanmax(self.diffs)

    @property
    def top1(self) -> float:
        return self.agree / self.total if self.total else float("nan")

    def flips(self, tol: float) -> int:
        """Top-1 disagreements that no tolerance excuses (a NaN margin counts)."""
        return sum(int((~(m <= tol)).sum()) for m in self.margins)

    def result(self) -> StepParity:
        relative = RELATIVE[self.dtype]
        tol = TOLERANCE[self.dtype] * (self.scale if relative else 1.0)
        cache_tol = TOLERANCE[self.dtype] * (self.cache_scale if relative else 1.0)
        cache_max = _nanmax(self.cache_diffs) if self.cache_diffs else None
        flips = self.flips(tol)
        # fail closed: a NaN compares False, so every bound is written as "x <= tol" and
        # non-finite outputs fail on their own
        ok = (self.nonfinite == 0 and self.logits_max <= tol and flips == 0
              and (cache_max is None or cache_max <= cache_tol))
        return StepParity(self.step, self.cases, self.logits_max, float(np.mean(self.means)), cache_max, self.top1,
                          tol, ok, nonfinite=self.nonfinite, top1_flips=flips)


def _nanmax(values) -> float:
    """The maximum, NaN if any value is NaN (unlike the builtin ``max``); NaN for nothing."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.max()) if a.size else float("nan")


def separate_steps(model: TriModeModel, layout: Layout, inputs: dict) -> tuple[torch.Tensor, ...]:
    """What a fused layout must compute, from the separate steps: logits [B, T, V] of a
    causal step over the spine, and of each branch as its own draft on the cache extended
    by the spine tokens 0..anchor; the spine's K/V rows. (passes/fuse_draft_verify's invariant.)"""
    ids, ck, cv, n, row_start = (inputs[k] for k in ("input_ids", "cache_k", "cache_v", "cache_len", "row_start"))
    with torch.no_grad():
        spine_logits, k, v = model.step(ids[:, :layout.spine], ck, cv, n, row_start, layout=Layout.causal(layout.spine))
        ck, cv = ck.clone(), cv.clone()
        for b, start in enumerate(n.reshape(-1).expand(ids.shape[0]).tolist()):  # each row at its own length
            ck[:, b, :, start:start + layout.spine] = k[:, b]
            cv[:, b, :, start:start + layout.spine] = v[:, b]
        parts = [spine_logits]
        for b in layout.branches:
            draft = Layout.bidirectional(b.length, lora=b.lora, source=b.source)
            prefix = n + b.anchor + 1  # the cache holds the spine up to the anchor
            parts.append(model.step(ids[:, :0], ck, cv, prefix, row_start, layout=draft)[0])
    return torch.cat(parts, dim=1), k, v


def _step_inputs(model: TriModeModel, layout: Layout, B: int, C: int, cache_len: int,
                 gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A step's inputs against a cache holding the model's own K/V and noise beyond it.
    Rows sit at different lengths (row b holds ``cache_len - b`` slots, at least 0, the
    slots past its length hold stale K/V of the longest row) and row b is left-padded by
    up to b slots: one step serves rows of a continuous batch at their own positions."""
    cfg, dtype, L = model.config, model.dtype, layout.input_length
    lens = torch.tensor([max(cache_len - b, 0) for b in range(B)], dtype=torch.long)
    row_start = torch.tensor([min(b, max(int(lens[b]) + L - 1, 0)) for b in range(B)], dtype=torch.long)
    shape = (cfg.num_hidden_layers, B, cfg.num_key_value_heads, C, cfg.head_dim)
    cache_k = torch.randn(shape, generator=gen).to(dtype) * 3  # noise: must be masked away
    cache_v = torch.randn(shape, generator=gen).to(dtype) * 3
    if cache_len:
        prefix = torch.randint(0, cfg.vocab_size, (B, cache_len), generator=gen)
        with torch.no_grad():
            _, k, v = model.step(prefix, None, None, 0, row_start, pattern="causal")
        cache_k[..., :cache_len, :] = k
        cache_v[..., :cache_len, :] = v
    ids = torch.randint(0, cfg.vocab_size, (B, L), generator=gen)
    if layout.pattern == "bidirectional" and L > 1:  # denoise/draft blocks: a seed token, then mostly masks
        keep = torch.rand(B, L, generator=gen) < 0.3
        keep[:, 0] = True
        ids = torch.where(keep, ids, torch.full_like(ids, cfg.mask_token_id))
    return {"input_ids": ids, "cache_len": lens, "row_start": row_start, "cache_k": cache_k, "cache_v": cache_v}


def _forward_inputs(inputs: dict, rows: list[int]) -> tuple[dict, dict]:
    """One forward over cache rows ``rows`` (in that order): the graph's feed (the whole
    cache, the rows' indices, the slots below their longest row) and eager's inputs (the
    rows' own caches, whole: eager masks by length, the graph reads only ``slots``)."""
    index = torch.tensor(rows, dtype=torch.long)
    per_row = {k: inputs[k][index] for k in ("input_ids", "cache_len", "row_start")}
    n = max(1, int(per_row["cache_len"].max()))
    feed = {**per_row, "rows": index, "slots": torch.arange(n, dtype=torch.long),
            "cache_k": inputs["cache_k"], "cache_v": inputs["cache_v"]}
    return feed, {**per_row, "cache_k": inputs["cache_k"][:, index], "cache_v": inputs["cache_v"][:, index]}


def _numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _f32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32)


# ---- whole generations -------------------------------------------------------
def generation_parity(artifact_dir: str | Path, model: TriModeModel, prompts: Sequence | None = None,
                      max_new_tokens: int = 32, *, manifest: Manifest | None = None,
                      modes: Sequence[str] | None = None,
                      progress: Callable[[str], None] | None = None) -> list[GenerationParity]:
    """Greedy generations of the runtime (ONNX Runtime) and the eager decoders
    must be token-for-token identical, in every mode of the artifact. A prompt
    that is itself a list of prompts runs as one batch (ar and diffusion)."""
    from nemocompile import generate
    from nemocompile.runtime import Runtime

    manifest = manifest or Manifest.load(artifact_dir)
    prompts = default_prompts(model) if prompts is None else list(prompts)
    results = []
    with Runtime.load(artifact_dir, backend="onnxruntime") as runtime:
        for mode in modes or manifest.modes:
            block = None if mode == "ar" else manifest.block_lengths(mode)[0]
            pairs = []
            for j, p in enumerate(prompts, 1):
                if progress is not None:
                    progress(f"parity: {mode} generation {j}/{len(prompts)} ({max_new_tokens} tokens, runtime "
                             "and eager)")
                ours = runtime.generate(p, mode=mode, max_new_tokens=max_new_tokens, block_length=block,
                                        temperature=0.0)
                groups = runtime.draft_groups.get(block) if mode == "quadratic-spec" else None
                ref = generate(model, p, mode=mode, max_new_tokens=max_new_tokens, block_length=block,
                               temperature=0.0, draft_groups=groups)
                if isinstance(ref, list):  # a batch of prompts: one result per row
                    pairs += [(list(o.tokens), list(r.tokens)) for o, r in zip(ours, ref)]
                else:
                    pairs.append((list(ours.tokens), list(ref.tokens)))
            results.append(_compare(mode, pairs))
    return results


def _compare(mode: str, pairs: list[tuple[list[int], list[int]]]) -> GenerationParity:
    identical, same, total, firsts = 0, 0, 0, []
    for i, (a, b) in enumerate(pairs):
        n = max(len(a), len(b))
        total += n
        same += sum(x == y for x, y in zip(a, b))
        if a == b:
            identical += 1
            continue
        pos = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        firsts.append({"prompt": i, "position": pos, "onnx": a[pos] if pos < len(a) else None,
                       "eager": b[pos] if pos < len(b) else None})
    return GenerationParity(mode, len(pairs), identical, same / total if total else 1.0, firsts,
                            ok=identical == len(pairs))


def default_prompts(model: TriModeModel, count: int = 3) -> list:
    """Held-out text prompts with a tokenizer, else seeded random token ids."""
    if model.tokenizer is not None:
        path = Path(__file__).parent / "assets" / "heldout_prompts.txt"
        if path.is_file():
            return [json.loads(line)["prompt"] for line in path.read_text().splitlines()[:count] if line.strip()]
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in (5, 9, 3)][:count]


def read_prompts(path: str | Path) -> list:
    """A prompts file (nemocompile/text/prompts_file.py: JSON lines with "prompt" or
    "ids", or plain text lines), the same format `bench --prompts` reads."""
    return read_prompts_file(path, ParityError)
