"""Export a model's static decode graphs as one artifact directory.

``export_artifact`` traces one StepModule per step kind with
``torch.onnx.export(dynamo=True)``, runs every graph through the pass pipeline
(passes/pipeline.py), and writes ``<step>.onnx`` files sharing one
``weights.bin``, the tokenizer files and ``manifest.json``. Everything is
written into a temporary sibling directory renamed onto ``out_dir`` at the
end: a failed or interrupted export leaves nothing that looks like an artifact.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import ml_dtypes
import onnx_ir as ir
import torch

from nemocompile.artifact.files import check_export_destination, describe_files
from nemocompile.errors import NemocompileError
from nemocompile.artifact.manifest import MANIFEST, GraphSpec, Manifest
from nemocompile.model import TriModeModel
from nemocompile.passes.base import PassContext, PassResult
from nemocompile.passes.check_onnx import check_onnx
from nemocompile.passes.pipeline import STAGE_NAMES, PipelineOptions, run_description_pipeline, run_pipeline
from nemocompile.passes.quantize_qdq import NVFP4_BLOCK, PRECISIONS, QdqSettings
from nemocompile.passes.quantize_weights import QuantSettings
from nemocompile.passes.share_weights import WEIGHTS_FILE, WeightStore
from nemocompile.text.tokenizer import TOKENIZER_FILES

from . import MODES, StepModule, plan
from .steps import INPUT_NAMES

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# TensorRT 10.0's ONNX parser reads opsets 9-20 (10.15: 9-24); 18 also keeps
# opset 23's fused Attention/RMSNormalization out of the graphs.
DEFAULT_OPSET = 18
DEFAULT_MAX_SEQ_LEN = 512
DEFAULT_PREFILL_LENGTH = 64


class ExportError(NemocompileError):
    """Bad export arguments, or an export that failed part way (nothing was written)."""


def export_artifact(
    model: TriModeModel | str | Path | None,
    out_dir: str | Path,
    modes: Sequence[str] | str = ("ar", "diffusion", "linear-spec", "quadratic-spec"),
    block_length: int | None = None,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
    batch_size: int = 1,
    dtype: str = "fp32",
    prefill_length: int | None = None,
    progress: Callable[[str], None] | bool | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    optimize: bool = True,
    share_weights: bool = True,
    overwrite: bool = False,
    dump_after: str | None = None,
    logits: bool = True,
    logprobs: bool = True,
    draft_groups: int | None = None,
    quantize: QuantSettings | None = None,
    calibration_prompts: Sequence | None = None,
    precision: str | QdqSettings | None = None,
) -> Manifest:
    """Export the graphs of ``modes`` ("all" or a list of ar, diffusion,
    linear-spec, quadratic-spec) and return the manifest written to ``out_dir``.

    ``model`` is a loaded model or a checkpoint directory (None: the embedded
    tiny model). From a directory the weights stream: the graphs are traced with
    fake parameters and each weight is read from the checkpoint, in ``dtype``,
    when a pass needs it, so no copy of the model is ever held (gptq and
    ``precision`` calibrate on the model, so they load it in ``dtype``). A
    loaded model in another dtype is converted on a copy (twice the memory).
    ``block_length`` (default: the config's block_size) is B of denoise /
    commit / draft / verify; ``prefill_length`` P (default min(64, max_seq_len))
    the prompt chunk; ``max_seq_len`` the cache capacity C; ``batch_size`` the
    static batch. ``logits=False`` makes a greedy-only artifact: no graph returns
    vocabulary-sized logits (token ids and confidences only; sampling then
    needs another export). ``logprobs=False``: no graph returns the top-20 log-probs and the
    input's next-token log-probs that OpenAI clients' ``logprobs``/``echo`` read (they are small:
    [B, T, 20]; on by default, greedy-only artifacts included). ``draft_groups`` G: quadratic-spec's fused step drafts for
    the first G acceptance points only (default: all B). ``progress``: True prints
    to stderr, or a callable(str).
    ``quantize``: weight-only int4/int8 (passes/quantize_weights.py); None keeps the weights in ``dtype``.
    ``calibration_prompts``: what gptq and ``precision`` calibrate on (default: nemocompile's own source, never
    held-out text). ``precision``: "fp8", "int4-awq" or "nvfp4" (fp16) Q/DQ graphs for TensorRT
    (passes/quantize_qdq.py), or QdqSettings (its dtype is set to ``dtype``).
    """
    say = _progress(progress)
    # Everything that can be checked before loading a (possibly large) checkpoint is.
    modes = _modes(modes)
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not 18 <= opset <= 23:
        raise ExportError(f"opset {opset!r} is not supported; use 18 to 23 (18, the default, suits TensorRT best)")
    quantizer = _quantizer(quantize, optimize)
    qdq = _qdq_quantizer(precision, quantize, optimize, dtype)
    out_dir = Path(out_dir)
    check_export_destination(out_dir, overwrite, ExportError)
    if dump_after is not None and dump_after not in STAGE_NAMES:
        raise ExportError(f"unknown stage {dump_after!r} for --dump-after; stages are {', '.join(STAGE_NAMES)}")
    # Without a calibration forward the weights never need to be in memory: they stream from the checkpoint.
    calibrates = qdq is not None or (quantizer is not None and quantizer.settings.method == "gptq")
    model = _model(model, DTYPES[dtype], say, lazy=not calibrates)
    cfg = model.config
    block_length = cfg.block_size if block_length is None else block_length
    prefill_length = min(DEFAULT_PREFILL_LENGTH, max_seq_len) if prefill_length is None else prefill_length
    _check_lengths(modes, block_length, prefill_length, max_seq_len, batch_size, cfg.max_position_embeddings)
    if quantizer is not None and quantizer.settings.method == "gptq":
        from nemocompile.checks.calibration import collect_activations, default_calibration_prompts

        say("collecting gptq calibration activations")
        quantizer.calibration = collect_activations(
            model, calibration_prompts or default_calibration_prompts(model), block_length=block_length)
    if qdq is not None:
        from nemocompile.checks.calibration import collect_activations, default_calibration_prompts

        say(f"collecting {precision} calibration activations")
        qdq.calibration = collect_activations(
            model, calibration_prompts or default_calibration_prompts(model), block_length=block_length)
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    if draft_groups is not None and (isinstance(draft_groups, bool) or not isinstance(draft_groups, int)
                                     or not 1 <= draft_groups <= block_length or "quadratic-spec" not in modes):
        raise ExportError(f"draft_groups must be an integer from 1 to the block length {block_length} and needs "
                          f"the quadratic-spec mode, got {draft_groups!r}")
    planned = plan(modes, block_length=block_length, prefill_length=prefill_length, has_lora=model.has_lora,
                   logits=logits, logprobs=logprobs, mode_options={"quadratic-spec": {"draft_groups": draft_groups}})
    # the description passes (fusion) run on the whole plan before anything is lowered
    graphs = list(zip(run_description_pipeline([s for s, _ in planned]), [used for _, used in planned]))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    store = None
    try:
        store = WeightStore(tmp) if share_weights else None
        specs = []
        options = PipelineOptions(optimize=optimize, share_weights=share_weights,
                                  quantize_weights=quantizer is not None, quantize_qdq=qdq is not None)
        traced: dict[tuple, tuple] = {}  # (layout, logits) -> (graph, step): identical steps trace once
        for i, (spec, used_by) in enumerate(graphs, 1):
            t0 = time.perf_counter()
            module = StepModule(model, spec)
            inputs, outputs = module.io_specs(batch_size, max_seq_len)
            file = f"{spec.step}.onnx"
            key = (spec.layout, spec.logits, spec.logprobs)
            if key in traced:
                # e.g. commit and verify: the same computation under two step kinds
                say(f"[{i}/{len(graphs)}] {spec.step}: same graph as {traced[key][1]}")
                _save(traced[key][0], tmp / file, share_weights)
            else:
                say(f"[{i}/{len(graphs)}] {spec.step}: tracing ({spec.layout.describe()}, C={max_seq_len}, "
                    f"batch={batch_size})")
                onnx_model = _trace(module, module.example_inputs(batch_size, max_seq_len),
                                    module.dynamic_shapes(batch_size, max_seq_len), spec, opset)
                _stream_weights(onnx_model, model.weight_source)
                ctx = PassContext(spec.step, inputs, outputs, weights=store, opset=opset,
                                  dump_dir=tmp.parent / f"{out_dir.name}.dump" if dump_after else None,
                                  quantizer=quantizer, qdq=qdq)
                results = run_pipeline(onnx_model, ctx, options, dump_after=dump_after)
                _save(onnx_model, tmp / file, share_weights)
                traced[key] = (onnx_model, spec.step)
                say(f"[{i}/{len(graphs)}] {spec.step}: {_summary(results)} ({time.perf_counter() - t0:.1f}s)")
            check_onnx(tmp / file)
            specs.append(GraphSpec(step=spec.step, file=file, modes=used_by, pattern=spec.pattern,
                                   writes_cache=spec.writes_cache, lora=spec.lora, block_length=spec.block_length,
                                   inputs=inputs, outputs=outputs, layout=spec.layout.to_dict()))
        del traced
        if store is not None:
            store.close()
        tokenizer_files = _copy_tokenizer(model, tmp)
        files = describe_files(tmp, [f.name for f in tmp.iterdir() if f.is_file() and f.name != MANIFEST])
        manifest = Manifest(
            model_config=cfg.to_dict(), config_hash=cfg.hash(), dtype=dtype, batch_size=batch_size,
            cache_capacity=max_seq_len, block_length=block_length, prefill_length=prefill_length,
            has_lora=model.has_lora, graphs=specs, tokenizer_files=tokenizer_files,
            weights_file=WEIGHTS_FILE if share_weights else None, opset=_qdq_opset(qdq, opset), source=model.source,
            files=files,
            **_quantization_fields(quantizer), **_qdq_fields(qdq),
        )
        manifest.validate(str(tmp / MANIFEST))
        manifest.save(tmp)  # last file written: a directory without it is not an artifact
        _replace(tmp, out_dir, overwrite)
    except BaseException:  # KeyboardInterrupt included: nothing half-written survives
        if store is not None:
            store.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"wrote {out_dir} ({_size(out_dir) / 2**20:.1f} MiB, modes: {', '.join(manifest.modes)})")
    return manifest


# ---- argument checks -------------------------------------------------------
def _modes(modes: Sequence[str] | str) -> list[str]:
    if isinstance(modes, str):
        modes = list(MODES) if modes == "all" else [modes]
    modes = list(dict.fromkeys(modes))
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ExportError(f"unknown mode {bad[0] if bad else '(none)'!r}; use one of {', '.join(MODES)} or all")
    return modes


def _quantizer(quantize, optimize: bool):
    from nemocompile.passes.quantize_weights import WeightQuantizer

    if quantize is None:
        return None
    if not optimize:
        raise ExportError("weight quantization needs the graph passes (it rewrites the folded weight MatMuls); "
                          "drop --no-optimize")
    return WeightQuantizer(quantize)  # checks the settings: one-line errors before any loading


def _qdq_quantizer(precision, quantize, optimize: bool, dtype: str):
    if precision is None:
        return None
    from nemocompile.passes.quantize_qdq import QdqQuantizer

    if quantize is not None:
        raise ExportError("--precision (TensorRT Q/DQ) and --weights (ONNX Runtime MatMulNBits) exclude each other; "
                          "choose one")
    if not optimize:
        raise ExportError("--precision needs the graph passes (it quantizes the folded weight MatMuls); "
                          "drop --no-optimize")
    settings = QdqSettings(precision=precision) if isinstance(precision, str) else precision
    return QdqQuantizer(replace(settings, dtype=dtype))  # one-line errors before any loading


def _qdq_opset(qdq, opset: int) -> int:
    """The opset the graphs hold: quantize_qdq raises it to what its Q/DQ nodes need (fp8 19, int4 21)."""
    return opset if qdq is None else max(opset, PRECISIONS[qdq.settings.precision][1])


def _qdq_fields(qdq) -> dict:
    if qdq is None:
        return {}
    s = qdq.settings
    details = {"fp8": {"library": "nvidia-modelopt onnx ptq", "block_size": None, "calibration": "entropy",
                       "activations": "fp8 per tensor"},
               "int4-awq": {"library": "nvidia-modelopt onnx ptq", "block_size": s.block_size,
                            "calibration": s.method, "activations": s.dtype},
               "nvfp4": {"library": "nvidia-modelopt NVFP4QuantExporter", "block_size": NVFP4_BLOCK,
                         "calibration": "activation amax",
                         "activations": "nvfp4 per 16, quantized at run time by TensorRT"}}[s.precision]
    return {"precision": s.precision,
            "precision_details": {**details, "mode": PRECISIONS[s.precision][0], "embedding": s.dtype,
                                  "lora": s.dtype}}


def _quantization_fields(quantizer) -> dict:
    if quantizer is None:
        return {}
    s = quantizer.settings
    return {"weight_precision": s.precision,
            "quantization": {"method": s.method, "block_size": s.block_size,
                             "symmetric": s.symmetric and s.method == "rtn", "library": "onnxruntime MatMulNBits",
                             "head": s.head,
                             "embedding": "float", "lora": "float", "compute": s.compute,
                             "activations": "float" if s.compute == "float" else "int8 per block inside MatMulNBits"}}


def _check_lengths(modes, block_length, prefill_length, capacity, batch_size, max_positions) -> None:
    for name, value in (("max_seq_len", capacity), ("batch_size", batch_size), ("prefill_length", prefill_length),
                        ("block_length", block_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ExportError(f"{name} must be a positive integer, got {value!r}")
    if any(m != "ar" for m in modes) and block_length < 2:
        raise ExportError(f"block_length must be at least 2 for diffusion and self-speculation, got {block_length}")
    if block_length > capacity:
        raise ExportError(f"block length {block_length} exceeds the cache capacity (max_seq_len) {capacity}; "
                          "raise --max-seq-len or lower --block-length")
    if prefill_length > capacity:
        raise ExportError(f"prefill length {prefill_length} exceeds the cache capacity (max_seq_len) {capacity}; "
                          "raise --max-seq-len or lower --prefill-length")
    if capacity > max_positions:
        raise ExportError(f"max_seq_len {capacity} exceeds the model's max_position_embeddings {max_positions}")


def _model(model, dtype: torch.dtype, say, lazy: bool) -> TriModeModel:
    if model is None or isinstance(model, (str, Path)):
        from nemocompile.model.loader import load

        say(f"{'checking' if lazy else 'loading'} {model or 'the embedded tiny model'} as {dtype}"
            + (" (weights stream from the checkpoint, one at a time)" if lazy else ""))
        return load(model, dtype=dtype, lazy=lazy)
    if not isinstance(model, TriModeModel):
        raise ExportError(f"model must be a TriModeModel or a checkpoint directory, got {type(model).__name__}")
    if model.dtype != dtype:
        say(f"converting a copy of the model from {model.dtype} to {dtype}")
    return cast_model(model, dtype).eval()


def cast_model(model: TriModeModel, dtype: torch.dtype) -> TriModeModel:
    """``model`` in ``dtype``: itself if it already is, else a converted copy
    (the rotary frequencies stay exact fp32, as the loader makes them)."""
    if model.dtype == dtype:
        return model
    from nemocompile.model.modeling import yarn_inv_freq

    source, tokenizer = model.source, model.tokenizer
    model = copy.deepcopy(model).to(dtype)
    model.inv_freq = yarn_inv_freq(model.config.rope, model.config.head_dim)[0].to(model.device)
    model.source, model.tokenizer = source, tokenizer
    return model


# ---- steps -----------------------------------------------------------------
def _trace(module: StepModule, args: tuple, dynamic_shapes, spec, opset: int):
    """The graph as an onnx_ir model, unoptimized (the pass pipeline optimizes it)."""
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), _quiet_loggers():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, verbose=False,
                                        dynamic_shapes=dynamic_shapes,
                                        input_names=list(INPUT_NAMES), output_names=list(spec.output_names),
                                        optimize=False, external_data=True)
        except Exception as e:
            raise ExportError(f"{spec.step}: torch.onnx.export failed ({type(e).__name__}: {e}); "
                              f"exporter output:\n{quiet.getvalue()[-2000:]}") from e
    return program.model


def _stream_weights(onnx_model, source) -> None:
    """A model loaded lazily was traced with fake weights: each becomes a CheckpointTensor, read
    (and converted to the export dtype) only when a pass or the weight store needs its bytes."""
    if source is None:
        return
    from torch._subclasses.fake_tensor import FakeTensor

    for value in onnx_model.graph.initializers.values():
        if isinstance(getattr(value.const_value, "raw", None), FakeTensor):
            name = value.name.removeprefix("model.")  # StepModule holds the model as .model
            if name not in source.files:
                raise ExportError(f"the traced graph holds {value.name!r}, which is not a checkpoint weight")
            value.const_value = CheckpointTensor(source, name, value.const_value)


class CheckpointTensor(ir.LazyTensor):
    """One checkpoint weight, read from its safetensors file each time its bytes are asked for."""

    def __init__(self, source, name: str, like):
        def read() -> ir.Tensor:
            t = source.read(name)
            if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
                return ir.Tensor(t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16), name=like.name)
            return ir.Tensor(t.numpy(), name=like.name)

        super().__init__(read, dtype=like.dtype, shape=ir.Shape(like.shape), name=like.name)
        self.weight_identity = source.identity(name)  # passes/share_weights.py identity()


@contextlib.contextmanager
def _quiet_loggers():
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _save(onnx_model, path: Path, shared: bool) -> None:
    if shared:
        ir.save(onnx_model, path)  # weights already live in weights.bin
    else:
        ir.save(onnx_model, path, external_data=path.with_suffix(".data").name)


def _summary(results: list[tuple[str, PassResult]]) -> str:
    parts = [f"{name} {r.count}" for name, r in results if r.count]
    findings = [f for _, r in results for f in r.findings]
    if findings:
        parts.append(f"{len(findings)} TensorRT findings")
    return ", ".join(parts) or "no rewrites"


def _copy_tokenizer(model: TriModeModel, directory: Path) -> list[str]:
    if not model.source:
        return []
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(model.source) / name
        if src.is_file():
            shutil.copy2(src, directory / name)
            copied.append(name)
    return copied


def _replace(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished temp dir onto out_dir (with ``overwrite``, an existing one is swapped
    out, then removed). Without it the rename itself is the check: it replaces nothing but an
    empty folder, so of two exports to one new ``--out`` the one that finishes second fails."""
    import errno

    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    if not overwrite:
        try:
            os.rename(tmp, out_dir)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            raise ExportError(f"{out_dir} exists (written while this export ran); choose another --out or pass "
                              "--force to replace it") from None
    elif out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except BaseException:  # Ctrl-C between the renames: the previous artifact goes back
            os.rename(old, out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())


def _progress(progress) -> Callable[[str], None]:
    if callable(progress):
        return progress
    if progress:
        import sys

        start = time.perf_counter()
        return lambda msg: print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)
    return lambda msg: None
