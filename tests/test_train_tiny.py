"""The training script's building blocks (examples/train_tiny.py): the joint
attention mask, the noising, the SDPA training forward and the loop measures
the unlikelihood and distillation stages rely on."""

from __future__ import annotations

import pytest
import torch

from conftest import make_config, make_model

tt = pytest.importorskip("examples.train_tiny")


def brute_joint_mask(L: int, block: int) -> torch.Tensor:
    allowed = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for q in range(2 * L):
        for k in range(2 * L):
            q_clean, k_clean = q < L, k < L
            qp, kp = q % L, k % L
            if q_clean:  # clean stream: causal over clean keys only
                allowed[q, k] = k_clean and kp <= qp
            elif k_clean:  # noisy query: the clean (cached) blocks before its own
                allowed[q, k] = kp // block < qp // block
            else:  # noisy query: every noisy key of its own block
                allowed[q, k] = kp // block == qp // block
    return allowed


def test_joint_mask_matches_the_definition():
    assert torch.equal(tt.joint_mask(12, 4), brute_joint_mask(12, 4))


def test_noisy_copy_keeps_block_heads_and_masks_full_blocks():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(10, 50, (64, 32))
    xt, masked, w, full = tt.noisy_copy(x, 8, 0.5, gen)
    assert not masked[:, ::8].any(), "block position 0 is the known seed and is never masked"
    assert torch.equal(xt[masked], torch.full_like(xt[masked], tt.MASK_ID))
    assert torch.equal(xt[~masked], x[~masked])
    head = torch.zeros(32, dtype=torch.bool)
    head[::8] = True
    assert full.any() and (masked | head)[full].all(), "a fully masked block masks every position but the head"
    assert torch.all(w[full] == 1.0) and torch.all(w >= 1.0)


def test_sdpa_training_forward_equals_the_model():
    config = make_config(block_size=4)
    model = make_model(config, scale=0.2)
    L = 8
    mask = tt.joint_mask(L, 4)
    positions = (torch.arange(2 * L) % L)[None]
    ids = torch.randint(4, config.vocab_size, (1, 2 * L))
    ref, _, _ = model.run_layers(ids, positions, mask[None])
    ours = model.diffusion_head(tt.hidden_states(model, ids, positions, mask[None]))
    assert (ref - ours).abs().max().item() < 1e-4


def test_repeated_ngrams_and_first_repeat():
    row = [1, 2, 3, 1, 2, 3, 4]
    assert tt.repeated_ngram_positions(row, 0, 2) == [4, 5]  # (1,2) and (2,3) seen before
    assert tt.repeated_ngram_positions(row, 5, 2) == [5]
    assert tt.first_repeat(row, 0, 3) == 5
    assert tt.first_repeat([5, 6, 7, 8], 0, 2) == 4, "no repeat: the whole row"


def test_unlikelihood_penalizes_exactly_the_repeated_tokens():
    model = make_model(make_config(), scale=0.2)
    ctx = torch.tensor([[10, 11, 12, 13]])
    fresh = torch.tensor([[20, 21, 22, 23]])
    loss, share = tt.unlikelihood_loss(model, ctx, fresh, 2)
    assert loss.item() == 0.0 and share == 0.0
    looped = torch.tensor([[10, 11, 30, 31]])  # token 11 completes the bigram (10, 11) of the context
    loss, share = tt.unlikelihood_loss(model, ctx, looped, 2)
    seq = torch.cat([ctx, looped], 1)
    probs = torch.softmax(model(seq[:, :-1], pattern="causal")[0], -1)
    p = probs[4, 11]  # logits at position 4 (token 10) predict position 5 (token 11)
    assert share == pytest.approx(1 / 4)
    assert loss.item() == pytest.approx((-torch.log(1 - p) / 4).item(), rel=1e-4)


