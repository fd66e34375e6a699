"""ONNX Runtime backend: one InferenceSession per graph, IO bound once per row count, run in place.

A graph runs for b rows (1 .. the artifact's batch) reading n cache slots. Its
buffers are bound to one IOBinding per b, made the first time a forward of b
rows runs: on the CPU as OrtValues wrapping prefixes of the runtime's numpy
arrays (ORT reads and writes that memory directly), on a GPU as raw device
pointers of torch tensors. A step rebinds only ``slots`` (a prefix view of a
static array, when n changed) and is then ``run_with_iobinding``: no per-step
allocation, no copies in or out of ORT.

Providers: the CPU provider by default; with onnxruntime-gpu and a GPU,
``device="cuda"`` uses the TensorRT and CUDA execution providers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nemocompile.errors import BackendUnavailableError

from . import NUMPY_DTYPES, GraphKey, StepIO, host_or_torch_array


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, artifact_dir, manifest, device: str | None = None, threads: int | None = None,
                 providers: list | None = None, spinning: bool = False, share_weights: bool = False):
        import onnxruntime as ort

        self.ort = ort
        self.dir = Path(artifact_dir)
        self.manifest = manifest
        available = ort.get_available_providers()
        if device is None:
            device = "cuda" if "CUDAExecutionProvider" in available and _has_nvidia_gpu() else "cpu"
        self.device = device
        if providers is None:
            providers = self._default_providers(device, available)
        self.providers = providers
        if manifest.dtype == "bf16":
            raise BackendUnavailableError(
                "this artifact is bf16, which ONNX Runtime's CPU provider does not run; re-export it with "
                "--dtype fp32 (or fp16), or use --backend torch")
        self.threads, self.spinning = threads, spinning
        self.share_weights = share_weights and device == "cpu" and manifest.weights_file is not None
        self._weights = None  # memory map of the shared weights file (share_weights)
        self.sessions: dict[GraphKey, object] = {}
        self.graphs: dict[GraphKey, tuple] = {}  # graph, its StepIO, the cache, the slots array
        self.bindings: dict[tuple, list] = {}  # (key, b) -> [IOBinding, bound slot count]
        self._keep: list = []  # OrtValues referenced by the bindings and the sessions

    @staticmethod
    def _default_providers(device: str, available: list[str]) -> list:
        if device == "cpu":
            return ["CPUExecutionProvider"]
        if not device.startswith("cuda"):
            raise BackendUnavailableError(f"unknown device {device!r} for onnxruntime; use 'cpu' or 'cuda'")
        if "CUDAExecutionProvider" not in available:
            raise BackendUnavailableError(
                "onnxruntime has no CUDAExecutionProvider here: install onnxruntime-gpu on a machine with an "
                "NVIDIA GPU, or use device='cpu'")
        out = []
        if "TensorrtExecutionProvider" in available:
            cache_dir = os.environ.get("NEMOCOMPILE_TRT_CACHE", str(Path.home() / ".cache" / "nemocompile" / "trt"))
            out.append(("TensorrtExecutionProvider", {"trt_engine_cache_enable": True,
                                                      "trt_engine_cache_path": cache_dir}))
        device_id = int(device.split(":")[1]) if ":" in device else 0
        out += [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        return out

    # ---- the backend interface ---------------------------------------------------
    def allocate(self, shape, dtype: str):
        return host_or_torch_array(shape, dtype, self.device)

    def open(self, graph, io: StepIO, cache, slots) -> None:
        path = self.dir / graph.file
        if not path.is_file():
            raise BackendUnavailableError(f"{path}: missing; the artifact is incomplete, re-export it")
        try:
            session = self.ort.InferenceSession(str(path), self._session_options(path), providers=self.providers)
        except Exception as e:  # ORT and protobuf raise their own types, with multi-line messages
            reason = " ".join(str(e).split())[:300]
            raise BackendUnavailableError(f"{path}: ONNX Runtime cannot load it ({reason}); the artifact may be "
                                          f"damaged: run `nemocompile check --artifact {self.dir}` or re-export it"
                                          ) from None
        names = {i.name for i in session.get_inputs()} | {o.name for o in session.get_outputs()}
        missing = {s.name for s in (*graph.inputs, *graph.outputs)} - names
        if missing:
            raise BackendUnavailableError(f"{path}: the graph lacks {sorted(missing)} that the manifest lists; "
                                          "re-export the artifact")
        key = (graph.step, graph.block_length)
        self.sessions[key] = session
        self.graphs[key] = (graph, io, cache, slots)

    def _binding(self, key: GraphKey, b: int):
        """The IOBinding of ``key`` for forwards of ``b`` rows: every per-forward buffer's first b
        entries, the whole cache; made once per (graph, b)."""
        graph, io, cache, slots = self.graphs[key]
        binding = self.sessions[key].io_binding()
        per_forward = {"input_ids": io.input_ids, "cache_len": io.cache_len, "row_start": io.row_start,
                       "rows": io.rows, "logits": io.logits, "present_k": io.present_k,
                       "present_v": io.present_v, "candidate": io.candidate, "confidence": io.confidence,
                       "top_logprobs": io.top_logprobs, "top_ids": io.top_ids, "next_logprob": io.next_logprob}
        whole = {"cache_k": cache.k, "cache_v": cache.v}
        for spec in graph.inputs:
            if spec.name != "slots":
                buf = whole[spec.name] if spec.name in whole else per_forward[spec.name][:b]
                self._bind(binding.bind_ortvalue_input, binding.bind_input, spec.name, buf, spec.dtype)
        for spec in graph.outputs:
            self._bind(binding.bind_ortvalue_output, binding.bind_output, spec.name, per_forward[spec.name][:b],
                       spec.dtype)
        entry = [binding, -1]  # the binding and the slot count it has bound
        self.bindings[(key, b)] = entry
        return entry

    def _session_options(self, path: Path):
        ort = self.ort
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        if self.threads:
            so.intra_op_num_threads = int(self.threads)
        # Spinning pool threads burn the cores between steps; on a shared machine they
        # slow everything (measured: 2-3x slower decoding), so they are off by default.
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        so.log_severity_level = 3
        if self.share_weights:
            self._add_shared_weights(so, path)
        return so

    def _add_shared_weights(self, so, path: Path) -> None:
        """Every session reads the weights from one memory map of the shared weights file
        instead of loading its own copy. For float weights prepacking is disabled, or ORT would
        copy them again; quantized weights keep it: MatMulNBits without its prepacked layout
        ran an 8B int4 AR step ~100x slower (0.03 against 4 tokens/s)."""
        import onnx
        from onnx.external_data_helper import uses_external_data

        if self._weights is None:
            self._weights = np.memmap(self.dir / self.manifest.weights_file, dtype=np.uint8, mode="r")
        types = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
                 onnx.TensorProto.INT64: np.int64, onnx.TensorProto.UINT8: np.uint8}  # uint8: packed int4/int8
        proto = onnx.load(str(path), load_external_data=False)
        for init in proto.graph.initializer:
            if not uses_external_data(init) or init.data_type not in types:
                continue
            info = {e.key: e.value for e in init.external_data}
            if info.get("location") != self.manifest.weights_file:
                continue
            start = int(info.get("offset", 0))
            data = self._weights[start:start + int(info["length"])].view(types[init.data_type])
            value = self.ort.OrtValue.ortvalue_from_numpy(data.reshape(tuple(init.dims)))
            self._keep.append(value)
            so.add_initializer(init.name, value)
        if self.manifest.weight_precision == "float":
            so.add_session_config_entry("session.disable_prepacking", "1")

    def _bind(self, bind_ortvalue, bind_raw, name: str, buf, dtype: str) -> None:
        if isinstance(buf, np.ndarray):
            value = self.ort.OrtValue.ortvalue_from_numpy(buf)  # wraps buf's memory, no copy
            self._keep.append(value)
            bind_ortvalue(name, value)
            return
        # a torch device tensor: bind its memory by pointer
        device_type = "cuda" if buf.is_cuda else "cpu"
        device_id = buf.device.index or 0
        if dtype == "bfloat16":
            raise BackendUnavailableError("binding bf16 buffers needs onnxruntime's OrtValue API; "
                                          "re-export the artifact with --dtype fp16")
        bind_raw(name, device_type, device_id, NUMPY_DTYPES[dtype], list(buf.shape), buf.data_ptr())

    def run(self, key: GraphKey, b: int, n: int) -> None:
        entry = self.bindings.get((key, b)) or self._binding(key, b)
        binding = entry[0]
        if entry[1] != n:
            slots = self.graphs[key][3]
            binding.bind_input("slots", "cpu", 0, np.int64, [n], slots.ctypes.data)  # a prefix view: no copy
            entry[1] = n
        self.sessions[key].run_with_iobinding(binding)

    def close(self) -> None:
        self.bindings.clear()
        self.graphs.clear()
        self.sessions.clear()
        self._keep.clear()


def _has_nvidia_gpu() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/version")
