"""TensorRT-engine backend: one serialized engine per step, run with enqueueV3.

Written against the TensorRT 10 Python API (name-based I/O: ``num_io_tensors``,
``get_tensor_name``, ``set_tensor_address``, ``execute_async_v3``). Engines are
built on the target GPU from the artifact's ONNX graphs by ``build_engines``
(``nemocompile build``): one strongly typed engine per graph, so an engine runs
in the dtype the graph was exported in (``nemocompile export --dtype bf16``
for a B200), written as ``<graph file stem>.engine`` next to its graph, plus
``engines.json``, the build record this backend checks the engines against
(same graphs, same GPU architecture) before it loads them. Device buffers are torch CUDA tensors; the small host inputs
(``input_ids``, ``cache_len``, ``row_start``) are copied to staging tensors before
a step and the host outputs (``candidate``, ``confidence``, ``logits`` where the graph has them)
copied back after it.

The graphs' two dynamic dimensions (the forward's rows ``b`` and the cache slots
it reads ``n``, see nemocompile/artifact/manifest.py) become one optimization profile per
engine spanning 1 .. the manifest's largest shape; a step sets the input shapes
of its ``b`` and ``n`` (``set_input_shape``) and binds prefixes of the static
buffers (every per-forward buffer is batch-first, so its first b rows are
contiguous, and ``slots`` is a prefix of a static 0 .. C-1 array). The attention
itself is the ONNX graph's (a gather of the used slots, then dense attention
over them), so its work follows the rows' lengths on TensorRT as on ONNX Runtime.

Not exercised on the CPU-only development machine: there both the build and
the backend fail early with the message below.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from nemocompile.errors import BackendUnavailableError

from . import GraphKey, StepIO, torch_device_array

NO_GPU = ("no NVIDIA GPU found: TensorRT engines must be built on the target GPU; "
          "use --backend onnxruntime to run on CPU")


BUILD_RECORD = "engines.json"


def engine_path(artifact_dir: Path, graph) -> Path:
    """Where the engine built from ``graph`` lives."""
    return Path(artifact_dir) / Path(graph.file).with_suffix(".engine")


def import_tensorrt():
    """``(tensorrt, torch)`` where a GPU, TensorRT >= 10 and a CUDA torch are all present; else a clear error."""
    if not (os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/version")):
        raise BackendUnavailableError(NO_GPU)
    try:
        import tensorrt as trt
        import torch
    except ImportError as e:
        raise BackendUnavailableError(f"TensorRT engines need tensorrt and a CUDA build of torch ({e}); "
                                      "pip install 'nemocompile[tensorrt]' on the GPU machine") from None
    if not torch.cuda.is_available():
        raise BackendUnavailableError(NO_GPU + " (torch sees no CUDA device)")
    if not hasattr(trt, "__version__"):  # `tensorrt-stubs` alone makes `import tensorrt` an empty namespace
        raise BackendUnavailableError("TensorRT is not installed (only its type stubs are); "
                                      "pip install 'nemocompile[tensorrt]' on the GPU machine")
    if int(trt.__version__.split(".")[0]) < 10:
        raise BackendUnavailableError(f"TensorRT {trt.__version__} is too old: nemocompile uses the TensorRT 10 API "
                                      "(B200 needs 10.8 or newer); pip install 'nemocompile[tensorrt]'")
    return trt, torch


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sources(artifact_dir: Path, manifest) -> dict:
    """Per graph step, what its engine is built from: the graph file, the manifest and the weights file
    (size and mtime: hashing many GB of weights on every load would cost more than the load)."""
    shared: dict[str, object] = {"manifest_sha256": _sha256(artifact_dir / "manifest.json")}
    if manifest.weights_file:
        st = (artifact_dir / manifest.weights_file).stat()
        shared["weights"] = {"file": manifest.weights_file, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {g.step: {"graph_sha256": _sha256(artifact_dir / g.file), **shared} for g in manifest.graphs}


def _gpu(torch, device: str) -> dict:
    major, minor = torch.cuda.get_device_capability(device)
    return {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}


def build_engines(artifact_dir, manifest, *, workspace_gb: float | None = None, opt_level: int = 3,
                  timing_cache: str | None = None, force: bool = False, device: str = "cuda",
                  log=lambda msg: None) -> dict:
    """Build one TensorRT engine per graph of the artifact on this GPU; returns the build record.

    Each graph is parsed with TensorRT's ONNX parser into a strongly typed
    network (precision is the graph's: export with ``--dtype bf16`` or
    ``fp16`` for reduced precision) and built with ``build_serialized_network``.
    Engines that the record says are up to date (same graph, manifest, weights
    and GPU architecture) are kept unless ``force``. Every engine and the record
    are written to a temporary name and renamed, so an interrupted build leaves
    no half-written engine behind. ``timing_cache``: a file whose kernel timings
    are reused and updated (later builds on the same GPU go faster).
    """
    _, torch = import_tensorrt()
    import tensorrt as trt  # by name, not from the tuple: mypy checks every use against TensorRT's stubs
    artifact_dir = Path(artifact_dir)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    gpu = _gpu(torch, device)
    record_path = artifact_dir / BUILD_RECORD
    old = json.loads(record_path.read_text()) if record_path.is_file() else {}
    same_target = old.get("gpu", {}).get("compute_capability") == gpu["compute_capability"] \
        and old.get("tensorrt_version") == trt.__version__
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    config0 = builder.create_builder_config()
    cache = config0.create_timing_cache(cache_bytes)
    engines = {}
    all_sources = _sources(artifact_dir, manifest)
    for graph in manifest.graphs:
        out = engine_path(artifact_dir, graph)
        sources = all_sources[graph.step]
        prev = old.get("engines", {}).get(graph.step)
        if not force and same_target and out.is_file() and prev and prev.get("sources") == sources:
            log(f"  {graph.step:<8} up to date ({out.name})")
            engines[graph.step] = prev
            continue
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(artifact_dir / graph.file)):
            errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
            raise BackendUnavailableError(f"{artifact_dir / graph.file}: TensorRT's ONNX parser rejected the graph "
                                          f"({errors}); `nemocompile check --artifact {artifact_dir}` lints it, "
                                          "re-export with a lower --opset if an operator is too new")
        config = builder.create_builder_config()
        config.add_optimization_profile(_profile(builder, network, graph))
        if workspace_gb:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        config.builder_optimization_level = opt_level
        config.set_timing_cache(cache, False)
        t0 = time.perf_counter()
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise BackendUnavailableError(f"TensorRT could not build an engine for {graph.file} (see its log above); "
                                          "try a larger --workspace-gb or run on --backend onnxruntime")
        seconds = time.perf_counter() - t0
        _write_atomic(out, memoryview(blob))
        engines[graph.step] = {"engine": out.name, "bytes": out.stat().st_size, "build_s": round(seconds, 2),
                               "sources": sources}
        log(f"  {graph.step:<8} built {out.name} ({out.stat().st_size / 1e6:.1f} MB, {seconds:.1f} s)")
    record = {"tensorrt_version": trt.__version__, "gpu": gpu, "strongly_typed": True,
              "dtype": manifest.dtype, "opt_level": opt_level, "engines": engines}
    _write_atomic(record_path, (json.dumps(record, indent=2) + "\n").encode())
    if timing_cache:
        _write_atomic(Path(timing_cache), memoryview(cache.serialize()))
    return record


def _profile(builder, network, graph):
    """One optimization profile over the graph's dynamic dimensions (the forward's rows and the
    slots it reads): each from 1 to the manifest's shape, tuned at the largest."""
    profile = builder.create_optimization_profile()
    largest = {spec.name: tuple(spec.shape) for spec in graph.inputs}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(tensor.shape[d] for d in range(len(tensor.shape)))
        if -1 in dims:
            top = largest[tensor.name]
            low = tuple(1 if d == -1 else d for d in dims)
            profile.set_shape(tensor.name, low, top, top)
    return profile


