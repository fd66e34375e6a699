"""Quadratic self-speculation (spec 3.4): the fused layouts, the fusion pass, the eager
decoder's exact semantics on a scripted model, losslessness eager and on ONNX Runtime,
and what the runtime writes into its cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TOLERANCE, make_config, make_model

import nemocompile
from nemocompile.decode.quadratic_spec import prefill_draft_layout, verify_draft_layout
from nemocompile.errors import GenerationError
from nemocompile.graphs import plan
from nemocompile.graphs.export import export_artifact
from nemocompile.graphs.steps import Fuse, StepSpec
from nemocompile.artifact.manifest import Manifest
from nemocompile.model import KVCache
from nemocompile.model.layout import Branch, Layout, full_input
from nemocompile.checks.parity import separate_steps
from nemocompile.passes.base import PassError
from nemocompile.passes.check_tensorrt import lint_artifact
from nemocompile.passes.fuse_draft_verify import fuse_draft_verify
from nemocompile.runtime import Runtime

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V, MASK, EOS = 64, 3, 2
FP32 = TOLERANCE[torch.float32]
PROMPT = [10, 11, 12]  # positions 0..2


# ---- the layouts and the pass ---------------------------------------------------------
def test_fused_layout_attention_rule_is_the_specs():
    B = 3
    layout = verify_draft_layout(B)
    assert layout.tokens == B * (B + 1) and layout.input_length == B and layout.spine == B
    allowed = layout.allowed()
    spine = list(range(B))
    for j in range(B):
        # d_j sees d_0..d_j (a causal verify of the draft)
        assert [k for k in range(layout.tokens) if allowed[j][k]] == spine[:j + 1]
        start = layout.branch_starts()[j]
        own = list(range(start, start + B))
        for q in own:  # a mask of group j sees d_0..d_j and its own group
            assert [k for k in range(layout.tokens) if allowed[q][k]] == spine[:j + 1] + own
    # positions: d_j at cache_len + j, group j's mask k (1..B) at cache_len + j + k
    offsets = layout.offsets()
    assert offsets[:B] == spine
    for j, start in enumerate(layout.branch_starts()):
        assert offsets[start:start + B] == [j + k for k in range(1, B + 1)]
    assert layout.lora == "none" and layout.pattern == "fused"


def test_fusion_pass_builds_the_quadratic_and_the_prefill_steps():
    specs = plan(["quadratic-spec"], block_length=4, prefill_length=6, has_lora=True)
    assert [type(s).__name__ for s, _ in specs] == ["StepSpec", "Fuse", "Fuse"]
    result = fuse_draft_verify([s for s, _ in specs])
    assert result.count == 2
    prefill, prefill_draft, verify_draft = result.specs
    assert prefill.layout == Layout.causal(6)
    assert prefill_draft.layout == prefill_draft_layout(6, 4)
    assert verify_draft.layout == verify_draft_layout(4)
    # the spine's logits only (to sample the verify): never B x (B+1) x V
    assert prefill_draft.logits == "spine" and verify_draft.logits == "spine"
    greedy_only = fuse_draft_verify([s for s, _ in plan(["quadratic-spec"], block_length=4, prefill_length=6,
                                                         has_lora=True, logits=False)]).specs
    assert not any(s.logits for s in greedy_only)
    assert verify_draft.output_names == ("logits", "candidate", "confidence", "top_logprobs", "top_ids",
                                         "next_logprob", "present_k", "present_v")
    assert verify_draft.scored_positions == 4  # log-probs of the spine only: the branches just draft
    assert greedy_only[2].output_names == ("candidate", "confidence", "top_logprobs", "top_ids", "next_logprob",
                                           "present_k", "present_v")


def test_fusion_pass_declines_what_it_cannot_fuse_and_says_why():
    causal, masks = StepSpec.causal("verify", 4), StepSpec.bidirectional("m", 4, source="mask")
    with pytest.raises(PassError, match="all masks at the block's start"):
        fuse_draft_verify([Fuse("x", causal, StepSpec.bidirectional("draft", 4), "each")])
    with pytest.raises(PassError, match="not a plain causal step"):
        fuse_draft_verify([Fuse("x", masks, masks, "each")])
    with pytest.raises(PassError, match="anchors must be"):
        fuse_draft_verify([Fuse("x", causal, masks, "middle")])


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_fused_step_rows_equal_the_separate_steps_eager(lora_rank):
    """The pass's invariant: spine rows == the separate verify; branch j == a draft on the
    cache extended by d_0..d_j. Cache lengths 0, mid and near capacity, a left-padded row."""
    model = make_model(lora_rank=lora_rank)
    B, C = 4, 40
    gen = torch.Generator().manual_seed(0)
    for layout in (verify_draft_layout(B), prefill_draft_layout(5, B),
                   Layout(B, tuple(Branch(B, j + 1, j, "mask", lora=bool(lora_rank)) for j in range(B)))):
        for cache_len in (0, 17, C - layout.input_length):
            cfg = model.config
            shape = (cfg.num_hidden_layers, 2, cfg.num_key_value_heads, C, cfg.head_dim)
            ck, cv = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
            inputs = {"input_ids": torch.randint(4, cfg.vocab_size, (2, layout.input_length), generator=gen),
                      "cache_k": ck, "cache_v": cv, "cache_len": torch.tensor(cache_len),
                      "row_start": torch.tensor([0, min(3, cache_len)])}
            fused, k, v = model.step(inputs["input_ids"], ck, cv, cache_len, inputs["row_start"], layout=layout)
            ref, rk, rv = separate_steps(model, layout, inputs)
            assert fused.shape == ref.shape == (2, layout.tokens, cfg.vocab_size)
            torch.testing.assert_close(fused, ref, atol=FP32, rtol=0)  # fp32 parity tolerance
            torch.testing.assert_close(k, rk, atol=FP32, rtol=0)
            assert k.shape[3] == layout.spine  # only the spine's rows come back


# ---- exact semantics on a scripted model ---------------------------------------------
class ScriptedStepModel:
    """Spine logits at absolute position t point at ``ar[t + 1]``; a mask at position t of
    the branch anchored at position s points at ``drafts[(s, t)]`` (default: token 1)."""

    def __init__(self, ar: list[int], drafts: dict[tuple[int, int], int]):
        self.config = make_config(vocab_size=V, mask_token_id=MASK, eos_token_id=EOS, num_hidden_layers=1)
        self.ar, self.drafts = ar, drafts
        self.device, self.dtype, self.has_lora, self.tokenizer = torch.device("cpu"), torch.float32, False, None
        self.calls: list[tuple[int, int, int]] = []  # (cache length, spine, tokens) per forward

    def new_cache(self, batch_size, max_len):
        return KVCache(self.config, batch_size, max_len)

    @staticmethod
    def _peaked(token: int) -> torch.Tensor:
        logits = torch.zeros(V)
        logits[token] = math.log(0.99 * (V - 1) / 0.01)
        return logits

    def step(self, input_ids, cache_k, cache_v, cache_len, row_start, *, layout):
        ids = full_input(layout, input_ids, MASK)[0].tolist()
        self.calls.append((int(cache_len), layout.spine, layout.tokens))
        out = torch.zeros(1, layout.tokens, V)
        for i in range(layout.spine):
            t = cache_len + i
            out[0, i] = self._peaked(self.ar[t + 1] if t + 1 < len(self.ar) else 0)
        for b, start in zip(layout.branches, layout.branch_starts()):
            anchor = cache_len + b.anchor
            for k in range(b.length):
                assert ids[start + k] == MASK
                out[0, start + k] = self._peaked(self.drafts.get((anchor, cache_len + b.offset + k), 1))
        shape = (1, 1, self.config.num_key_value_heads, layout.spine, self.config.head_dim)
        return out, torch.zeros(shape), torch.zeros(shape)


def test_acceptance_bonus_next_draft_and_crop():
    ar = PROMPT + [20, 21, 22, 23, 24, 25, 26, 27, 28]
    drafts = {(2, 4): 21, (2, 5): 59, (2, 6): 23,  # the first draft: d = [20, 21, 59, 23]
              (4, 5): 57,  # group 1's guess for the bonus slot: replaced by the bonus 22
              (4, 6): 23, (4, 7): 24, (4, 8): 25}
    m = ScriptedStepModel(ar, drafts)
    r = nemocompile.generate(m, PROMPT, mode="quadratic-spec", max_new_tokens=7, block_length=4)
    assert r.tokens == [20, 21, 22, 23, 24, 25, 26]
    # prefill + first draft is ONE forward; then one fused forward per cycle, cropped to before + cnt
    assert m.calls == [(0, 3, 3 + 4), (3, 4, 4 * 5), (5, 4, 4 * 5)]
    assert r.stats.acceptance_lengths == [2, 4] and r.stats.acceptance_length == 3.0
    assert r.stats.forwards == 3 and r.stats.decode_forwards == 2
    assert r.stats.tokens_per_forward == pytest.approx(7 / 3)


def test_eos_and_max_new_tokens_trim_and_no_forward_after_the_stop():
    ar = PROMPT + [20, 21, EOS, 23, 24]
    drafts = {(2, 4): 21, (2, 5): EOS, (2, 6): 23}
    m = ScriptedStepModel(ar, drafts)
    r = nemocompile.generate(m, PROMPT, mode="quadratic-spec", max_new_tokens=10, block_length=4)
    assert r.tokens == [20, 21, EOS] and r.stats.forwards == 2  # nothing after the EOS
    m = ScriptedStepModel(PROMPT + [20, 21, 22, 23, 24], {(2, 4): 21, (2, 5): 22, (2, 6): 23})
    r = nemocompile.generate(m, PROMPT, mode="quadratic-spec", max_new_tokens=2, block_length=4)
    assert r.tokens == [20, 21] and r.stats.forwards == 2
    m = ScriptedStepModel(PROMPT + [20, 21], {})
    r = nemocompile.generate(m, PROMPT, mode="quadratic-spec", max_new_tokens=1, block_length=4)
    assert r.tokens == [20] and r.stats.forwards == 1  # the prefill forward alone


def test_thresholds_and_batches_are_refused_clearly():
    model = make_model()
    with pytest.raises(GenerationError, match="takes no threshold"):
        nemocompile.generate(model, [5, 6], mode="quadratic-spec", threshold=0.5)
    with pytest.raises(GenerationError, match="batch 1"):
        nemocompile.generate(model, [[5, 6], [7]], mode="quadratic-spec")


# ---- lossless, eager and ONNX Runtime --------------------------------------------------
def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 96, (int(k),), generator=gen).tolist()
            for k in torch.randint(1, 20, (n,), generator=gen)]


@pytest.mark.parametrize("block", [2, 4, 8, 16])
def test_eager_quadratic_equals_ar_greedy(block):
    model = make_model(seed=2, scale=0.3)  # a smoother model: long acceptances happen too
    for p in _prompts(12, seed=block):
        ar = nemocompile.generate(model, p, mode="ar", max_new_tokens=40, eos_token_id=-1)
        q = nemocompile.generate(model, p, mode="quadratic-spec", max_new_tokens=40, block_length=block,
                                 eos_token_id=-1)
        assert q.tokens == ar.tokens
        assert q.stats.forwards == 1 + len(q.stats.acceptance_lengths)
        assert sum(q.stats.acceptance_lengths) + 1 >= 40  # the first token comes with the prefill


def test_eager_quadratic_equals_ar_on_the_embedded_model(embedded_dir):
    model = nemocompile.load(embedded_dir, dtype="fp32")
    for p in ["def fibonacci(n):", "import os\n\nclass Config:", "for i in range(10):"]:
        ar = nemocompile.generate(model, p, mode="ar", max_new_tokens=48)
        q = nemocompile.generate(model, p, mode="quadratic-spec", max_new_tokens=48, block_length=8)
        assert q.tokens == ar.tokens and q.stats.forwards < ar.stats.forwards


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """quadratic-spec (and AR) graphs of one random model at block lengths 2, 4, 8, 16, greedy only."""
    model = make_model(seed=2, scale=0.3)
    root = tmp_path_factory.mktemp("quadratic")
    out = {}
    for block in (2, 4, 8, 16):
        out[block] = root / f"b{block}"
        export_artifact(model, out[block], modes=["ar", "quadratic-spec"], block_length=block, max_seq_len=96,
                        prefill_length=8, logits=False)
    return model, out


def test_greedy_artifacts_have_no_vocabulary_sized_output(artifacts):
    model, arts = artifacts
    for art in arts.values():
        manifest = Manifest.load(art)
        assert {g.step for g in manifest.graphs} == {"prefill", "ar_step", "prefill_draft", "verify_draft"}
        for g in manifest.graphs:
            assert all(model.config.vocab_size not in t.shape for t in g.outputs), (g.step, g.outputs)
        fused = manifest.graph("verify_draft")
        B = fused.block_length
        assert fused.output("candidate").shape == [1, B * (B + 1)]
        assert fused.output("present_k").shape[3] == B  # only the B verify rows come back
        with Runtime.load(art) as rt, pytest.raises(GenerationError, match="greedy-only"):
            rt.generate([5, 6], mode="ar", temperature=0.5)



@pytest.mark.parametrize("block", [2, 4, 8, 16])
def test_runtime_quadratic_equals_eager_and_ar(artifacts, block):
    model, arts = artifacts
    with Runtime.load(arts[block], threads=1) as rt:
        for p in _prompts(6, seed=100 + block) + [list(range(4, 30))]:  # 26 tokens: three prefill chunks
            eager = nemocompile.generate(model, p, mode="quadratic-spec", max_new_tokens=30, block_length=block,
                                         eos_token_id=-1)
            ours = rt.generate(p, mode="quadratic-spec", max_new_tokens=30, eos=-1)
            ar = rt.generate(p, mode="ar", max_new_tokens=30, eos=-1)
            assert ours.tokens == eager.tokens == ar.tokens
            assert ours.stats.forwards == eager.stats.forwards
            assert ours.stats.acceptance_lengths == eager.stats.acceptance_lengths


def test_runtime_writes_b_rows_per_fused_step_and_crops_to_before_plus_cnt(artifacts):
    _, arts = artifacts
    B = 4
    with Runtime.load(arts[B], threads=1) as rt:
        log = []
        write, crop = rt.cache.write, rt.cache.crop

        def logged_write(k, v, n=None, rows=None):
            assert list(rows) == [0]  # the request's row only
            log.append(("write", rt.cache.length(0), k.shape[3] if n is None else n))
            write(k, v, n, rows)

        def logged_crop(row, length):
            log.append(("crop", rt.cache.length(row), length))
            crop(row, length)

        rt.cache.write, rt.cache.crop = logged_write, logged_crop
        r = rt.generate(list(range(5, 15)), mode="quadratic-spec", max_new_tokens=20, eos=-1)
    # 10 prompt tokens in chunks of 8: the short chunk first, so the fused prefill's chunk is full
    assert log[:2] == [("write", 0, 2), ("write", 2, 8)]
    cycles = [(log[i], log[i + 1]) for i in range(len(log)) if log[i][0] == "write" and log[i][2] == B]
    cycles = [c for c in cycles if c[1][0] == "crop"]
    assert [c[1][2] - c[0][1] for c in cycles] == r.stats.acceptance_lengths  # crop to before + cnt
    assert all(w[2] == B for w, _ in cycles)  # exactly B rows written per fused step
    assert len(cycles) == r.stats.forwards - 1


# ---- the cost knob: fewer draft groups ---------------------------------------------------
def test_draft_groups_cap_acceptance_and_take_the_next_draft_from_the_last_group():
    ar = PROMPT + list(range(20, 40))
    drafts = {(2, t): ar[t] for t in range(3, 8)}  # a perfect first draft
    drafts.update({(3, t): ar[t] for t in range(4, 12)})  # group 0 (anchor position 3) drafts right too
    m = ScriptedStepModel(ar, drafts)
    r = nemocompile.generate(m, PROMPT, mode="quadratic-spec", max_new_tokens=5, block_length=4, draft_groups=1)
    # G = 1: every cycle accepts at most 1 (just the bonus), and drafts from group 0 only
    assert r.tokens == ar[3:8] and r.stats.acceptance_lengths == [1, 1, 1, 1]
    assert [c[2] for c in m.calls[1:]] == [4 + 1 * 4] * 4  # B + G x B tokens per fused forward
    with pytest.raises(GenerationError, match="draft_groups must be an integer from 1 to the block length 4"):
        nemocompile.generate(m, PROMPT, mode="quadratic-spec", block_length=4, draft_groups=5)
    with pytest.raises(GenerationError, match="quadratic-spec knob"):
        nemocompile.generate(make_model(), [5], mode="linear-spec", draft_groups=2)


def test_draft_groups_artifact_is_lossless_and_matches_eager(tmp_path):
    model = make_model(seed=2, scale=0.3)
    art = tmp_path / "g2"
    export_artifact(model, art, modes=["quadratic-spec"], block_length=8, max_seq_len=96, prefill_length=8,
                    draft_groups=2)
    fused = Manifest.load(art).graph("verify_draft")
    assert len(fused.layout["branches"]) == 2 and fused.output("candidate").shape == [1, 8 + 2 * 8]
    with Runtime.load(art, threads=1) as rt:
        assert rt.draft_groups == {8: 2}
        for p in _prompts(5, seed=9):
            ar = nemocompile.generate(model, p, mode="ar", max_new_tokens=30, eos_token_id=-1)
            eager = nemocompile.generate(model, p, mode="quadratic-spec", max_new_tokens=30, block_length=8,
                                         eos_token_id=-1, draft_groups=2)
            ours = rt.generate(p, mode="quadratic-spec", max_new_tokens=30, eos=-1)
            assert ours.tokens == eager.tokens == ar.tokens
            assert ours.stats.acceptance_lengths == eager.stats.acceptance_lengths
            assert max(eager.stats.acceptance_lengths) <= 2
    with pytest.raises(Exception, match="draft_groups must be an integer from 1 to the block length 8"):
        export_artifact(model, tmp_path / "bad", modes=["quadratic-spec"], block_length=8, draft_groups=9)


@pytest.mark.slow
def test_block_32_is_lossless_eager_and_on_onnx_runtime(tmp_path):
    model = make_model(seed=2, scale=0.3)
    export_artifact(model, tmp_path / "b32", modes=["quadratic-spec"], block_length=32, max_seq_len=160,
                    prefill_length=8, logits=False)
    with Runtime.load(tmp_path / "b32", threads=1) as rt:
        for p in _prompts(6, seed=32):
            ar = nemocompile.generate(model, p, mode="ar", max_new_tokens=64, eos_token_id=-1)
            eager = nemocompile.generate(model, p, mode="quadratic-spec", max_new_tokens=64, block_length=32,
                                         eos_token_id=-1)
            ours = rt.generate(p, mode="quadratic-spec", max_new_tokens=64, eos=-1)
            assert ours.tokens == eager.tokens == ar.tokens
            assert ours.stats.forwards == eager.stats.forwards


def test_the_b32_fused_graph_passes_the_tensorrt_lint(tmp_path):
    """At B = 32 the fused step has 1056 tokens; its attention rule, built from integer
    compares or torch.eye, was exported with UINT16 operands that TensorRT's Equal refuses."""
    export_artifact(make_model(), tmp_path / "b32", modes=["quadratic-spec"], block_length=32, max_seq_len=96,
                    prefill_length=8, logits=False)
    findings = lint_artifact(tmp_path / "b32")
    assert set(findings) == {"prefill", "prefill_draft", "verify_draft"}
    assert not any(findings.values()), findings
