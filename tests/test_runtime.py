"""The runtime against the eager decoders: token-for-token and forward-for-forward at
temperature 0, in every mode, on both backends; seeding, streaming, errors.

The main artifact is exported once per test session (``exported``; test_serve
and test_bench reuse it) from a random tiny checkpoint with a character-level
tokenizer and a chat template; batch-2 and LoRA-less shapes come from the
shared ``tiny_artifacts``.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest

import nemocompile
from nemocompile.errors import BackendUnavailableError, GenerationError, NemocompileError
from nemocompile.model.loader import load, save
from nemocompile.runtime import Runtime
from nemocompile.runtime.backends.onnxruntime import _has_nvidia_gpu

import tiny_artifacts
from conftest import make_config, make_model

BLOCK, CAPACITY, PREFILL = 4, 96, 8
# the third prompt is longer than PREFILL: its prefill runs in two chunks
PROMPTS = [[5, 9, 11, 20, 7], [1, 4], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71]]
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>"
                 "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}")

_ARTIFACTS: dict[str, Path] = {}


def write_char_tokenizer(directory: Path) -> None:
    """A 96-token character-level tokenizer (ids 0-3 special, EOS 2, MASK 3) with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<mask>": 3}
    for i, c in enumerate(string.digits + string.ascii_letters + " \n" + string.punctuation[:28]):
        vocab[c] = 4 + i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(vocab)[:4])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE,
                                                                 "eos_token": "</s>"}))