def _write_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def check_engines(artifact_dir: Path, manifest, torch, trt, device: str) -> None:
    """Refuse engines that were not built from this artifact on this GPU architecture with this TensorRT."""
    record_path = artifact_dir / BUILD_RECORD
    if not record_path.is_file():
        raise BackendUnavailableError(f"{artifact_dir}: no TensorRT engines (no {BUILD_RECORD}); run "
                                      f"`nemocompile build --artifact {artifact_dir}` on this GPU first")
    record = json.loads(record_path.read_text())
    gpu = _gpu(torch, device)
    if record.get("gpu", {}).get("compute_capability") != gpu["compute_capability"] \
            or record.get("tensorrt_version") != trt.__version__:
        raise BackendUnavailableError(
            f"{artifact_dir}: engines built with TensorRT {record.get('tensorrt_version')} for "
            f"{record.get('gpu', {}).get('name')} (sm {record.get('gpu', {}).get('compute_capability')}); this is "
            f"TensorRT {trt.__version__} on {gpu['name']} (sm {gpu['compute_capability']}): rebuild with "
            f"`nemocompile build --artifact {artifact_dir} --force`")
    sources = _sources(artifact_dir, manifest)
    for graph in manifest.graphs:
        entry = record.get("engines", {}).get(graph.step)
        if entry is None or entry.get("sources") != sources[graph.step]:
            raise BackendUnavailableError(f"{engine_path(artifact_dir, graph)}: missing or built from another export "
                                          f"of {graph.file}; run `nemocompile build --artifact {artifact_dir}`")


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, artifact_dir, manifest, device: str | None = None, **_):
        _, torch = import_tensorrt()
        import tensorrt as trt  # by name, not from the tuple: mypy checks every use against TensorRT's stubs

        self.trt, self.torch = trt, torch
        self.dir = Path(artifact_dir)
        self.device = device if device and device.startswith("cuda") else "cuda"
        check_engines(self.dir, manifest, torch, trt, self.device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.trt_runtime = trt.Runtime(self.logger)
        self.stream = torch.cuda.Stream(device=self.device)
        self.steps: dict[GraphKey, tuple] = {}
        self._engines: list = []
        # host inputs staged on the device once per step; shared by every engine
        N, C = manifest.batch_size, manifest.cache_capacity
        self._cache_len = torch.zeros(N, dtype=torch.int64, device=self.device)
        self._row_start = torch.zeros(N, dtype=torch.int64, device=self.device)
        self._rows = torch.zeros(N, dtype=torch.int64, device=self.device)
        self._slots = torch.arange(C, dtype=torch.int64, device=self.device)

    def allocate(self, shape, dtype: str):
        return torch_device_array(shape, dtype, self.device)

    def open(self, graph, io: StepIO, cache, slots) -> None:
        import tensorrt as trt  # loaded by __init__; by name so mypy checks its use against TensorRT's stubs

        t = self.torch
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
        # host outputs (the scheduler reads them) get device twins copied back after each run
        host = {name: getattr(io, name) for name in ("logits", "candidate", "confidence", "top_logprobs", "top_ids",
                                                     "next_logprob")
                if getattr(io, name) is not None}
        twins = {name: t.from_numpy(a).to(self.device) for name, a in host.items()}
        buffers = {"input_ids": ids, "cache_len": self._cache_len, "row_start": self._row_start, "rows": self._rows,
                   "slots": self._slots, "cache_k": cache.k, "cache_v": cache.v, "present_k": io.present_k,
                   "present_v": io.present_v, **twins}
        dynamic = []  # input names whose first dimension is b or n: their shapes are set per step
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if name not in buffers or buffers[name] is None:
                raise BackendUnavailableError(f"{path}: unexpected engine tensor {name!r}; rebuild the engine "
                                              "from this artifact")
            dims = engine.get_tensor_shape(name)  # trt.Dims: indexable, not typed as iterable
            want = tuple(dims[d] for d in range(len(dims)))
            have = tuple(buffers[name].shape)
            if len(want) != len(have) or any(w not in (-1, h) for w, h in zip(want, have)):
                raise BackendUnavailableError(f"{path}: tensor {name!r} has shape {want}, the manifest says "
                                              f"{have}; rebuild the engine")
            if -1 in want and engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                dynamic.append((name, have[1:]))
            context.set_tensor_address(name, buffers[name].data_ptr())
        self._engines.append(engine)
        copies = [(t.from_numpy(host[name]), twin) for name, twin in twins.items()]
        self.steps[(graph.step, graph.block_length)] = (context, io, ids, copies, dynamic)

    def run(self, key: GraphKey, b: int, n: int) -> None:
        context, io, ids, copies, dynamic = self.steps[key]
        t = self.torch
        for name, rest in dynamic:  # prefixes of static buffers: the addresses stay
            context.set_input_shape(name, (n if name == "slots" else b, *rest))
        with t.cuda.stream(self.stream):
            ids[:b].copy_(t.from_numpy(io.input_ids[:b]), non_blocking=True)
            self._cache_len[:b].copy_(t.from_numpy(io.cache_len[:b]), non_blocking=True)
            self._row_start[:b].copy_(t.from_numpy(io.row_start[:b]), non_blocking=True)
            self._rows[:b].copy_(t.from_numpy(io.rows[:b]), non_blocking=True)
            if not context.execute_async_v3(self.stream.cuda_stream):
                raise BackendUnavailableError(f"TensorRT failed to run the {key[0]!r} engine")
            for dst, src in copies:  # synchronizes: the scheduler reads these next
                dst[:b].copy_(src[:b])
        # present rows stay on the device; the runtime places them into the cache there
        self.stream.synchronize()

    def close(self) -> None:
        self.steps.clear()
        self._engines.clear()


__all__ = ["TensorRTBackend", "build_engines", "check_engines", "engine_path", "BUILD_RECORD", "NO_GPU"]
