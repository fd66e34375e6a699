"""The thinking budget (spec 3.5): the token at output index N is forced to E unless E
was already emitted; every lossless mode emits exactly what AR does, eager and compiled,
and the cache holds what was emitted."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

import nemocompile
from nemocompile.errors import GenerationError
from nemocompile.runtime import Runtime

from test_runtime import exported

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOSSLESS = ("ar", "linear-spec", "quadratic-spec")
PROMPTS = ([5, 9, 11, 20, 7], [40, 41], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71])


def _free_token(tokens: list[int]) -> int:
    return next(t for t in range(4, 96) if t not in tokens)


@pytest.mark.parametrize("N", [0, 1, 3, 6, 11])
def test_every_lossless_mode_forces_the_end_token_at_index_n(N):
    model = make_model(lora_rank=4)
    for prompt in PROMPTS:
        free = nemocompile.generate(model, prompt, mode="ar", max_new_tokens=20, eos_token_id=-1).tokens
        E = _free_token(free)
        outs = {m: nemocompile.generate(model, prompt, mode=m, max_new_tokens=20, block_length=4, eos_token_id=-1,
                                        max_thinking_tokens=N, end_think_token_id=E).tokens for m in LOSSLESS}
        got = outs["ar"]
        assert got[:N] == free[:N] and got[N] == E
        assert all(o == got for o in outs.values()), outs
        # after E the output continues as AR from a context that holds E: the cache has what was emitted
        cont = nemocompile.generate(model, prompt + got[:N + 1], mode="ar", max_new_tokens=20 - N - 1,
                                    eos_token_id=-1).tokens
        assert got[N + 1:] == cont
        diffusion = nemocompile.generate(model, prompt, mode="diffusion", max_new_tokens=20, block_length=4,
                                         eos_token_id=-1, max_thinking_tokens=N, end_think_token_id=E).tokens
        assert diffusion[N] == E


def test_nothing_is_forced_when_the_end_token_was_already_emitted():
    model = make_model(lora_rank=4)
    free = nemocompile.generate(model, PROMPTS[0], mode="ar", max_new_tokens=20, eos_token_id=-1).tokens
    E = free[2]
    for mode in LOSSLESS:
        r = nemocompile.generate(model, PROMPTS[0], mode=mode, max_new_tokens=20, block_length=4, eos_token_id=-1,
                                 max_thinking_tokens=6, end_think_token_id=E)
        assert r.tokens == free, mode


def test_bad_budgets_are_refused_before_any_forward():
    model = make_model()
    with pytest.raises(GenerationError, match="max_thinking_tokens must be an integer >= 0"):
        nemocompile.generate(model, [5], max_thinking_tokens=-1, end_think_token_id=4)
    with pytest.raises(GenerationError, match="end_think_token_id must be a token id"):
        nemocompile.generate(model, [5], max_thinking_tokens=2, end_think_token_id=96)
    with pytest.raises(GenerationError, match="no </think> token"):
        nemocompile.generate(model, [5], max_thinking_tokens=2)  # no tokenizer, no id given
    with pytest.raises(GenerationError, match="needs max_thinking_tokens"):
        nemocompile.generate(model, [5], end_think_token_id=4)


def test_runtime_applies_the_budget_like_eager_in_every_mode(tmp_path_factory):
    from nemocompile.model.loader import load

    art = exported(tmp_path_factory)
    from nemocompile.artifact.manifest import Manifest

    model = load(Manifest.load(art).source)
    with Runtime.load(art, threads=1) as rt:
        for mode in ("ar", "diffusion", "linear-spec", "quadratic-spec"):
            for N in (0, 2, 7):
                prompt = PROMPTS[N % 3]
                free = nemocompile.generate(model, prompt, mode="ar", max_new_tokens=16, eos_token_id=-1).tokens
                E = _free_token(free)
                kw = dict(max_new_tokens=16, max_thinking_tokens=N, end_think_token_id=E)
                ref = nemocompile.generate(model, prompt, mode=mode, block_length=4, eos_token_id=-1, **kw)
                got = rt.generate(prompt, mode=mode, eos=-1, **kw)
                assert got.tokens == ref.tokens and got.stats.forwards == ref.stats.forwards, (mode, N)
                assert got.tokens[N] == E
        with pytest.raises(GenerationError, match="max_thinking_tokens must be"):
            rt.generate([5], max_thinking_tokens="many", end_think_token_id=4)