def exported(tmp_path_factory) -> Path:
    """Every mode at batch 1, block 4, prefill chunks of 8, from a checkpoint on disk with a
    tokenizer (so the torch backend finds the manifest's source); exported once per session."""
    if "all" not in _ARTIFACTS:
        from nemocompile.graphs.export import export_artifact

        root = tmp_path_factory.getbasetemp() / "runtime-artifacts"
        ckpt = root / "ckpt"
        save(make_model(lora_rank=4), ckpt)
        write_char_tokenizer(ckpt)
        export_artifact(load(ckpt), root / "all", modes="all", block_length=BLOCK, max_seq_len=CAPACITY,
                        batch_size=1, prefill_length=PREFILL)
        _ARTIFACTS["all"] = root / "all"
    return _ARTIFACTS["all"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded, and torch's thread pool stalls badly on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return exported(tmp_path_factory)


@pytest.fixture(scope="module")
def model(artifact):
    from nemocompile.artifact.manifest import Manifest

    return load(Manifest.load(artifact).source)


@pytest.fixture(scope="module")
def ort(artifact):
    with Runtime.load(artifact, threads=1) as rt:
        yield rt


@pytest.fixture(scope="module")
def eager_rt(artifact):
    with Runtime.load(artifact, backend="torch") as rt:
        yield rt


def eager(model, prompt, **kw):
    return nemocompile.generate(model, prompt, **kw)


def assert_same(ref, got, what: str) -> None:
    assert got.tokens == ref.tokens, f"{what}: tokens differ\n eager   {ref.tokens}\n runtime {got.tokens}"
    assert got.stats.forwards == ref.stats.forwards, f"{what}: forwards {got.stats.forwards} != {ref.stats.forwards}"
    assert got.stats.tokens_per_forward == ref.stats.tokens_per_forward
    assert got.stats.acceptance_lengths == ref.stats.acceptance_lengths, what


# ---- greedy parity with the eager decoders -----------------------------------------
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear-spec", "quadratic-spec"])
def test_greedy_matches_eager_decoders(mode, backend, model, ort, eager_rt):
    rt = ort if backend == "onnxruntime" else eager_rt
    for prompt in PROMPTS:
        for max_new in (1, 23):
            ref = eager(model, prompt, mode=mode, max_new_tokens=max_new, block_length=BLOCK, eos_token_id=-1)
            got = rt.generate(prompt, mode=mode, max_new_tokens=max_new, eos=-1)
            assert_same(ref, got, f"{backend} {mode} prompt={prompt} max_new={max_new}")
            assert got.stats.backend == backend and got.finish_reason == "length"


@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear-spec", "quadratic-spec"])
def test_eos_stops_like_eager(mode, model, ort):
    free = eager(model, PROMPTS[0], mode=mode, max_new_tokens=24, block_length=BLOCK, eos_token_id=-1)
    eos = free.tokens[5]
    ref = eager(model, PROMPTS[0], mode=mode, max_new_tokens=24, block_length=BLOCK, eos_token_id=eos)
    got = ort.generate(PROMPTS[0], mode=mode, max_new_tokens=24, eos=eos)
    assert_same(ref, got, f"{mode} eos={eos}")
    assert got.tokens[-1] == eos and got.finish_reason == "stop"
    assert len(got.tokens) < len(free.tokens)
    # a list of EOS ids: whichever comes first stops, eager and compiled alike
    late = next(t for t in free.tokens[free.tokens.index(eos) + 1:] if t not in free.tokens[:6])
    ref_list = eager(model, PROMPTS[0], mode=mode, max_new_tokens=24, block_length=BLOCK, eos_token_id=[late, eos])
    got_list = ort.generate(PROMPTS[0], mode=mode, max_new_tokens=24, eos=[late, eos])
    assert_same(ref_list, got_list, f"{mode} eos=[{late}, {eos}]")
    assert got_list.tokens == got.tokens and got_list.finish_reason == "stop"


@pytest.mark.parametrize("threshold,steps", [(0.3, None), ("none", None), ("none", 2), (1.0, None)])
def test_diffusion_knobs_match_eager(threshold, steps, model, ort):
    for prompt in PROMPTS:
        ref = eager(model, prompt, mode="diffusion", max_new_tokens=17, block_length=BLOCK, threshold=threshold,
                    steps=steps, eos_token_id=-1)
        got = ort.generate(prompt, mode="diffusion", max_new_tokens=17, threshold=threshold, steps=steps, eos=-1)
        assert_same(ref, got, f"diffusion threshold={threshold} steps={steps}")
        assert got.stats.threshold == ref.stats.threshold


def test_linear_spec_iterative_draft_matches_eager(model, ort):
    ref = eager(model, PROMPTS[2], mode="linear-spec", max_new_tokens=20, block_length=BLOCK, threshold=0.5,
                eos_token_id=-1)
    got = ort.generate(PROMPTS[2], mode="linear-spec", max_new_tokens=20, threshold=0.5, eos=-1)
    assert_same(ref, got, "linear-spec threshold 0.5")
    assert got.stats.forwards > 1 + 2 * len(got.stats.acceptance_lengths)  # drafts took several forwards


@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear-spec", "quadratic-spec"])
def test_batches_match_eager(mode):
    """Each row of a batch decodes as its prompt alone (tokens and forwards: a row takes
    only the forwards it needs), whatever the other row does; ar and diffusion also
    equal the eager decoders' batch."""
    model, path = tiny_artifacts.lora_batch2()  # batch 2, block 8
    block = tiny_artifacts.BLOCK
    with Runtime.load(path, backend="onnxruntime", threads=1) as rt:
        prompts = PROMPTS[:2]
        got = rt.generate(prompts, mode=mode, max_new_tokens=13, eos=-1)
        assert len(got) == 2
        for prompt, g in zip(prompts, got):
            alone = eager(model, prompt, mode=mode, max_new_tokens=13, block_length=block, eos_token_id=-1)
            assert_same(alone, g, f"{mode} batch of 2")
            assert g.stats.batch_size == 2
        if mode in ("ar", "diffusion"):
            ref = eager(model, prompts, mode=mode, max_new_tokens=13, block_length=block, eos_token_id=-1)
            assert [g.tokens for g in got] == [r.tokens for r in ref]
        else:
            ref = [eager(model, p, mode=mode, max_new_tokens=13, block_length=block, eos_token_id=-1) for p in prompts]
        single = rt.generate(PROMPTS[1], mode=mode, max_new_tokens=13, eos=-1)  # one row spare
        assert single.tokens == ref[1].tokens
        with pytest.raises(GenerationError, match="3 prompts exceed the artifact's batch size 2"):
            rt.generate(PROMPTS, mode=mode)


@pytest.mark.parametrize("artifact_kind", ["lora_batch2", "plain_batch1"])
def test_linear_spec_on_other_artifact_shapes_matches_eager(artifact_kind):
    """A batch-2 artifact (linear-spec rides a spare row) and one whose prefill chunk
    equals the block (prefill and verify share buffers), without a drafter LoRA."""
    model, path = getattr(tiny_artifacts, artifact_kind)()
    with Runtime.load(path, threads=1) as rt, Runtime.load(path, backend="torch", model=model) as rt_torch:
        for prompt in PROMPTS:
            ref = eager(model, prompt, mode="linear-spec", max_new_tokens=20, block_length=tiny_artifacts.BLOCK,
                        eos_token_id=-1)
            assert_same(ref, rt.generate(prompt, mode="linear-spec", max_new_tokens=20, eos=-1), artifact_kind)
            assert_same(ref, rt_torch.generate(prompt, mode="linear-spec", max_new_tokens=20, eos=-1),
                        f"{artifact_kind} torch")


def test_linear_spec_is_lossless_through_the_runtime(ort):
    for prompt in PROMPTS:
        ar = ort.generate(prompt, mode="ar", max_new_tokens=40, eos=-1)
        ls = ort.generate(prompt, mode="linear-spec", max_new_tokens=40, eos=-1)
        assert ls.tokens == ar.tokens, f"prompt {prompt}: self-speculation diverged from AR greedy"
        assert ls.stats.forwards == 1 + 2 * len(ls.stats.acceptance_lengths)
        assert sum(ls.stats.acceptance_histogram.values()) == len(ls.stats.acceptance_lengths)


def test_text_and_chat_prompts_use_the_artifacts_tokenizer(model, ort):
    ref = eager(model, "def f(x):", mode="ar", max_new_tokens=12, eos_token_id=-1)
    got = ort.generate("def f(x):", mode="ar", max_new_tokens=12, eos=-1)
    assert got.tokens == ref.tokens and got.text == ref.text and isinstance(got.text, str)
    ref = eager(model, "hi", mode="diffusion", max_new_tokens=8, block_length=BLOCK, chat=True, eos_token_id=-1)
    got = ort.generate("hi", mode="diffusion", max_new_tokens=8, chat=True, eos=-1)
    assert got.tokens == ref.tokens
    messages = ort.generate([{"role": "user", "content": "hi"}], mode="diffusion", max_new_tokens=8, chat=True, eos=-1)
    assert messages.tokens == ref.tokens


# ---- sampling, streaming, stats ------------------------------------------------------
@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear-spec"])
def test_seeded_sampling_is_reproducible(mode, ort):
    kw = dict(mode=mode, max_new_tokens=16, temperature=1.5, eos=-1)
    a = ort.generate(PROMPTS[0], seed=7, **kw)
    b = ort.generate(PROMPTS[0], seed=7, **kw)
    c = ort.generate(PROMPTS[0], seed=8, **kw)
    greedy = ort.generate(PROMPTS[0], mode=mode, max_new_tokens=16, eos=-1)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens  # 16 tokens over a 96-token vocabulary at T=1.5 never repeat exactly
    assert a.tokens != greedy.tokens


@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear-spec", "quadratic-spec"])
def test_stream_yields_each_commit(mode, ort):
    full = ort.generate(PROMPTS[0], mode=mode, max_new_tokens=21, eos=-1)
    stream = ort.generate(PROMPTS[0], mode=mode, max_new_tokens=21, eos=-1, stream=True)
    chunks = list(stream)
    assert [t for c in chunks for t in c] == full.tokens
    assert stream.result.tokens == full.tokens and stream.result.stats.forwards == full.stats.forwards
    cycles = 1 + len(full.stats.acceptance_lengths)
    commits = {"ar": 21, "diffusion": -(-21 // BLOCK), "linear-spec": cycles, "quadratic-spec": cycles}
    assert len(chunks) == commits[mode]


def test_an_open_stream_does_not_block_the_runtime(ort):
    """The engine decodes a stream whether or not it is read: another request from the same
    thread runs meanwhile (batch 1: after the stream's row frees), and the stream still
    yields everything."""
    full = ort.generate(PROMPTS[0], mode="ar", max_new_tokens=10, eos=-1)
    stream = ort.generate(PROMPTS[0], mode="ar", max_new_tokens=10, eos=-1, stream=True)
    first = next(stream)
    assert len(ort.generate(PROMPTS[1], mode="ar", max_new_tokens=3, eos=-1).tokens) == 3
    assert first + [t for c in stream for t in c] == full.tokens == stream.result.tokens


def test_a_closed_stream_frees_its_row(ort):
    from nemocompile.runtime import Cancelled

    stream = ort.generate(PROMPTS[0], mode="ar", max_new_tokens=80, eos=-1, stream=True)
    next(stream)
    stream.close()
    with pytest.raises(Cancelled):
        list(stream)
    r = ort.generate(PROMPTS[1], mode="ar", max_new_tokens=3, eos=-1)  # batch 1: it needs the freed row
    assert len(r.tokens) == 3


def test_stats_split_time_and_count_the_prefill_once(ort):
    ort.prefix.clear()  # prefilled whole whatever ran before
    r = ort.generate(PROMPTS[2], mode="ar", max_new_tokens=5, eos=-1)  # 12-token prompt: two prefill chunks
    s = r.stats
    assert s.forwards == 5 and s.graph_calls == 6 and s.decode_forwards == 4
    assert 0 < s.graph_s < s.wall_s and s.runtime_s == pytest.approx(s.wall_s - s.graph_s)
    assert 0 < s.overhead_share < 1 and 0 < s.time_to_first_token_s <= s.wall_s
    assert s.tokens_per_second == pytest.approx(5 / s.wall_s)
    ls = ort.generate(PROMPTS[0], mode="linear-spec", max_new_tokens=12, eos=-1).stats
    assert ls.acceptance_length == pytest.approx(np.mean(ls.acceptance_lengths))
    assert ls.acceptance_histogram == {n: ls.acceptance_lengths.count(n) for n in set(ls.acceptance_lengths)}
    json.dumps(ls.to_dict())  # serializable as is


# ---- buffers -------------------------------------------------------------------------
def _eager_keys(model, ids: list[int]) -> np.ndarray:
    """Keys [layers, 1, kv_heads, len, head_dim] of one causal pass over ``ids``."""
    import torch

    _, k, _ = model.step(torch.tensor([ids]), None, None, 0, pattern="causal")
    return k.numpy()


def test_buffers_are_bound_once_and_present_rows_land_at_cache_len(model, ort):
    cache = ort.cache
    data_ptr = cache.data.ctypes.data
    cache.data[...] = 0
    ort.prefix.clear()  # the zeroed slots held an earlier request's prompt: prefill it whole
    prompt = PROMPTS[2]  # two prefill chunks, the second right-padded
    r = ort.generate(prompt, mode="ar", max_new_tokens=5, eos=-1)
    n = len(prompt) + len(r.tokens) - 1  # no forward runs for the last token
    assert cache.length(0) == n and cache.data.ctypes.data == data_ptr
    np.testing.assert_allclose(cache.k[:, :, :, :n], _eager_keys(model, prompt + r.tokens[:-1]), atol=1e-4)
    assert not cache.k[:, :, :, n:].any(), "rows past cache_len were written (padding placed in the cache?)"
    bound = {v.data_ptr() for v in ort.backend._keep}
    assert cache.k.ctypes.data in bound and cache.v.ctypes.data in bound  # ORT reads the cache buffer itself
    io = ort.io[("ar_step", 1)]  # and each forward's own rows from the step's buffers (no copies per step)
    assert io.cache_len.ctypes.data in bound and io.rows.ctypes.data in bound and io.input_ids.ctypes.data in bound


def test_linear_spec_rollback_moves_the_length(model, ort):
    prompt = PROMPTS[0]
    r = ort.generate(prompt, mode="linear-spec", max_new_tokens=30, eos=-1)
    cache = ort.cache
    # the cache keeps the pending token and the accepted drafts of every verify, never the bonus
    assert cache.length(0) == len(prompt) + sum(r.stats.acceptance_lengths)
    n = len(prompt) + len(r.tokens) - 1
    np.testing.assert_allclose(cache.k[:, :, :, :n], _eager_keys(model, prompt + r.tokens[:-1]), atol=1e-4)


# ---- errors --------------------------------------------------------------------------
def _counting(rt):
    calls = []
    run = rt.backend.run
    rt.backend.run = lambda key, *a: (calls.append(key), run(key, *a))[1]
    return calls, run


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt=[5] * (CAPACITY + 1)), "alone exceeds the artifact's KV cache capacity of 96"),
    (dict(max_new_tokens=CAPACITY), "exceed the artifact's KV cache capacity"),
    (dict(mode="diffusion", max_new_tokens=CAPACITY - 8), r"\+ one block \(4\)"),
    (dict(mode="diffusion", block_length=8), r"graphs are for block length\(s\) \[4\], not 8"),
    (dict(mode="quadratic"), "unknown mode"),
    (dict(max_new_tokens=0), "max_new_tokens must be"),
    (dict(temperature=-1.0), "temperature must be"),
    (dict(mode="diffusion", threshold=1.5), "threshold must be"),
    (dict(mode="linear-spec", prompt=[[5, 6], [7, 8]]), "exceed the artifact's batch size 1"),
    (dict(prompt=[[5, 6], [7, 8]]), "exceed the artifact's batch size 1"),
    (dict(prompt=[]), "empty prompt"),
    (dict(prompt=[5, 96]), "outside the vocabulary"),
    (dict(eos=500), "eos must be"),
    (dict(stream=True, prompt=[[5], [6]]), "single prompt|batch size"),
])
def test_bad_requests_fail_before_any_step_and_the_runtime_stays_usable(kwargs, match, ort):
    calls, run = _counting(ort)
    try:
        prompt = kwargs.pop("prompt", PROMPTS[0])
        with pytest.raises(GenerationError, match=match):
            ort.generate(prompt, **kwargs)
        assert calls == [], "a step ran before the request was rejected"
    finally:
        ort.backend.run = run
    good = ort.generate(PROMPTS[0], mode="ar", max_new_tokens=4, eos=-1)
    assert good.tokens == ort.generate(PROMPTS[0], mode="ar", max_new_tokens=4, eos=-1).tokens


