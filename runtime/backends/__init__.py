"""Backends execute one exported step by name on buffers the runtime bound once.

The interface is deliberately small, so an engine-based backend plugs in:

- ``allocate(shape, dtype)``: a zeroed device buffer (numpy on the CPU, a torch
  tensor on an accelerator) for the KV cache and the present rows;
- ``open(graph, io, cache, slots)``: load the graph once and bind its buffers
  (``io``'s host arrays, ``io.present_k``/``io.present_v`` and the cache on the
  device, ``slots`` the static 0 .. C-1 array whose prefix a forward reads);
- ``run(key, b, n)``: execute the step ``key = (step, block_length)`` in place for
  the first ``b`` entries of ``io``'s per-forward arrays, reading ``n`` cache slots;
- ``close()``.

A step reads ``input_ids``, ``cache_len``, ``row_start``, ``rows`` (entries
``0 .. b-1``), ``slots[:n]`` and the whole ``cache_k``/``cache_v``, and writes
entries ``0 .. b-1`` of ``candidate``/``confidence`` (``logits`` where the graph
keeps them, ``top_logprobs``/``top_ids``/``next_logprob`` where it returns log-probs,
``present_k``/``present_v`` for steps that write the cache); placing
the presents into the cache is the runtime's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from nemocompile.errors import NemocompileError

BACKENDS = ("onnxruntime", "torch", "tensorrt")
GraphKey = tuple  # (step, block_length)

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


@dataclass
class StepIO:
    """Host and device buffers of one graph, sized for the artifact's N rows; a forward of b
    rows uses entries ``0 .. b-1`` of each (contiguous prefixes). Entry j is the forward's j-th
    row, which reads and writes cache row ``rows[j]``."""

    input_ids: np.ndarray  # [N, L] int64, host
    logits: np.ndarray | None  # [N, T, V] float32, host (graphs that keep logits)
    present_k: Any  # [N, layers, kv_heads, S, head_dim] device buffer (steps that write the cache)
    present_v: Any
    candidate: np.ndarray | None = None  # [N, T] int64, host: per-position argmax
    confidence: np.ndarray | None = None  # [N, T] float32, host: and its softmax probability
    top_logprobs: np.ndarray | None = None  # [N, S, 20] float32, host: the best log-probs (graphs with logprobs)
    top_ids: np.ndarray | None = None  # [N, S, 20] int64, host: their token ids
    next_logprob: np.ndarray | None = None  # [N, L] float32, host: each input token's next input token's log-prob
    cache_len: np.ndarray | None = None  # [N] int64, host: the forward's rows' committed slots
    row_start: np.ndarray | None = None  # [N] int64, host
    rows: np.ndarray | None = None  # [N] int64, host: the cache row of each entry

    def __post_init__(self):
        N = self.input_ids.shape[0]
        for name in ("cache_len", "row_start", "rows"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(N, dtype=np.int64))


class Backend(Protocol):
    name: str
    device: str

    def allocate(self, shape: tuple[int, ...], dtype: str) -> Any: ...

    def open(self, graph, io: StepIO, cache, slots) -> None: ...

    def run(self, key: GraphKey, b: int, n: int) -> None: ...

    def close(self) -> None: ...


def torch_device_array(shape, dtype: str, device: str):
    """A zeroed torch tensor: the device buffer for accelerators and for dtypes numpy lacks."""
    import torch

    dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    return torch.zeros(shape, dtype=dt, device=device)


def host_or_torch_array(shape, dtype: str, device: str):
    """numpy on the CPU when numpy has the dtype (so cache writes are numpy slice assignments)."""
    if device == "cpu" and dtype in NUMPY_DTYPES:
        return np.zeros(shape, dtype=NUMPY_DTYPES[dtype])
    return torch_device_array(shape, dtype, device)


def create_backend(name: str, artifact_dir, manifest, device: str | None = None, **options) -> Backend:
    """The named backend; options are backend specific (``model`` for torch, ``threads``/
    ``providers`` for onnxruntime)."""
    if name != "onnxruntime" and getattr(manifest, "weight_precision", "float") != "float":
        raise NemocompileError(f"{artifact_dir}: {manifest.weight_precision} weights (ONNX Runtime's MatMulNBits) "
                               f"run on ONNX Runtime only; use --backend onnxruntime (or export float weights "
                               f"for --backend {name})")
    precision = getattr(manifest, "precision", "float")
    if name != "tensorrt" and precision == "nvfp4":
        raise NemocompileError(f"{artifact_dir}: nvfp4 graphs run on TensorRT only (a Blackwell GPU): their "
                               f"activations are quantized by TensorRT's TRT_FP4DynamicQuantize, which ONNX "
                               f"Runtime and torch cannot run; use --backend tensorrt, or export --precision fp8 "
                               f"or int4-awq to run here")
    if name == "torch" and precision != "float":
        raise NemocompileError(f"{artifact_dir}: {precision} Q/DQ graphs run on TensorRT or ONNX Runtime; "
                               f"the torch backend runs the float model; use --backend onnxruntime or tensorrt")
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(artifact_dir, manifest, device=device, **options)
    if name == "torch":
        from .torch import TorchBackend

        return TorchBackend(artifact_dir, manifest, device=device, **options)
    if name == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(artifact_dir, manifest, device=device, **options)
    raise NemocompileError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
