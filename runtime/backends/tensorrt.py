"""TensorRT-engine backend: one serialized engine per step, run with enqueueV3.

Written against the TensorRT 10 Python API (name-based I/O: ``num_io_tensors``,
``get_tensor_name``, ``set_tensor_address``, ``execute_async_v3``). Engines are
built on the target GPU from the artifact's ONNX graphs (the TensorRT issue adds
that build); this backend looks for ``<graph file stem>.engine`` next to each
graph. Device buffers are torch CUDA tensors; the small host inputs
(``input_ids``, ``cache_len``, ``row_start``) are copied to staging tensors before
a step and ``logits`` copied back after it.

Not exercised on the CPU-only development machine: there it fails in the
constructor with the message below.
"""

from __future__ import annotations

import os
from pathlib import Path

from nemocompile.errors import BackendUnavailableError

from . import GraphKey, StepIO, torch_device_array

NO_GPU = ("no NVIDIA GPU found: TensorRT engines must be built on the target GPU; "
          "use --backend onnxruntime to run on CPU")


def engine_path(artifact_dir: Path, graph) -> Path:
    """Where the engine built from ``graph`` lives."""
    return artifact_dir / Path(graph.file).with_suffix(".engine")


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, artifact_dir, manifest, device: str | None = None, **_):
        if not (os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/version")):
            raise BackendUnavailableError(NO_GPU)
        try:
            import tensorrt as trt
            import torch
        except ImportError as e:
            raise BackendUnavailableError(f"the TensorRT backend needs tensorrt and a CUDA build of torch ({e}); "
                                          "pip install 'nemocompile[tensorrt]' on the GPU machine") from None
        if not torch.cuda.is_available():
            raise BackendUnavailableError(NO_GPU + " (torch sees no CUDA device)")
        self.trt, self.torch = trt, torch
        self.dir = Path(artifact_dir)
        self.device = device if device and device.startswith("cuda") else "cuda"
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.trt_runtime = trt.Runtime(self.logger)
        self.stream = torch.cuda.Stream(device=self.device)
        self.steps: dict[GraphKey, tuple] = {}
        self._engines: list = []
        # host inputs staged on the device once per step; shared by every engine
        self._cache_len = torch.zeros((), dtype=torch.int64, device=self.device)
        self._row_start = torch.zeros(manifest.batch_size, dtype=torch.int64, device=self.device)

    def allocate(self, shape, dtype: str):
        return torch_device_array(shape, dtype, self.device)

    def open(self, graph, io: StepIO, cache) -> None:
        t, trt = self.torch, self.trt
        path = engine_path(self.dir, graph)
        if not path.is_file():
            raise BackendUnavailableError(f"{path}: no TensorRT engine for the {graph.step!r} graph; build the "
                                          "artifact's engines on this GPU first")
        engine = self.trt_runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BackendUnavailableError(f"{path}: TensorRT could not deserialize it (built with another "
                                          "TensorRT version or GPU?); rebuild the engines on this machine")
        context = engine.create_execution_context()
        ids = t.zeros(io.input_ids.shape, dtype=t.int64, device=self.device)
        logits = t.zeros(io.logits.shape, dtype=t.float32, device=self.device)
        buffers = {"input_ids": ids, "cache_len": self._cache_len, "row_start": self._row_start,
                   "cache_k": cache.k, "cache_v": cache.v, "logits": logits,
                   "present_k": io.present_k, "present_v": io.present_v}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if name not in buffers or buffers[name] is None:
                raise BackendUnavailableError(f"{path}: unexpected engine tensor {name!r}; rebuild the engine "
                                              "from this artifact")
            want = tuple(engine.get_tensor_shape(name))
            if want != tuple(buffers[name].shape):
                raise BackendUnavailableError(f"{path}: tensor {name!r} has shape {want}, the manifest says "
                                              f"{tuple(buffers[name].shape)}; rebuild the engine")
            context.set_tensor_address(name, buffers[name].data_ptr())
        self._engines.append(engine)
        self.steps[(graph.step, graph.block_length)] = (context, io, ids, logits, cache)

    def run(self, key: GraphKey) -> None:
        context, io, ids, logits, cache = self.steps[key]
        t = self.torch
        with t.cuda.stream(self.stream):
            ids.copy_(t.from_numpy(io.input_ids), non_blocking=True)
            self._cache_len.fill_(int(cache.cache_len))
            self._row_start.copy_(t.from_numpy(cache.row_start), non_blocking=True)
            if not context.execute_async_v3(self.stream.cuda_stream):
                raise BackendUnavailableError(f"TensorRT failed to run the {key[0]!r} engine")
            t.from_numpy(io.logits).copy_(logits)  # synchronizes: the scheduler reads logits next
        # present rows stay on the device; the runtime places them into the cache there
        self.stream.synchronize()

    def close(self) -> None:
        self.steps.clear()
        self._engines.clear()


__all__ = ["TensorRTBackend", "engine_path", "NO_GPU"]