def test_longest_request_that_fits_runs(model, ort):
    prompt = list(range(4, 4 + CAPACITY - 10 - BLOCK))
    got = ort.generate(prompt, mode="linear-spec", max_new_tokens=10, eos=-1)
    ref = eager(model, prompt, mode="linear-spec", max_new_tokens=10, block_length=BLOCK, eos_token_id=-1)
    assert got.tokens == ref.tokens


def test_a_mode_the_artifact_lacks_is_a_clear_error():
    with Runtime.load(tiny_artifacts.plain_batch1()[1]) as rt:
        with pytest.raises(GenerationError, match="no diffusion graphs .* re-export"):
            rt.generate(PROMPTS[0], mode="diffusion")


def test_torch_backend_needs_the_matching_checkpoint(artifact, tmp_path):
    with pytest.raises(BackendUnavailableError, match="not here; pass the checkpoint"):
        Runtime.load(artifact, backend="torch", model=str(tmp_path / "nowhere"))
    other = tmp_path / "other"
    save(make_model(make_config(num_hidden_layers=1)), other)
    with pytest.raises(BackendUnavailableError, match="does not match the artifact"):
        Runtime.load(artifact, backend="torch", model=str(other))


def test_not_an_artifact_or_unknown_backend_is_a_clear_error(artifact, tmp_path):
    with pytest.raises(NemocompileError, match="not an exported artifact"):
        Runtime.load(tmp_path)
    with pytest.raises(NemocompileError, match="unknown backend 'tvm'"):
        Runtime.load(artifact, backend="tvm")


