"""Move every weight into the artifact's one shared external-data file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx_ir as ir
import torch

from .base import PassContext, PassResult

WEIGHTS_FILE = "weights.bin"
INLINE_BYTES = 1024  # smaller constants (shapes, scalars) stay inside the graph


class WeightStore:
    """One append-only file of tensors shared by all graphs of an artifact.

    Tensors are written once, deduplicated by content (and recognised by
    identity when they are model parameters), at offsets aligned for
    memory mapping (64 KiB for tensors of 1 MiB or more, 64 bytes otherwise);
    each graph refers to them by (location, offset, length).
    """

    def __init__(self, directory: str | Path, name: str = WEIGHTS_FILE):
        self.directory, self.name = Path(directory), name
        self._file = open(self.directory / name, "wb")
        # (dtype, shape, digest) or a parameter's identity -> (offset, length) in the file
        self._index: dict[tuple, tuple[int, int]] = {}
        self.offered_bytes = 0  # bytes all graphs asked to store (the unshared size)

    @property
    def size(self) -> int:
        return self._file.tell() if not self._file.closed else (self.directory / self.name).stat().st_size

    def put(self, tensor: ir.TensorProtocol, name: str) -> ir.ExternalTensor:
        self.offered_bytes += tensor.nbytes
        known = identity(tensor)
        where = self._index.get(known) if known is not None else None
        if where is None:
            data = tensor.tobytes()  # one tensor in flight
            digest = (tensor.dtype, tuple(tensor.shape), hashlib.blake2b(data, digest_size=16).digest())
            where = self._index.get(digest) or self._write(data)
            self._index[digest] = where
            if known is not None:
                self._index[known] = where
        offset, length = where
        return ir.ExternalTensor(self.name, offset, length, tensor.dtype, shape=ir.Shape(tensor.shape),
                                 name=name, base_dir=str(self.directory))

    def _write(self, data: bytes) -> tuple[int, int]:
        align = 65536 if len(data) >= 1 << 20 else 64
        offset = -(-self._file.tell() // align) * align
        self._file.seek(offset)
        self._file.write(data)
        self._file.flush()  # later passes may read it back through a memory map
        return offset, len(data)

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())  # on disk before the manifest that makes it an artifact
            self._file.close()


def weight_key(tensor: ir.TensorProtocol) -> tuple:
    """What tells one weight from another across graphs: its parameter identity when known,
    else its dtype, shape and a digest of its bytes."""
    known = identity(tensor)
    if known is not None:
        return known
    return (tensor.dtype, tuple(tensor.shape), hashlib.blake2b(tensor.tobytes(), digest_size=16).digest())


def identity(tensor: ir.TensorProtocol) -> tuple | None:
    """Which model parameter (and transpose of it) ``tensor`` is, when that is
    known without reading it: the same parameter seen again by the next graph
    is then neither re-read nor re-hashed. None: only its content can tell."""
    from .fold_weight_transposes import TransposedWeight

    streamed = getattr(tensor, "weight_identity", None)  # a weight read from the checkpoint on demand
    if streamed is not None:
        return streamed
    if isinstance(tensor, TransposedWeight):
        inner = identity(tensor.source)
        return None if inner is None else (*inner, "T", tensor.perm)
    raw = getattr(tensor, "raw", None)
    # Only a model parameter lives for the whole export. A constant the trace made (an attention
    # rule of a layout) is freed after its graph, and the next graph's constant can get the same
    # address: trusting its address once gave the denoise graph the causal mask of the prefill.
    if isinstance(raw, torch.nn.Parameter):  # the exporter's TorchTensor of a live model parameter
        return ("torch", raw.data_ptr(), tuple(raw.shape), tuple(raw.stride()), str(raw.dtype))
    return None


def share_weights(model: ir.Model, ctx: PassContext) -> PassResult:
    """Values unchanged; every initializer of INLINE_BYTES or more becomes a
    reference into ctx.weights (written once per distinct content)."""
    if ctx.weights is None:
        return PassResult(model, modified=False, notes=["declined: no weight store for this export"])
    moved = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes < INLINE_BYTES:
            continue
        value.const_value = ctx.weights.put(tensor, value.name)
        moved += 1
    return PassResult(model, modified=moved > 0, count=moved)
