"""`export_artifact` and `nemocompile export`: valid, lean, shared-weight graphs,
a validated manifest, atomic writes and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from conftest import make_model
from tiny_artifacts import BLOCK, CAPACITY, PREFILL, embedded, lora_batch2

import nemocompile.graphs.export as export_module
from nemocompile.artifact.files import describe_files
from nemocompile.cli import main
from nemocompile.graphs import plan
from nemocompile.graphs.export import ExportError, export_artifact
from nemocompile.graphs.steps import DYNAMIC_DIMS
from nemocompile.model.loader import load, save
from nemocompile.artifact.manifest import STEP_KINDS, Manifest, ManifestError
from nemocompile.passes.quantize_weights import QuantSettings

ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64}
CACHE_COPY_OPS = {"Concat", "Expand", "Tile", "ScatterND", "ScatterElements", "Pad", "Identity", "Copy"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_graph(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


def test_plan_declares_each_modes_graphs():
    graphs = {spec.step: (spec, modes) for spec, modes in plan(["ar", "diffusion", "linear-spec"], block_length=8,
                                                               prefill_length=16, has_lora=True)}
    assert list(graphs) == ["prefill", "ar_step", "denoise", "commit", "draft", "verify"]
    assert graphs["prefill"][1] == ["ar", "diffusion", "linear-spec"]  # one prefill graph serves every mode
    assert graphs["prefill"][0].block_length == 16 and graphs["ar_step"][0].block_length == 1
    assert [s.lora for s, _ in graphs.values()] == [False, False, False, False, True, False]
    no_lora = plan(["linear-spec"], block_length=8, prefill_length=16, has_lora=False)
    assert [s.lora for s, _ in no_lora] == [False, False, False]


def test_export_all_modes_is_a_valid_artifact():
    _, art = lora_batch2()
    manifest = Manifest.load(art)
    assert manifest.modes == ["ar", "diffusion", "linear-spec", "quadratic-spec"]
    assert [g.step for g in manifest.graphs] == list(STEP_KINDS)
    assert (manifest.batch_size, manifest.cache_capacity, manifest.block_length, manifest.prefill_length) == \
        (2, CAPACITY, BLOCK, PREFILL)
    assert 18 <= manifest.opset <= 21 and manifest.has_lora and manifest.weights_file == "weights.bin"
    files = {p.name for p in art.iterdir()}
    assert files == {g.file for g in manifest.graphs} | {"weights.bin", "manifest.json"}
    assert not [p for p in art.parent.iterdir() if ".partial-" in p.name]
    for g in manifest.graphs:
        pattern, writes, _ = STEP_KINDS[g.step]
        # the drafter LoRA is on in linear-spec's draft only (quadratic-spec follows the reference: off)
        assert (g.pattern, g.writes_cache, g.lora) == (pattern, writes, g.step == "draft")
        onnx.checker.check_model(str(art / g.file), full_check=True)  # checker + strict shape inference
        proto = load_graph(art / g.file)
        assert proto.opset_import[0].version == manifest.opset
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
        for specs, values in ((g.inputs, inferred.graph.input), (g.outputs, inferred.graph.output)):
            assert [v.name for v in values] == [s.name for s in specs]
            for v, s in zip(values, specs):
                dims = v.type.tensor_type.shape.dim
                # the forward's rows and the slots it reads are dynamic; the manifest records their largest size
                assert [s.shape[i] if d.dim_param else d.dim_value for i, d in enumerate(dims)] == s.shape, \
                    (g.step, v.name)
                assert [d.dim_param for d in dims if d.dim_param] == ([DYNAMIC_DIMS[v.name]] if v.name in DYNAMIC_DIMS
                                                                       else []), (g.step, v.name)
                assert v.type.tensor_type.elem_type == ONNX_DTYPES[s.dtype]
        present = [s for s in g.outputs if s.name.startswith("present")]
        assert len(present) == (2 if writes else 0)
        for s in present:  # only the block's rows come back, never the cache
            assert s.shape[3] == g.block_length


def test_graphs_share_one_copy_of_the_weights():
    model, art = lora_batch2()
    manifest = Manifest.load(art)
    weights = art / "weights.bin"
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    referenced = 0
    for g in manifest.graphs:
        for init in load_graph(art / g.file).graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in init.external_data}
                assert info["location"] == "weights.bin"
                assert int(info["offset"]) + int(info["length"]) <= weights.stat().st_size
                referenced += int(info["length"])
    # every graph references (almost) all weights, but the file holds them once
    assert referenced > 4 * param_bytes
    assert weights.stat().st_size < 1.3 * param_bytes


def test_graphs_are_lean_and_never_copy_the_cache():
    _, art = lora_batch2()
    for g in Manifest.load(art).graphs:
        graph = load_graph(art / g.file).graph
        ops = [n.op_type for n in graph.node]
        initializers = {i.name for i in graph.initializer}
        assert "Clip" not in ops and not [op for op in ops if op.startswith("Sequence") or op == "SplitToSequence"]
        assert not [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in initializers]
        assert not [n for n in graph.node if n.op_type == "Constant"]
        consumers = {}
        for n in graph.node:
            for name in n.input:
                consumers.setdefault(name, []).append(n)
        # The cache is read only by a Gather of the used slots (a flattening Reshape first, a
        # view): nothing may concatenate, expand or copy the whole cache, or read it otherwise.
        for name in ("cache_k", "cache_v"):
            (flat,) = consumers[name]
            assert flat.op_type == "Reshape", f"{g.step}: {flat.op_type} over the cache ({name})"
            gathers = consumers[flat.output[0]]
            assert gathers and all(n.op_type == "Gather" and n.input[0] == flat.output[0] for n in gathers), \
                f"{g.step}: {[n.op_type for n in gathers]} over the flattened cache"
            assert all(n.op_type not in CACHE_COPY_OPS for n in gathers)
        assert not set(graph.output[i].name for i in range(len(graph.output))) & {"cache_k", "cache_v"}


def test_export_without_weight_sharing_gives_each_graph_its_own_copy(tmp_path):
    model = make_model()
    manifest = export_artifact(model, tmp_path / "art", modes="ar", max_seq_len=16, prefill_length=1,
                               share_weights=False)
    assert manifest.weights_file is None
    files = sorted(p.name for p in (tmp_path / "art").iterdir())
    assert files == ["ar_step.data", "ar_step.onnx", "manifest.json", "prefill.data", "prefill.onnx"]
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for name in ("prefill.data", "ar_step.data"):
        assert (tmp_path / "art" / name).stat().st_size >= 0.9 * param_bytes
        onnx.checker.check_model(str(tmp_path / "art" / name.replace(".data", ".onnx")), full_check=True)


def test_manifest_round_trips_and_rejects_bad_fields(tmp_path):
    _, art = lora_batch2()
    manifest = Manifest.load(art)
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    raw = json.loads((art / "manifest.json").read_text())
    assert raw["config_hash"] == make_model().config.hash()

    def broken(edit) -> str:
        bad = json.loads(json.dumps(raw))
        edit(bad)
        copy_dir = tmp_path / "bad"
        copy_dir.mkdir(exist_ok=True)
        (copy_dir / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(ManifestError) as e:
            Manifest.load(copy_dir)
        return str(e.value)

    assert "missing field 'cache_capacity'" in broken(lambda d: d.pop("cache_capacity"))
    assert "graphs[1]: missing field 'block_length'" in broken(lambda d: d["graphs"][1].pop("block_length"))
    assert "format_version" in broken(lambda d: d.update(format_version=99))
    for version in (2, 3):  # every forward read all slots of all rows
        old = broken(lambda d: d.update(format_version=version))
        assert f"graph contract version {version}" in old and "rows in flight" in old and "re-export" in old
    assert "dtype" in broken(lambda d: d.update(dtype="int8"))
    assert "unknown step kind 'sample'" in broken(lambda d: d["graphs"][0].update(step="sample"))
    assert "must be bidirectional" in broken(lambda d: d["graphs"][2].update(pattern="causal"))
    assert "exceeds the cache capacity" in broken(lambda d: d["graphs"][2].update(block_length=CAPACITY + 1))
    assert "static positive shape" in broken(lambda d: d["graphs"][0]["inputs"][0].update(shape=[2, -1]))
    with pytest.raises(ManifestError, match="missing"):
        Manifest.load(tmp_path / "nothing")


def test_failed_export_leaves_nothing_that_looks_valid(tmp_path, monkeypatch):
    model = make_model()
    out = tmp_path / "art"
    real_trace, calls = export_module._trace, []

    def crash_on_second_graph(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:  # the first graph is already written into the temp dir
            raise RuntimeError("simulated crash mid-export")
        return real_trace(*args, **kwargs)

    monkeypatch.setattr(export_module, "_trace", crash_on_second_graph)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_artifact(model, out, modes="ar", block_length=4, max_seq_len=16, prefill_length=8)
    assert len(calls) == 2  # it did fail part way
    assert not out.exists() and list(tmp_path.iterdir()) == []

    # A failed re-export over an existing artifact leaves the old one intact.
    _, good = lora_batch2()
    shutil.copytree(good, out)
    calls[:] = [None]  # crash on the first graph this time
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_artifact(model, out, modes="ar", block_length=4, max_seq_len=16, prefill_length=8, overwrite=True)
    assert Manifest.load(out) == Manifest.load(good)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_length=64, max_seq_len=32), "block length 64 exceeds the cache capacity"),
    (dict(prefill_length=64, max_seq_len=32), "prefill length 64 exceeds the cache capacity"),
    (dict(modes="beam-search"), "unknown mode 'beam-search'"),
    (dict(modes=["ar", "spec"]), "unknown mode 'spec'"),
    (dict(dtype="int8"), "unknown dtype 'int8'"),
    (dict(block_length=1, modes="diffusion"), "block_length must be at least 2"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(max_seq_len=10**7), "exceeds the model's max_position_embeddings"),
    (dict(opset=11), "opset 11 is not supported; use 18 to 23"),
])
def test_bad_arguments_are_clear_errors(tmp_path, kwargs, message):
    with pytest.raises(ExportError, match=message):
        export_artifact(make_model(), tmp_path / "art", **kwargs)
    assert not (tmp_path / "art").exists()


def test_existing_output_needs_force(tmp_path):
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="exists and is not empty.*--force"):
        export_artifact(make_model(), tmp_path / "art", modes="ar")
    with pytest.raises(ExportError, match="is not an artifact.*--force only replaces artifacts"):
        export_artifact(make_model(), tmp_path / "art", modes="ar", overwrite=True)
    assert (tmp_path / "art" / "notes.txt").read_text() == "keep me"


def test_cli_export_check_and_parity(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    save(make_model(lora_rank=4), ckpt)
    out = tmp_path / "art"
    # prefill chunks of one token: prefill and ar_step are then one traced graph (a faster test)
    rc = main(["export", "--model", str(ckpt), "--mode", "ar", "--block-length", "4", "--max-seq-len", "24",
               "--prefill-length", "1", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "prefill" in captured.out and "ar_step" in captured.out and "TensorRT" in captured.out
    assert "[1/2] prefill: tracing" in captured.err and "[2/2] ar_step: same graph as prefill" in captured.err
    assert "wrote" in captured.err  # progress goes to stderr
    assert Manifest.load(out).source == str(ckpt)

    assert main(["check", "--artifact", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and set(report["graphs"]) == {"prefill", "ar_step"}

    assert main(["parity", "--artifact", str(out), "--json", "--max-new-tokens", "6"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and [g["mode"] for g in report["generations"]] == ["ar"]

    assert main(["info", "--model", str(ckpt), "--artifact", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kv_capacity"] == {"max_seq_len": 24, "batch_size": 1}
    assert info["kv_bytes_per_sequence"]["fp32"] == 24 * info["kv_bytes_per_token"]["fp32"]

    assert main(["export", "--mode", "beam", "--out", str(tmp_path / "x"), "--model", str(ckpt)]) == 2
    assert "error: unknown mode 'beam'" in capsys.readouterr().err
    assert main(["export", "--model", str(ckpt), "--out", str(out), "--mode", "ar"]) == 2
    assert "--force" in capsys.readouterr().err


def test_export_the_embedded_model(embedded_dir):
    out = embedded()
    manifest = Manifest.load(out)
    assert manifest.source == str(embedded_dir)
    assert manifest.modes == ["ar", "diffusion", "linear-spec", "quadratic-spec"]
    assert set(manifest.tokenizer_files) >= {"tokenizer.json"} and (out / "tokenizer.json").is_file()
    assert manifest.block_length == manifest.model_config["block_size"]
    assert manifest.graph("draft").lora == manifest.has_lora
    for g in manifest.graphs:
        onnx.checker.check_model(str(out / g.file), full_check=True)


def test_check_reports_a_graph_tensorrt_would_reject(tmp_path, capsys):
    _, good = lora_batch2()
    art = tmp_path / "art"
    shutil.copytree(good, art)
    # swap the ar_step graph for one with an operator TensorRT's parser lacks and a dynamic dimension
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Unique", ["x"], ["y"])], "bad",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), art / "ar_step.onnx")
    raw = json.loads((art / "manifest.json").read_text())  # recorded as if exported so: not damage, a bad graph
    raw["files"].update(describe_files(art, ["ar_step.onnx"]))
    (art / "manifest.json").write_text(json.dumps(raw))
    assert main(["check", "--artifact", str(art)]) == 1
    out = capsys.readouterr().out
    assert "ar_step  5 problem(s)" in out and "Unique" in out and "no optimization profile can bound" in out
    assert "graph inputs are ['x'], the manifest contract needs ['input_ids'," in out
    assert "prefill  ok" in out and "TensorRT would reject" in out


def test_bidirectional_graphs_return_argmax_and_confidence():
    """denoise/draft also output each position's argmax and its softmax probability
    (what a greedy runtime reads instead of the full logits)."""
    import numpy as np
    import onnxruntime as ort

    model, out = lora_batch2()
    manifest = Manifest.load(out)
    rng = np.random.default_rng(0)
    for step in ("denoise", "draft"):
        g = manifest.graph(step)
        # denoise picks emitted tokens, so it also returns log-probs; linear-spec's draft does not
        assert [o.name for o in g.outputs] == ["logits", "candidate", "confidence"] + (
            ["top_logprobs", "top_ids", "next_logprob"] if step == "denoise" else [])
        feeds = {}
        for spec in g.inputs:
            if spec.dtype == "int64":
                feeds[spec.name] = rng.integers(0, 4 if spec.name != "input_ids" else 96, spec.shape).astype(np.int64)
            else:
                feeds[spec.name] = rng.standard_normal(spec.shape).astype(np.float32)
        feeds["cache_len"] = np.full(g.inputs[1].shape, CAPACITY // 2, dtype=np.int64)
        feeds["rows"] = np.arange(len(feeds["rows"]), dtype=np.int64)
        feeds["slots"] = np.arange(CAPACITY // 2, dtype=np.int64)
        logits, cand, conf = ort.InferenceSession(str(out / g.file)).run(None, feeds)[:3]
        probs = torch.softmax(torch.from_numpy(logits), dim=-1)
        assert np.array_equal(cand, logits.argmax(-1))
        assert np.abs(conf - probs.max(-1).values.numpy()).max() < 1e-6


@pytest.mark.parametrize("dtype, modes, quantize", [
    ("bf16", ["linear-spec"], None),
    ("fp32", ["ar"], QuantSettings(block_size=16)),
])
def test_a_checkpoint_directory_exports_streamed_to_the_same_bytes(tiny_checkpoint, tmp_path, monkeypatch, dtype,
                                                                  modes, quantize):
    """From a directory the weights are never held: traced fake, each read from the checkpoint when a
    pass or the weight store needs it. The artifact is byte for byte an export of the loaded model's."""
    import nemocompile.model.loader as loader

    reads, read = [], loader.CheckpointWeights.read
    monkeypatch.setattr(loader.CheckpointWeights, "read", lambda self, name: reads.append(name) or read(self, name))
    kwargs = dict(modes=modes, block_length=4, max_seq_len=32, prefill_length=8, dtype=dtype, quantize=quantize)
    export_artifact(tiny_checkpoint, tmp_path / "streamed", **kwargs)
    assert "diffusion_head.weight" in reads and "encoder.layers.1.mlp.down_proj.weight" in reads
    export_artifact(load(tiny_checkpoint, dtype=dtype), tmp_path / "loaded", **kwargs)
    files = sorted(f.name for f in (tmp_path / "streamed").iterdir())
    assert files == sorted(f.name for f in (tmp_path / "loaded").iterdir()) and "weights.bin" in files
    for name in files:
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "loaded" / name).read_bytes(), name