def test_unlikelihood_continuation_scope_spares_copies_of_the_context():
    model = make_model(make_config(), scale=0.2)
    ctx = torch.tensor([[10, 11, 12, 13]])
    copied = torch.tensor([[10, 11, 30, 31]])  # repeats a context bigram, not itself
    loss, share = tt.unlikelihood_loss(model, ctx, copied, 2, scope="continuation")
    assert loss.item() == 0.0 and share == 0.0
    looped = torch.tensor([[30, 31, 30, 31]])  # the last 31 completes the bigram (30, 31) a second time
    loss_c, share_c = tt.unlikelihood_loss(model, ctx, looped, 2, scope="continuation")
    loss_a, share_a = tt.unlikelihood_loss(model, ctx, looped, 2, scope="all")
    assert share_c == share_a == pytest.approx(1 / 4) and loss_c.item() == pytest.approx(loss_a.item())
    assert loss_c.item() > 0.0


def test_anchor_kl_is_zero_for_the_teacher_itself_and_pulls_a_drifted_model_back():
    model = make_model(make_config(), scale=0.2)
    teacher = make_model(make_config(), scale=0.2)
    teacher.load_state_dict(model.state_dict())
    model.requires_grad_(True)
    teacher.requires_grad_(True)  # anchor_kl itself must keep the teacher out of the graph
    seq = torch.randint(4, model.config.vocab_size, (2, 9))
    assert tt.anchor_kl(model, teacher, seq).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model.diffusion_head.weight.add_(0.3 * torch.randn_like(model.diffusion_head.weight))
    kl = tt.anchor_kl(model, teacher, seq)
    assert kl.item() > 1e-3
    kl.backward()
    assert model.diffusion_head.weight.grad.abs().sum() > 0 and teacher.diffusion_head.weight.grad is None


def test_banned_greedy_follows_plain_greedy_until_it_would_repeat_then_never_repeats():
    model = make_model(make_config(), scale=0.2)
    ctx = torch.randint(4, model.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(1))
    _, _, plain = tt.greedy_block(model, ctx, 24)
    _, _, banned = tt.greedy_block(model, ctx, 24, ban_ngram=2)
    for c, p, b in zip(ctx.tolist(), plain.tolist(), banned.tolist()):
        assert tt.repeated_ngram_positions(c + b, len(c), 2) == []
        first = tt.first_repeat(c + p, len(c), 2) - len(c)
        assert b[:first] == p[:first]
    assert any(tt.repeated_ngram_positions(c + p, len(c), 2) for c, p in zip(ctx.tolist(), plain.tolist())), \
        "the random model's plain greedy repeats somewhere, so the ban is exercised"


def test_continuation_ce_is_the_causal_ce_of_the_continuation_tokens_only():
    model = make_model(make_config(), scale=0.2)
    ctx = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    y = torch.tensor([[30, 31, 32], [40, 41, 42]])
    seq = torch.cat([ctx, y], 1)
    logits = model(seq[:, :-1], pattern="causal")  # position i predicts token i + 1
    ref = torch.nn.functional.cross_entropy(logits[:, 3:].flatten(0, 1), y.flatten())
    assert tt.continuation_ce(model, ctx, y).item() == pytest.approx(ref.item(), rel=1e-4)


def test_the_continuation_losses_give_the_same_result_from_shared_states():
    model = make_model(make_config(), scale=0.2)
    teacher = make_model(make_config(), seed=1, scale=0.2)
    ctx = torch.tensor([[10, 11, 12, 13]])
    y = torch.tensor([[10, 11, 30, 31]])
    seq = torch.cat([ctx, y], 1)
    states = tt.next_token_states(model, seq)
    assert tt.unlikelihood_loss(model, ctx, y, 2, states=states)[0].item() == pytest.approx(
        tt.unlikelihood_loss(model, ctx, y, 2)[0].item())
    assert tt.anchor_kl(model, teacher, seq, states).item() == pytest.approx(tt.anchor_kl(model, teacher, seq).item())
    assert tt.continuation_ce(model, ctx, y, states).item() == pytest.approx(tt.continuation_ce(model, ctx, y).item())
