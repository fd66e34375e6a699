"""Weight-only int4/int8 artifacts (passes/quantize_weights.py): the expected ops, the same I/O, every mode."""

from __future__ import annotations

import functools
from pathlib import Path

import onnx
import pytest
from conftest import make_model
from tiny_artifacts import _ROOT, BLOCK, CAPACITY, PREFILL, lora_batch2

from nemocompile.errors import NemocompileError
from nemocompile.graphs.export import export_artifact
from nemocompile.artifact.manifest import Manifest
from nemocompile.passes.quantize_weights import QuantSettings
from nemocompile.runtime import Runtime

PROMPTS = [[5, 9, 11, 7, 30], [40, 41, 42]]


@functools.cache
def quantized(precision: str = "int4", method: str = "rtn") -> Path:
    """The lora_batch2 model (every mode, LoRA, batch 2) exported with quantized weights."""
    model, _ = lora_batch2()
    out = _ROOT / f"lora_batch2_{precision}_{method}"
    export_artifact(model, out, modes="all", block_length=BLOCK, max_seq_len=CAPACITY, batch_size=2,
                    prefill_length=PREFILL, quantize=QuantSettings(precision=precision, method=method, block_size=16))
    return out


def _ops(path: Path) -> dict[str, list[onnx.NodeProto]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    out: dict[str, list] = {"MatMulNBits": [], "weight MatMul": []}
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            out["MatMulNBits"].append(node)
        elif node.op_type == "MatMul" and node.input[1] in inits:
            out["weight MatMul"].append(node)
    return out


@pytest.mark.parametrize("precision", ["int4", pytest.param("int8", marks=pytest.mark.slow)])
def test_quantized_graphs_use_matmulnbits_and_keep_the_io(precision):
    _, float_dir = lora_batch2()
    qdir = quantized(precision)
    fm, qm = Manifest.load(float_dir), Manifest.load(qdir)
    assert qm.weight_precision == precision and qm.quantization["method"] == "rtn"
    assert qm.quantization["block_size"] == 16 and fm.weight_precision == "float" and fm.quantization is None
    layers = qm.model_config["num_hidden_layers"]
    for fg, qg in zip(fm.graphs, qm.graphs):
        assert (qg.step, qg.inputs, qg.outputs) == (fg.step, fg.inputs, fg.outputs), "quantization changed the I/O"
        ops = _ops(qdir / qg.file)
        assert len(ops["MatMulNBits"]) == 7 * layers + 1, f"{qg.step}: q/k/v/o, gate/up/down per layer and the head"
        bits = {n.input[1]: a.i for n in ops["MatMulNBits"] for a in n.attribute if a.name == "bits"}
        head = [w for w in bits if "diffusion_head" in w]
        assert len(head) == 1 and bits[head[0]] == 8, "the head is int8 by default"
        assert {b for w, b in bits.items() if w not in head} == {int(precision[3:])}
        # only the drafter LoRA keeps float weight MatMuls (two per layer, draft graph only)
        assert all("lora_" in n.input[1] for n in ops["weight MatMul"]), qg.step
        assert len(ops["weight MatMul"]) == (2 * layers if qg.lora else 0), qg.step


def test_the_shared_weights_file_holds_each_quantized_weight_once():
    _, float_dir = lora_batch2()
    qdir = quantized("int4")
    manifest = Manifest.load(qdir)
    seen: dict[str, set] = {}
    for g in manifest.graphs:
        for init in onnx.load(str(qdir / g.file), load_external_data=False).graph.initializer:
            where = {e.key: e.value for e in init.external_data}
            if where:
                seen.setdefault(init.name, set()).add((where["offset"], where["length"]))
    packed = [name for name in seen if name.endswith("_Q4")]
    assert packed and all(len(seen[n]) == 1 for n in packed), "a packed weight was written twice"
    float_bytes = (float_dir / "weights.bin").stat().st_size
    q_bytes = (qdir / "weights.bin").stat().st_size
    assert q_bytes < 0.5 * float_bytes, (q_bytes, float_bytes)


@pytest.mark.parametrize("precision", ["int4", pytest.param("int8", marks=pytest.mark.slow)])
def test_quantized_artifact_generates_in_every_mode_and_self_speculation_stays_lossless(precision):
    """Self-speculation on the quantized artifact writes exactly its own AR greedy output."""
    with Runtime.load(quantized(precision), backend="onnxruntime", threads=1) as rt:
        for prompt in PROMPTS:
            ar = rt.generate(prompt, mode="ar", max_new_tokens=12, eos=-1)
            spec = rt.generate(prompt, mode="linear-spec", max_new_tokens=12, eos=-1)
            diff = rt.generate(prompt, mode="diffusion", max_new_tokens=12, eos=-1)
            assert len(ar.tokens) == 12 and len(diff.tokens) == 12
            assert spec.tokens == ar.tokens, f"{precision} {prompt}: linear-spec differs from AR greedy"


def test_hqq_artifact_exports_and_decodes(tmp_path):
    qdir = tmp_path / "hqq"
    export_artifact(make_model(), qdir, modes="ar", max_seq_len=16, prefill_length=8,
                    quantize=QuantSettings(method="hqq", block_size=16))
    assert Manifest.load(qdir).quantization["method"] == "hqq"
    assert len(_ops(qdir / "ar_step.onnx")["MatMulNBits"]) == 7 * 2 + 1
    with Runtime.load(qdir, backend="onnxruntime", threads=1) as rt:
        assert len(rt.generate(PROMPTS[0], mode="ar", max_new_tokens=6, eos=-1).tokens) == 6


@pytest.mark.parametrize("settings, match", [
    (QuantSettings(precision="int3"), "unknown weight precision 'int3'; use int4 or int8"),
    (QuantSettings(method="awq"), "unknown quantization method 'awq'"),
    (QuantSettings(block_size=24), "block size 24 is not supported; use one of 16, 32"),
    (QuantSettings(precision="int8", method="hqq"), "hqq quantizes to int4 only"),
    (QuantSettings(precision="int8", method="gptq"), "gptq quantizes to int4 only"),
])
def test_bad_quantization_settings_fail_before_anything_is_written(settings, match, tmp_path):
    with pytest.raises(NemocompileError, match=match):
        export_artifact(make_model(), tmp_path / "a", modes="ar", max_seq_len=16, prefill_length=8, quantize=settings)
    assert not (tmp_path / "a").exists()


def test_quantization_needs_the_graph_passes(tmp_path):
    with pytest.raises(NemocompileError, match="needs the graph passes.*drop --no-optimize"):
        export_artifact(make_model(), tmp_path / "a", modes="ar", max_seq_len=16, prefill_length=8,
                        optimize=False, quantize=QuantSettings())


@pytest.mark.parametrize("backend", ["torch", "tensorrt"])
def test_backends_without_matmulnbits_refuse_a_quantized_artifact(backend):
    with pytest.raises(NemocompileError, match="int4 weights .* run on ONNX Runtime only; use --backend onnxruntime"):
        Runtime.load(quantized("int4"), backend=backend)


def test_export_command_writes_a_quantized_artifact(tmp_path, capsys):
    from nemocompile.cli import main
    from nemocompile.model.loader import save

    model, _ = lora_batch2()
    ckpt = tmp_path / "ckpt"
    save(model, ckpt)
    out = tmp_path / "a"
    assert main(["export", "--model", str(ckpt), "--mode", "ar", "--max-seq-len", "16", "--prefill-length", "8",
                 "--weights", "int8", "--quant-block", "16", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "weights    int8 rtn block 16, int8 compute, head int8" in text and "--backend onnxruntime only" in text
    assert Manifest.load(out).weight_precision == "int8"
    assert {a.i for n in _ops(out / "ar_step.onnx")["MatMulNBits"] for a in n.attribute if a.name == "bits"} == {8}
    assert main(["export", "--model", str(ckpt), "--mode", "ar", "--max-seq-len", "16", "--prefill-length", "8",
                 "--weights", "int4", "--quant-head", "float", "--quant-compute", "float", "--quant-block", "16",
                 "--out", str(tmp_path / "c"), "--json"]) == 0
    capsys.readouterr()
    nodes = _ops(tmp_path / "c" / "ar_step.onnx")
    assert [n.input[1] for n in nodes["weight MatMul"]] == ["model.diffusion_head.weight.T"]  # the head in float
    assert not [a for n in nodes["MatMulNBits"] for a in n.attribute if a.name == "accuracy_level"]  # float: 0
    assert {a.i for n in _ops(out / "ar_step.onnx")["MatMulNBits"] for a in n.attribute
            if a.name == "accuracy_level"} == {4}  # int8 compute by default
    assert main(["export", "--model", str(ckpt), "--mode", "ar", "--weights", "int4", "--quant-block", "20",
                 "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "block size 20 is not supported" in err and "Traceback" not in err and not (tmp_path / "b").exists()
    assert Manifest.load(out).quantization["head"] == "int8"
    assert Manifest.load(tmp_path / "c").quantization == {
        "method": "rtn", "block_size": 16, "symmetric": False, "library": "onnxruntime MatMulNBits", "head": "float",
        "embedding": "float", "lora": "float", "compute": "float",
        "activations": "float"}


def test_gptq_calibrates_on_what_each_weight_multiplies(tmp_path):
    from nemocompile.checks.calibration import collect_activations

    model = make_model(lora_rank=4)
    acts = collect_activations(model, [[5, 9, 11, 7, 30, 2, 17, 40, 41, 42]], block_length=4)
    cfg = model.config
    assert set(acts) == {f"model.encoder.layers.{i}.{m}.weight.T" for i in range(cfg.num_hidden_layers) for m in
                         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")} | {"model.diffusion_head.weight.T"}
    # causal and bidirectional passes over 10 tokens: 20 rows of the layer's input width
    assert acts["model.encoder.layers.0.mlp.down_proj.weight.T"].shape == (20, cfg.intermediate_size)
    out = tmp_path / "gptq"
    export_artifact(model, out, modes="ar", max_seq_len=16, prefill_length=8,
                    quantize=QuantSettings(method="gptq", block_size=16),
                    calibration_prompts=[[5, 9, 11, 7, 30, 2, 17, 40, 41, 42]])
    assert Manifest.load(out).quantization["method"] == "gptq"
    assert len(_ops(out / "ar_step.onnx")["MatMulNBits"]) == 7 * cfg.num_hidden_layers + 1
    with Runtime.load(out, backend="onnxruntime", threads=1) as rt:
        assert len(rt.generate(PROMPTS[0], mode="ar", max_new_tokens=4, eos=-1).tokens) == 4


@pytest.mark.parametrize("settings", [QuantSettings(), QuantSettings(precision="int8", symmetric=True)])
def test_a_weight_too_large_for_one_quantizer_model_is_quantized_in_slices_of_columns(settings, monkeypatch):
    """An 8B head in fp32 (2 GiB) passes protobuf's limit: it is quantized in slices along N,
    which MatMulNBits' per-column layout concatenates to exactly the whole's result."""
    import numpy as np
    import onnx_ir as ir

    import nemocompile.passes.quantize_weights as qw

    weight = ir.Tensor(np.random.default_rng(0).standard_normal((64, 100)).astype(np.float32), name="w")
    whole, attrs = qw._quantize_one(weight, "w", settings)
    monkeypatch.setattr(qw, "CHUNK_BYTES", 64 * 4 * 30)  # slices of 30, 30, 30 and 10 columns
    sliced, sliced_attrs = qw._quantize_one(weight, "w", settings)
    assert sliced_attrs == attrs and attrs["N"] == 100
    assert [t.name for t in sliced] == [t.name for t in whole]
    for a, b in zip(whole, sliced):
        assert a.shape == b.shape and np.array_equal(a.numpy(), b.numpy()), a.name


def test_importing_onnx_runtimes_quantizer_leaves_logging_alone():
    """matmul_nbits_quantizer calls logging.basicConfig(level=INFO) at import: an 8B int4 export then printed
    thousands of other libraries' INFO lines. The pass imports it without that (a fresh interpreter: nothing
    imported it before)."""
    import subprocess
    import sys

    code = ("import logging; from nemocompile.passes.quantize_weights import _ort_quantizer; _ort_quantizer(); "
            "import onnxruntime.quantization.matmul_nbits_quantizer; "
            "root = logging.getLogger(); print(len(root.handlers), root.level)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", str(30)]  # no handler; WARNING, Python's default