def test_tensorrt_backend_fails_early_without_a_gpu(artifact):

    if _has_nvidia_gpu():
        pytest.skip("an NVIDIA GPU is present: the no-GPU message does not apply")
    with pytest.raises(BackendUnavailableError, match="no NVIDIA GPU found: TensorRT engines must be built on "
                                                      "the target GPU; use --backend onnxruntime"):
        Runtime.load(artifact, backend="tensorrt")


def test_build_command_fails_early_without_a_gpu(tmp_path, artifact, capsys):
    import shutil

    from nemocompile.cli import main

    if _has_nvidia_gpu():
        pytest.skip("an NVIDIA GPU is present: the no-GPU message does not apply")
    copy = tmp_path / "a"
    shutil.copytree(artifact, copy)
    before = sorted(p.name for p in copy.iterdir())
    assert main(["build", "--artifact", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "no NVIDIA GPU found: TensorRT engines must be built on the target GPU; use --backend onnxruntime" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in copy.iterdir()) == before, "a failed build must not write anything"
    assert main(["build", "--artifact", str(tmp_path / "missing")]) == 2
    assert "not an exported artifact" in capsys.readouterr().err
    assert main(["build", "--artifact", str(copy), "--timing-cache", str(tmp_path / "no" / "trt.cache")]) == 2
    assert "--timing-cache" in capsys.readouterr().err and not (tmp_path / "no").exists()


class _FakeCuda:  # stands in for torch.cuda: what the build record says about the GPU
    def __init__(self, capability):
        self.capability = capability

    def get_device_capability(self, device):
        return self.capability

    def get_device_name(self, device):
        return {(10, 0): "NVIDIA B200", (9, 0): "NVIDIA H100"}[self.capability]


def test_engines_are_checked_against_their_build_record(tmp_path, artifact):
    """The TensorRT backend refuses engines built elsewhere or from another export (runs without a GPU:
    the record check reads only the device's name and capability)."""
    import shutil
    from types import SimpleNamespace

    from nemocompile.artifact.manifest import Manifest
    from nemocompile.runtime.backends import tensorrt as trt_backend

    copy = tmp_path / "a"
    shutil.copytree(artifact, copy)
    manifest = Manifest.load(copy)
    b200, h100 = SimpleNamespace(cuda=_FakeCuda((10, 0))), SimpleNamespace(cuda=_FakeCuda((9, 0)))
    trt = SimpleNamespace(__version__="10.15.1")
    with pytest.raises(BackendUnavailableError, match="no TensorRT engines .* run `nemocompile build"):
        trt_backend.check_engines(copy, manifest, b200, trt, "cuda")
    record = {"tensorrt_version": "10.15.1", "gpu": trt_backend._gpu(b200, "cuda"),
              "engines": {step: {"sources": src} for step, src in trt_backend._sources(copy, manifest).items()}}
    (copy / trt_backend.BUILD_RECORD).write_text(json.dumps(record))
    trt_backend.check_engines(copy, manifest, b200, trt, "cuda")  # same export, same GPU: accepted
    with pytest.raises(BackendUnavailableError, match=r"for NVIDIA B200 \(sm 10.0\).*NVIDIA H100 \(sm 9.0\)"):
        trt_backend.check_engines(copy, manifest, h100, trt, "cuda")
    with pytest.raises(BackendUnavailableError, match="TensorRT 10.15.1 .* this is TensorRT 10.16.0"):
        trt_backend.check_engines(copy, manifest, b200, SimpleNamespace(__version__="10.16.0"), "cuda")
    graph = manifest.graphs[0]
    with open(copy / graph.file, "ab") as f:  # a re-export changes the graph
        f.write(b"\0")
    with pytest.raises(BackendUnavailableError, match=f"built from another export of {graph.file}"):
        trt_backend.check_engines(copy, manifest, b200, trt, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not _has_nvidia_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear-spec", "quadratic-spec"])
def test_tensorrt_engines_match_eager_decoders(mode, tmp_path_factory, model):
    """On a GPU with TensorRT: build the engines, then decode token-for-token like eager (fp32 graphs)."""
    trt = pytest.importorskip("tensorrt", reason="needs TensorRT (pip install 'nemocompile[tensorrt]')")
    if not hasattr(trt, "__version__"):  # tensorrt-stubs alone: an empty namespace package
        pytest.skip("needs TensorRT, not only its type stubs (pip install 'nemocompile[tensorrt]')")
    import shutil

    from nemocompile.artifact.manifest import Manifest
    from nemocompile.runtime.backends.tensorrt import build_engines

    artifact = tmp_path_factory.getbasetemp() / "trt-artifact"
    if not (artifact / "engines.json").is_file():
        shutil.copytree(exported(tmp_path_factory), artifact, dirs_exist_ok=True)
        record = build_engines(artifact, Manifest.load(artifact))
        assert set(record["engines"]) == {g.step for g in Manifest.load(artifact).graphs}
    with Runtime.load(artifact, backend="tensorrt") as rt:
        for prompt in PROMPTS:
            ref = eager(model, prompt, mode=mode, max_new_tokens=23, block_length=BLOCK, eos_token_id=-1)
            assert_same(ref, rt.generate(prompt, mode=mode, max_new_tokens=23, eos=-1), f"tensorrt {mode} {prompt}")


def test_run_command_prints_the_generation(artifact, capsys, model):
    from nemocompile.cli import main

    ref = eager(model, "def f(", mode="linear-spec", max_new_tokens=10, block_length=BLOCK)
    assert main(["run", "--artifact", str(artifact), "--mode", "linear-spec", "--prompt", "def f(",
                 "--max-new-tokens", "10", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == ref.tokens and out["text"] == ref.text
    assert main(["run", "--artifact", str(artifact), "--prompt", "def f(", "--max-new-tokens", "6", "--stream"]) == 0
    streamed = capsys.readouterr()
    assert "tokens/forward=1.00" in streamed.err
    assert main(["run", "--artifact", str(artifact), "--prompt", "x", "--max-new-tokens", "500"]) == 2
    assert "KV cache capacity" in capsys.readouterr().err


def test_shared_weights_sessions_decode_the_same(artifact, ort):
    """share_weights: every ORT session reads one memory map of weights.bin (less memory)."""
    with Runtime.load(artifact, threads=1, share_weights=True) as shared:
        assert shared.backend.share_weights
        for mode in ("ar", "diffusion", "linear-spec"):
            assert shared.generate(PROMPTS[0], mode=mode, max_new_tokens=12, eos=-1).tokens == \
                ort.generate(PROMPTS[0], mode=mode, max_new_tokens=12, eos=-1).tokens


def test_modes_open_only_their_graphs_and_decode_as_the_whole_artifact(artifact, ort, capsys):
    """A quantized 8B artifact does not fit in 24 GiB with every graph open (ONNX Runtime prepacks each
    session's own copy of its weights): ``modes`` opens only the graphs those modes run."""
    from nemocompile.cli import main

    with Runtime.load(artifact, threads=1, modes=["linear-spec"]) as rt:
        assert sorted(rt.backend.sessions) == sorted((g.step, g.block_length) for g in rt.manifest.graphs)
        assert {s for s, _ in rt.backend.sessions} == {"prefill", "draft", "verify"} and rt.modes == ["linear-spec"]
        prompt = [5, 9, 11, 7, 30]
        assert rt.generate(prompt, mode="linear-spec", max_new_tokens=12).tokens == \
            ort.generate(prompt, mode="linear-spec", max_new_tokens=12).tokens
        with pytest.raises(NemocompileError, match="ar was not opened .* load it with ar in --modes"):
            rt.generate(prompt, mode="ar", max_new_tokens=4)
    with pytest.raises(NemocompileError, match="has no nope graphs .* drop it from --modes"):
        Runtime.load(artifact, modes=["nope"])
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--artifact", str(artifact), "--modes", "ar,fast", "--prompt", "x"])
    assert exit_.value.code == 2 and "unknown mode 'fast'" in capsys.readouterr().err
