"""Parity that fits a quantized artifact: how far int4/int8 weights move the model, against eager fp32.

The fp32 tolerance (1e-4 on every logit) cannot hold once weights are rounded
to 4 or 8 bits, so a quantized artifact (``manifest.weight_precision`` int4 or
int8) is measured with what decides its usefulness instead:

- teacher-forced top-1 agreement: over every position of the given sequences,
  the fraction where the artifact's argmax next token equals eager fp32's;
- mean KL divergence KL(p_fp32 || p_quantized) of the next-token distributions,
  in nats, averaged over the same positions;
- for an artifact with linear self-speculation: its mean acceptance length
  (tokens accepted per verify) relative to the unquantized model's (eager fp32
  linear-spec, which the fp32 artifact reproduces token for token).

Each precision passes or fails on its own thresholds (QUANT_THRESHOLDS).
Teacher forcing runs the artifact's prefill graph over the whole sequence in
prefill-length chunks on the runtime's cache, so the artifact's logits at
every position come from its own graphs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from nemocompile.errors import NemocompileError
from nemocompile.artifact.manifest import Manifest
from nemocompile.model import TriModeModel


@dataclass(frozen=True)
class QuantThresholds:
    top1: float  # teacher-forced top-1 agreement with eager fp32, at least
    kl: float  # mean KL(fp32 || quantized) in nats, at most
    acceptance_ratio: float  # linear-spec acceptance length / the unquantized model's, at least


# int8 (per-block, weight-only) should be all but lossless; int4 keeps the greedy
# choice where the model is sure and the drafter's acceptance within 10% (issue 17's targets).
QUANT_THRESHOLDS = {
    "int8": QuantThresholds(top1=0.95, kl=0.02, acceptance_ratio=0.90),
    "int4": QuantThresholds(top1=0.85, kl=0.15, acceptance_ratio=0.90),
    # TensorRT Q/DQ (ModelOpt), measured on ONNX Runtime CPU (README): fp8 quantizes activations too
    "fp8": QuantThresholds(top1=0.85, kl=0.15, acceptance_ratio=0.90),
    "int4-awq": QuantThresholds(top1=0.85, kl=0.15, acceptance_ratio=0.90),
    # W4A4: activations in 4 bits too; measured by emulation (nvfp4_emulation.py), TensorRT runs it
    "nvfp4": QuantThresholds(top1=0.85, kl=0.15, acceptance_ratio=0.90),
}


# ---- the measures ------------------------------------------------------------
def top1_agreement(reference: np.ndarray, test: np.ndarray) -> float:
    """Fraction of positions where the argmax over the last axis agrees; logits [..., V]."""
    reference, test = np.asarray(reference), np.asarray(test)
    if reference.shape != test.shape or reference.size == 0:
        raise ValueError(f"logits must have one non-empty shape, got {reference.shape} and {test.shape}")
    return float(np.mean(reference.argmax(-1) == test.argmax(-1)))


def mean_kl(reference: np.ndarray, test: np.ndarray) -> float:
    """Mean over positions of KL(softmax(reference) || softmax(test)) in nats; logits [..., V]."""
    ref = torch.log_softmax(torch.as_tensor(np.asarray(reference), dtype=torch.float64), dim=-1)
    tst = torch.log_softmax(torch.as_tensor(np.asarray(test), dtype=torch.float64), dim=-1)
    if ref.shape != tst.shape or ref.numel() == 0:
        raise ValueError(f"logits must have one non-empty shape, got {tuple(ref.shape)} and {tuple(tst.shape)}")
    return float((ref.exp() * (ref - tst)).sum(-1).mean())


def mean_acceptance(per_cycle: Sequence[Sequence[float]]) -> float:
    """Tokens accepted per verify over every cycle of every prompt (prompts weighted by their cycles)."""
    cycles = [a for prompt in per_cycle for a in prompt]
    return float(np.mean(cycles)) if cycles else float("nan")


# ---- teacher forcing ---------------------------------------------------------
def eager_teacher_forced(model: TriModeModel, ids: Sequence[int]) -> np.ndarray:
    """Eager causal logits [T, V] at every position of ``ids`` (no cache)."""
    with torch.no_grad():
        x = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
        return model(x, pattern="causal")[0].float().cpu().numpy()


def artifact_teacher_forced(rt, ids: Sequence[int]) -> np.ndarray:
    """The artifact's causal logits [T, V] at every position of ``ids``: its prefill graph run over the
    sequence in prefill-length chunks, each chunk's keys and values written to the runtime's cache."""
    T, P, B = len(ids), rt.prefill_length, rt.batch_size
    if T + P > rt.capacity:
        ids = list(ids)[: rt.capacity - P]
        T = len(ids)
    seq = np.asarray(ids, dtype=np.int64)
    io = rt.io[("prefill", P)]
    if io.logits is None:
        raise NemocompileError("quantized parity compares logits, and this artifact was exported with "
                               "--greedy-only (no logits); re-export it without --greedy-only")
    out = []
    with rt.exclusive():  # the runtime's one cache: no generation may run meanwhile
        rt.cache.reset(np.zeros(B, dtype=np.int64))  # every row decodes the same sequence
        for start in range(0, T, P):
            n = min(P, T - start)
            io.input_ids[:, :n] = seq[start:start + n]
            io.input_ids[:, n:] = 0
            rt.run(("prefill", P), range(B))
            out.append(np.array(io.logits[0, :n], dtype=np.float32))
            rt.cache.write(io.present_k, io.present_v, n)
    return np.concatenate(out)


# ---- the report --------------------------------------------------------------
@dataclass
class QuantParityReport:
    artifact: str
    precision: str
    method: str | None
    sequences: int
    positions: int
    top1: float
    kl: float
    acceptance: float | None  # the artifact's linear-spec acceptance length (None: no linear-spec graphs)
    acceptance_reference: float | None  # the unquantized model's, same prompts
    thresholds: QuantThresholds

    @property
    def acceptance_ratio(self) -> float | None:
        if self.acceptance is None or not self.acceptance_reference:
            return None
        return self.acceptance / self.acceptance_reference

    @property
    def checks(self) -> dict[str, bool]:
        t = self.thresholds
        out = {"top1": self.top1 >= t.top1, "kl": self.kl <= t.kl}
        if self.acceptance_ratio is not None:
            out["acceptance"] = self.acceptance_ratio >= t.acceptance_ratio
        return out

    @property
    def ok(self) -> bool:
        return all(self.checks.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(ok=self.ok, checks=self.checks, acceptance_ratio=self.acceptance_ratio)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        t, c = self.thresholds, self.checks
        mark = {True: "ok", False: "FAIL"}
        lines = [f"quantized parity of {self.artifact} ({self.precision} {self.method or ''} weights) against "
                 f"eager fp32; {self.sequences} sequences, {self.positions} teacher-forced positions",
                 f"{'measure':<26}{'value':>10}{'threshold':>12}  result",
                 f"{'top-1 agreement':<26}{self.top1:>10.3f}{'>= ' + format(t.top1, '.2f'):>12}  {mark[c['top1']]}",
                 f"{'mean KL (nats)':<26}{self.kl:>10.4f}{'<= ' + format(t.kl, '.3f'):>12}  {mark[c['kl']]}"]
        if self.acceptance_ratio is not None:
            lines.append(f"{'acceptance vs fp32':<26}{self.acceptance_ratio:>10.3f}"
                         f"{'>= ' + format(t.acceptance_ratio, '.2f'):>12}  {mark[c['acceptance']]}"
                         f"  ({self.acceptance:.2f} vs {self.acceptance_reference:.2f} tokens per verify)")
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)


def check_quantized_parity(artifact_dir: str | Path, model: TriModeModel | str | Path | None = None,
                           prompts: Sequence | None = None, max_new_tokens: int = 32,
                           threads: int | None = 1) -> QuantParityReport:
    """Teacher-forced top-1 and KL of a quantized artifact against the eager fp32 model over ``prompts``
    (default: the held-out prompts), and its linear-spec acceptance length against the fp32 model's."""
    from nemocompile.decode import encode_prompts, generate
    from nemocompile.checks.parity import ParityError, default_prompts, reference_model
    from nemocompile.runtime import Runtime

    manifest = Manifest.load(artifact_dir)
    kind = quantized_kind(manifest)
    if kind not in QUANT_THRESHOLDS:
        raise ParityError(f"{artifact_dir}: weights are {manifest.weight_precision}, not quantized; "
                          "use `nemocompile parity` (the fp32 tolerance applies)")
    fp32 = reference_model(_as_fp32(manifest), model)
    prompts = list(prompts) if prompts else default_prompts(fp32, count=1000)
    sequences = [encode_prompts(fp32, p)[0][0] for p in prompts]
    eos = -1  # fixed lengths: both sides verify the same number of blocks

    def eager_acceptance(m: TriModeModel) -> float:
        return mean_acceptance([generate(m, p, mode="linear-spec", max_new_tokens=max_new_tokens, eos_token_id=eos,
                                         block_length=manifest.block_length).stats.acceptance_lengths
                                for p in sequences])

    acceptance = reference = None
    if kind == "nvfp4":  # TensorRT only: measured on the artifact's own weights and scales, emulated in eager
        from nemocompile.checks.nvfp4_emulation import emulated_model

        emulated = emulated_model(artifact_dir, fp32)
        ref = [eager_teacher_forced(fp32, ids) for ids in sequences]
        got = [eager_teacher_forced(emulated, ids) for ids in sequences]
        if "linear-spec" in manifest.modes:
            acceptance, reference = eager_acceptance(emulated), eager_acceptance(fp32)
        method = "emulated on CPU (ModelOpt NVFP4QTensor), not TensorRT"
    else:
        with Runtime.load(artifact_dir, backend="onnxruntime", threads=threads) as rt:
            ref, got = [], []
            for ids in sequences:
                q = artifact_teacher_forced(rt, ids)
                ref.append(eager_teacher_forced(fp32, ids)[: len(q)])
                got.append(q)
            if "linear-spec" in manifest.modes:
                acceptance = mean_acceptance([rt.generate(p, mode="linear-spec", max_new_tokens=max_new_tokens,
                                                          eos=eos).stats.acceptance_lengths for p in sequences])
                reference = eager_acceptance(fp32)
        method = (manifest.quantization or manifest.precision_details or {}).get(
            "method", (manifest.precision_details or {}).get("calibration"))
    ref_all, got_all = np.concatenate(ref), np.concatenate(got)
    return QuantParityReport(str(artifact_dir), kind, method,
                             len(sequences), len(ref_all), top1_agreement(ref_all, got_all), mean_kl(ref_all, got_all),
                             acceptance, reference, QUANT_THRESHOLDS[kind])


def quantized_kind(manifest: Manifest) -> str:
    """"int4"/"int8" (MatMulNBits), "fp8"/"int4-awq"/"nvfp4" (TensorRT Q/DQ) or "float"."""
    return manifest.weight_precision if manifest.weight_precision != "float" else manifest.precision


def _as_fp32(manifest: Manifest) -> Manifest:
    """The manifest as reference_model reads it, asking for the fp32 model whatever the export dtype."""
    import dataclasses

    return dataclasses.replace(manifest, dtype="fp32")


__all__ = ["QUANT_THRESHOLDS", "QuantThresholds", "QuantParityReport", "check_quantized_parity", "top1_agreement",
           "mean_kl", "mean_acceptance", "eager_teacher_forced", "artifact_teacher_forced"]
