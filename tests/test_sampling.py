"""Sampling controls (nemocompile/sampling.py): each control's effect on the distribution,
seeds, and self-speculation's acceptance rule, lossless in distribution against AR sampling."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

import nemocompile
from nemocompile.text.request import RequestError
from nemocompile.sampling import History, SamplingParams, distribution, sampling_params, speculative_accept

from conftest import make_model

LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0, 3.0], dtype=np.float32)


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


# ---- each control ------------------------------------------------------------------------
def test_temperature_alone_is_softmax_and_zero_is_the_argmax():
    np.testing.assert_allclose(distribution(LOGITS, SamplingParams(0.5)), softmax(LOGITS / 0.5), rtol=1e-6)
    assert distribution(LOGITS, SamplingParams(0.0)).tolist() == [0, 0, 0, 0, 0, 1]


def test_logit_bias_moves_mass_and_the_greedy_choice():
    p = distribution(LOGITS, sampling_params(1.0, logit_bias={"4": 10}))
    assert p.argmax() == 4
    assert distribution(LOGITS, sampling_params(0.0, logit_bias={"0": 1.5})).argmax() == 0  # 3.5 > 3
    assert distribution(LOGITS, sampling_params(0.0, logit_bias={0: -100, 5: -100})).argmax() == 1


def test_penalties_follow_the_tokens_seen():
    seen = History(prompt=[1], output=[5, 5, 0])
    base = distribution(LOGITS, SamplingParams(1.0), seen)
    # frequency: 5 was emitted twice, 0 once
    freq = distribution(LOGITS, sampling_params(1.0, frequency_penalty=1.0), seen)
    np.testing.assert_allclose(freq, softmax(LOGITS - np.array([1, 0, 0, 0, 0, 2])), rtol=1e-6)
    # presence: once per emitted token, whatever its count; the prompt's token 1 is not an output
    pres = distribution(LOGITS, sampling_params(1.0, presence_penalty=1.0), seen)
    np.testing.assert_allclose(pres, softmax(LOGITS - np.array([1, 0, 0, 0, 0, 1])), rtol=1e-6)
    # repetition: prompt and output tokens; positive logits divided, negative multiplied
    rep = distribution(LOGITS, sampling_params(1.0, repetition_penalty=2.0), History(prompt=[4], output=[5]))
    np.testing.assert_allclose(rep, softmax(np.array([2.0, 1.0, 0.5, 0.0, -2.0, 1.5])), rtol=1e-6)
    assert base[5] > freq[5] and base[5] > pres[5]
    # greedy with a penalty leaves the repeated argmax
    assert distribution(LOGITS, sampling_params(0.0, frequency_penalty=1.0), seen).argmax() == 0


def test_filters_min_p_top_k_top_p():
    p = softmax(LOGITS.astype(np.float64))  # sorted: 5 (.60), 0 (.22), 1 (.08), 2 (.05), 3 (.03), 4 (.01)
    min_p = distribution(LOGITS, sampling_params(1.0, min_p=0.2))
    assert set(np.flatnonzero(min_p)) == {5, 0}  # p >= 0.2 x 0.60
    top_k = distribution(LOGITS, sampling_params(1.0, top_k=3))
    assert set(np.flatnonzero(top_k)) == {5, 0, 1}
    np.testing.assert_allclose(top_k[[5, 0, 1]], p[[5, 0, 1]] / p[[5, 0, 1]].sum(), rtol=1e-6)
    # top_p: the smallest head whose mass reaches top_p
    assert set(np.flatnonzero(distribution(LOGITS, sampling_params(1.0, top_p=0.5)))) == {5}
    assert set(np.flatnonzero(distribution(LOGITS, sampling_params(1.0, top_p=0.82)))) == {5, 0}
    assert set(np.flatnonzero(distribution(LOGITS, sampling_params(1.0, top_p=0.83)))) == {5, 0, 1}
    assert np.count_nonzero(distribution(LOGITS, sampling_params(1.0, top_p=1.0))) == 6
    # the order: temperature before top_p (a hot distribution keeps more tokens)
    assert np.count_nonzero(distribution(LOGITS, sampling_params(5.0, top_p=0.5))) > 1


@pytest.mark.parametrize("scale", [4.0, 0.3])  # peaked: the nucleus fits the sorted head; flat: it does not
def test_top_p_on_a_large_vocabulary_equals_a_full_sort(scale):
    z = (np.random.default_rng(0).standard_normal(5000) * scale).astype(np.float32)
    q = softmax(z.astype(np.float64) / 0.8)
    order = np.argsort(-q, kind="stable")
    keep = order[: np.count_nonzero(np.cumsum(q[order]) - q[order] < 0.9)]
    got = distribution(z, sampling_params(0.8, top_p=0.9))
    assert set(np.flatnonzero(got)) == set(keep.tolist())
    np.testing.assert_allclose(got[keep], q[keep] / q[keep].sum(), rtol=1e-9)


def test_a_grammar_mask_applies_before_sampling():
    allowed = np.array([0, 1, 1, 0, 0, 0], dtype=bool)
    assert distribution(LOGITS, SamplingParams(0.0), allowed=allowed).argmax() == 1
    p = distribution(LOGITS, SamplingParams(1.0), allowed=allowed)
    assert set(np.flatnonzero(p)) == {1, 2}


@pytest.mark.parametrize("field, value", [("top_p", 0), ("top_p", 1.5), ("top_k", -2), ("top_k", 1.5),
                                          ("min_p", 2), ("presence_penalty", 3), ("frequency_penalty", "x"),
                                          ("repetition_penalty", 0), ("logit_bias", {"x": 1}),
                                          ("logit_bias", {"5": 200}), ("logit_bias", {"99999": 1})])
def test_bad_values_are_one_line_errors_naming_the_field(field, value):
    with pytest.raises(RequestError) as e:
        sampling_params(1.0, **{field: value}, vocab_size=1024)
    assert e.value.param == field and "\n" not in str(e.value)


# ---- the acceptance rule -----------------------------------------------------------------
def test_speculative_accept_emits_the_target_distribution_for_any_draft():
    """P(first emitted token = y) = p0(y) whether or not the draft is likely, and the
    second token (after an accepted draft) follows p1."""
    rng = np.random.default_rng(0)
    p0 = np.array([0.5, 0.3, 0.2, 0.0])
    p1 = np.array([0.1, 0.1, 0.1, 0.7])
    for draft in ([0, 3], [2, 0], [3, 1]):
        first = collections.Counter()
        second = collections.Counter()
        for _ in range(20000):
            out = speculative_accept(draft, lambda i: [p0, p1, p1][i], rng.random)
            first[out[0]] += 1
            if len(out) > 1:
                second[out[1]] += 1
        freq = np.array([first[t] for t in range(4)]) / 20000
        np.testing.assert_allclose(freq, p0, atol=0.015)
        if draft[0] in (0, 2):  # accepted with probability p0(x)
            n = sum(second.values())
            assert abs(n / 20000 - p0[draft[0]]) < 0.015
            np.testing.assert_allclose(np.array([second[t] for t in range(4)]) / n, p1, atol=0.02)
        else:
            assert not second  # p0(3) = 0: never accepted


# ---- eager decoders ----------------------------------------------------------------------
MODES = ["ar", "diffusion", "linear-spec", "quadratic-spec"]


@pytest.mark.parametrize("mode", MODES)
def test_seeded_controls_reproduce_and_tiny_top_p_is_greedy(mode, one_torch_thread):
    model = make_model(scale=0.2)
    kw = dict(mode=mode, max_new_tokens=12, block_length=4, eos_token_id=-1)
    greedy = nemocompile.generate(model, [5, 6, 7], **kw)
    assert nemocompile.generate(model, [5, 6, 7], temperature=0.8, top_p=1e-6, seed=1, **kw).tokens == greedy.tokens
    controls = dict(temperature=0.9, top_p=0.9, top_k=20, min_p=0.01, presence_penalty=0.5,
                    frequency_penalty=0.3, repetition_penalty=1.2, logit_bias={7: 2.0})
    a = nemocompile.generate(model, [5, 6, 7], seed=3, **controls, **kw)
    b = nemocompile.generate(model, [5, 6, 7], seed=3, **controls, **kw)
    c = nemocompile.generate(model, [5, 6, 7], seed=4, **controls, **kw)
    assert a.tokens == b.tokens and a.tokens != c.tokens


@pytest.mark.parametrize("mode", ["ar", "linear-spec", "quadratic-spec"])
def test_greedy_penalties_are_ar_greedy_with_penalties_in_every_lossless_mode(mode, one_torch_thread):
    model = make_model(scale=0.2)
    kw = dict(max_new_tokens=14, block_length=4, eos_token_id=-1, frequency_penalty=2.0, logit_bias={9: 1.0})
    ar = nemocompile.generate(model, [5, 6, 7], mode="ar", **kw)
    assert ar.tokens != nemocompile.generate(model, [5, 6, 7], mode="ar", max_new_tokens=14, eos_token_id=-1).tokens
    assert nemocompile.generate(model, [5, 6, 7], mode=mode, **kw).tokens == ar.tokens


def _chi_square(a: collections.Counter, b: collections.Counter) -> float:
    """p-value that two samples share one categorical distribution (rare categories pooled)."""
    from scipy.stats import chi2_contingency

    keys = sorted(set(a) | set(b), key=lambda k: -(a[k] + b[k]))
    common = [k for k in keys if a[k] + b[k] >= 10]
    table = [[a[k] for k in common] + [sum(a[k] for k in keys if k not in common)],
             [b[k] for k in common] + [sum(b[k] for k in keys if k not in common)]]
    table = [row for row in zip(*table) if sum(row) > 0]
    return chi2_contingency(np.array(table).T)[1]


def _samples(model, mode: str, n: int, **kw) -> list[collections.Counter]:
    """Per output index 1..3, the tokens of ``n`` seeded generations (AR: one batch)."""
    prompt = model.tokenizer.encode("def add(a, b):")
    args = dict(mode=mode, max_new_tokens=4, block_length=4, eos_token_id=-1, **kw)
    if mode == "ar":
        outs = [r.tokens for r in nemocompile.generate(model, [prompt] * n, seed=12345, **args)]
    else:
        outs = [nemocompile.generate(model, prompt, seed=s, **args).tokens for s in range(n)]
    return [collections.Counter(t[i] for t in outs) for i in (1, 2, 3)]


@pytest.fixture(scope="module")
def embedded_model(embedded_dir):
    from nemocompile.model.loader import load

    return load(embedded_dir)


def test_self_speculation_samples_ar_distribution_with_top_p(embedded_model, one_torch_thread):
    """Chi-square: the tokens at output indices 1-3 (where drafts are accepted or rejected)
    of linear-spec and quadratic-spec at temperature 0.8, top_p 0.9 have AR's distribution;
    and the test sees a real difference (top_p 0.6 against 0.9)."""
    pytest.importorskip("scipy")
    kw = dict(temperature=0.8, top_p=0.9)
    n = 300
    ar = _samples(embedded_model, "ar", n, **kw)
    for mode in ("linear-spec", "quadratic-spec"):
        spec = _samples(embedded_model, mode, n, **kw)
        pvalues = [_chi_square(x, y) for x, y in zip(ar, spec)]
        assert min(pvalues) > 1e-3, (mode, pvalues)
    other = _samples(embedded_model, "ar", n, temperature=0.8, top_p=0.6)
    assert min(_chi_square(x, y) for x, y in zip(ar, other)) < 1e-3


# ---- runtime -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded_rt(embedded_dir):
    from tiny_artifacts import embedded

    from nemocompile.runtime import Runtime

    with Runtime.load(embedded(), threads=1) as rt:
        yield rt


@pytest.mark.parametrize("mode", MODES + ["auto"])
def test_runtime_controls_in_every_mode(embedded_rt, mode):
    rt, prompt = embedded_rt, "def add(a, b):"
    kw = dict(mode=mode, max_new_tokens=10, eos=-1)
    greedy = rt.generate(prompt, **kw)
    assert rt.generate(prompt, temperature=0.8, seed=2, sampling={"top_p": 1e-6}, **kw).tokens == greedy.tokens
    controls = {"top_p": 0.9, "top_k": 50, "min_p": 0.01, "presence_penalty": 0.5, "frequency_penalty": 0.3,
                "repetition_penalty": 1.3, "logit_bias": {"17": 1.0}}
    a = rt.generate(prompt, temperature=0.9, seed=5, sampling=controls, **kw)
    b = rt.generate(prompt, temperature=0.9, seed=5, sampling=controls, **kw)
    assert a.tokens == b.tokens and a.tokens != greedy.tokens
    banned = rt.generate(prompt, sampling={"logit_bias": {str(greedy.tokens[0]): -100}}, **kw)
    assert banned.tokens[0] != greedy.tokens[0]


@pytest.mark.parametrize("mode", ["linear-spec", "quadratic-spec"])
def test_runtime_greedy_penalties_match_eager_ar(embedded_rt, embedded_model, mode, one_torch_thread):
    prompt = embedded_model.tokenizer.encode("def add(a, b):")
    sampling = {"frequency_penalty": 1.5, "repetition_penalty": 1.3}
    ref = nemocompile.generate(embedded_model, prompt, mode="ar", max_new_tokens=16, eos_token_id=-1, **sampling)
    got = embedded_rt.generate(prompt, mode=mode, max_new_tokens=16, eos=-1, sampling=sampling)
    assert got.tokens == ref.tokens


def test_runtime_refuses_unknown_sampling_fields(embedded_rt):
    with pytest.raises(RequestError, match="unknown sampling field"):
        embedded_rt.generate("hi", sampling={"top_q": 0.5})


def test_stdio_requests_carry_sampling(embedded_rt):
    from nemocompile.runtime.serve.stdio import submit

    greedy = embedded_rt.generate("def add(a, b):", max_new_tokens=6, eos=-1)
    job, _ = submit(embedded_rt, {"prompt": "def add(a, b):", "max_new_tokens": 6, "eos": -1, "temperature": 0.8,
                                  "seed": 1, "sampling": {"top_p": 1e-6}})
    assert job.result()[0].tokens == greedy.tokens
    with pytest.raises(RequestError, match="top_p must be"):
        submit(embedded_rt, {"prompt": "hi", "sampling": {"top_p": 3}})


@pytest.mark.slow
def test_runtime_self_speculation_samples_ar_distribution(embedded_rt):
    """The chi-square test of the eager decoders, on the runtime's schedulers (ONNX Runtime)."""
    pytest.importorskip("scipy")
    rt = embedded_rt
    prompt = rt.tokenizer.encode("def add(a, b):")

    def samples(mode):
        outs = [rt.generate(prompt, mode=mode, max_new_tokens=4, eos=-1, temperature=0.8, seed=s,
                            sampling={"top_p": 0.9}, **({} if mode == "ar" else {"block_length": 32})).tokens
                for s in range(400)]
        return [collections.Counter(t[i] for t in outs) for i in (1, 2, 3)]

    ar = samples("ar")
    for mode in ("linear-spec", "quadratic-spec"):
        assert min(_chi_square(x, y) for x, y in zip(ar, samples(mode))) > 1e-3, mode


def test_cli_sampling_flags(embedded_dir, capsys):
    from nemocompile.cli import main

    base = ["generate", "--prompt", "def add(a, b):", "--max-new-tokens", "8", "--json"]
    assert main(base) == 0
    greedy = json.loads(capsys.readouterr().out)["tokens"]
    assert main(base + ["--temperature", "0.8", "--seed", "1", "--top-p", "1e-6"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == greedy
    assert main(base + ["--repetition-penalty", "3", "--frequency-penalty", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] != greedy
    assert main(base + ["--temperature", "1", "--top-p", "2"]) != 0
    assert capsys.readouterr().err.strip() == "error: top_p must be a number in (0, 1], got 2.0"
