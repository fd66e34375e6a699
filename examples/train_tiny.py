"""Train the embedded tiny tri-mode model (``nemocompile/assets/tiny``) from scratch on CPU.

Exact commands used for the shipped checkpoint (an otherwise idle 2-core CPU,
about 4.2 hours; ``TRAINING.md`` records the run)::

    PYTHONPATH=. python examples/train_tiny.py --stage corpus --workdir /tmp/tiny/w5 --seed 5
    PYTHONPATH=. python examples/train_tiny.py --stage main --workdir /tmp/tiny/w5 --seed 5 --minutes 88
    PYTHONPATH=. python examples/train_tiny.py --stage main --workdir /tmp/tiny/w5 --seed 8 --minutes 98 \
        --resume --lr 2e-3 --min-lr-frac 0.03
    PYTHONPATH=. python examples/train_tiny.py --stage unloop --workdir /tmp/tiny/w5 --seed 8 --ul-minutes 14
    PYTHONPATH=. python examples/train_tiny.py --stage distill --workdir /tmp/tiny/w5 --seed 12 --dist-minutes 30
    PYTHONPATH=. python examples/train_tiny.py --stage lora --workdir /tmp/tiny/w5 --seed 12 --lora-minutes 10
    PYTHONPATH=. python examples/train_tiny.py --stage export --workdir /tmp/tiny/w5

Stages (``--stage all`` runs them in order; each reads the previous one's files
from ``--workdir`` so a stage can be re-run alone):

1. ``corpus``: Python source every nemocompile machine has offline: the
   standard library (its tests included) and the pure-Python source of
   nemocompile's own dependencies (torch, sympy, networkx, onnx), without any
   package a held-out prompt comes from (``HELDOUT_PACKAGES``; the prompts in
   ``nemocompile/assets/heldout_prompts.txt`` are third-party code). Each file
   is normalized (comments and docstrings removed, ``ast.unparse`` layout), a
   byte-level BPE (Hugging Face ``tokenizers``) is trained on a quarter of the
   files, and all files, joined with ``<|endoftext|>``, become ``tokens.pt``.
2. ``main``: the joint AR + masked-diffusion objective in one forward. For a
   clean window ``x`` [L] a noisy copy ``xt`` masks each 32-token block with its
   own rate ``t ~ U(0,1)`` (a fraction ``--p-full`` of blocks is fully masked,
   ``t = 1``, which is exactly the one-shot draft of self-speculation); block
   position 0 is never masked (at inference it is the known seed/pending token).
   ``[x ; xt]`` (2L tokens, position ids ``[0..L-1, 0..L-1]``) runs with a mask
   where clean queries are causal over clean keys, a noisy query in block b
   sees clean keys of blocks < b (the KV cache at inference) and every noisy key
   of its own block (bidirectional), and clean never sees noisy. Loss =
   ``alpha * CE_AR(clean, next token) + sum_masked CE(noisy, token itself) / t
   / (B * L)``. The LR schedule (warmup + cosine) runs on wall time so the run
   ends on time whatever the machine's load.
3. ``unloop``: the joint objective plus sequence-level unlikelihood on the
   model's own greedy continuations: every token that repeats a 4-gram is
   pushed down (greedy decoding of a small model falls into loops that maximum
   likelihood alone does not remove).
4. ``distill``: on-policy self-distillation of every base weight. The
   diffusion side learns to write, confidently, what the model's own AR greedy
   decoding writes next (``[p, MASK*31]`` and partly masked copies against the
   greedy continuation, cut where it starts repeating itself), beside the
   diffusion loss on corpus windows, while a KL anchor (``--dist-kl-weight``)
   holds the model's AR next-token distributions on those continuations at the
   unloop stage's, so greedy decoding does not drift back into loops.
5. ``lora``: the drafter LoRA on every ``o_proj`` by self-distillation: random
   contexts (half normalized corpus, half raw source as prompts arrive), the
   base model's greedy AR continuation (``p`` + 31 tokens, KV cache, LoRA off),
   then only the LoRA weights learn to predict tokens 1..31 from one
   bidirectional draft forward of ``[p, MASK*31]`` against the context's cache
   (earlier positions weigh more: acceptance is a prefix property).
6. ``export``: the real checkpoint layout (bf16 ``model.safetensors``,
   ``config.json``, tokenizer files, PEFT ``linear_spec_lora/``).

Variants measured and not shipped (``TRAINING.md``, "Experiments that were not
shipped", has the figures): ``distill`` with the AR CE on the corpus instead of
the anchor (``--dist-alpha 1 --dist-kl-weight 0``, the earlier form of the
stage), with unlikelihood on the same continuations (``--dist-ul-weight``), or
with a weaker anchor; ``--ul-scope continuation``, unlikelihood only on the
continuation's repeats of itself; ``--ul-ngram 8``; ``--ul-weight 0.3`` for
twice as long; a third ``main`` run (64 minutes more, then the same later
stages); ``distill`` as self-training on greedy text that never repeats a
4-gram (``--dist-ban-ngram 4 --dist-self-ar 1 --dist-alpha 1
--dist-kl-weight 0``: it meets the acceptance and diffusion targets only by
collapsing onto a few stock lines across prompts).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nemocompile.model.config import ModelConfig, RopeConfig
from nemocompile.model.modeling import LoRA, TriModeModel, rotate_half

SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|mask|>", "<|system|>", "<|user|>", "<|assistant|>"]
PAD_ID, EOS_ID, MASK_ID = 0, 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|endoftext|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
REPO = Path(__file__).resolve().parent.parent
ASSET_DIR = REPO / "nemocompile" / "assets" / "tiny"


def log(args: argparse.Namespace, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(Path(args.workdir) / "train.log", "a") as f:
        f.write(line + "\n")


# ----------------------------------------------------------------------------
# 1. Corpus and tokenizer
# ----------------------------------------------------------------------------
def normalize_source(text: str) -> str | None:
    """The file's code without comments and docstrings, in ``ast.unparse``'s one
    canonical layout (None if it does not parse). Code alone is far more
    predictable than the prose around it: what a 2M-parameter model can learn."""
    import ast

    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    try:
        return ast.unparse(tree) + "\n"
    except (RecursionError, ValueError):
        return None


# Packages the held-out prompts come from (nemocompile/assets/heldout_prompts.txt):
# never part of the training corpus, even when a dependency vendors them.
HELDOUT_PACKAGES = {
    "numpy", "pydantic", "click", "jinja2", "requests", "flask", "yaml", "attrs", "attr", "dateutil",
    "packaging", "markupsafe", "werkzeug", "rich", "tqdm", "pygments", "urllib3", "idna",
    "charset_normalizer", "docutils", "anyio", "fastapi", "boto3",
}
# Python source every nemocompile install has: the dependencies torch pulls in.
CORPUS_PACKAGES = ("torch", "sympy", "networkx", "onnx")


def corpus_files() -> list[Path]:
    """The wide corpus: the stdlib (its tests included) plus the pure-Python
    source of nemocompile's own dependencies, minus every held-out package."""
    import importlib.util

    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py"))
             if not {"site-packages", "idlelib", "turtledemo", "__pycache__"}.intersection(p.relative_to(root).parts[:-1])]
    for name in CORPUS_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        pkg = Path(next(iter(spec.submodule_search_locations)))
        files += [p for p in sorted(pkg.rglob("*.py"))
                  if not HELDOUT_PACKAGES.intersection(part.lower() for part in p.relative_to(pkg).parts[:-1])]
    return files


def stage_corpus(args: argparse.Namespace) -> None:
    """Normalized wide corpus (``corpus_files``), a byte-level BPE trained on a
    quarter of it, and the whole corpus as one token stream ``tokens.pt``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    work = Path(args.workdir)
    texts = []
    for path in corpus_files():
        text = normalize_source(path.read_text(encoding="utf-8", errors="replace"))
        if text and len(text) < 2_000_000:  # a few generated tables are huge and teach nothing
            texts.append(text)
    random.Random(args.seed).shuffle(texts)
    nbytes = sum(len(t.encode()) for t in texts)
    log(args, f"corpus: {len(texts)} normalized files, {nbytes / 1e6:.1f} MB")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts[: max(1, len(texts) // 4)], trainer=trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS[:3]] == [PAD_ID, EOS_ID, MASK_ID]
    tok.save(str(work / "tokenizer.json"))
    stream = token_stream(tok, texts)
    torch.save(stream, work / "tokens.pt")
    log(args, f"tokenizer: vocab {tok.get_vocab_size()}, {nbytes / 1e6:.1f} MB -> {len(stream) / 1e6:.2f} M tokens")


def token_stream(tok, texts: list[str]) -> torch.Tensor:
    """Every text's ids, each followed by ``<|endoftext|>``, as one int32 stream."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.int32)


# ----------------------------------------------------------------------------
# 2. Joint AR + diffusion pre-training
# ----------------------------------------------------------------------------
def make_config(args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=65536, block_size=32,
        mask_token_id=MASK_ID, eos_token_id=EOS_ID,
        rope=RopeConfig(original_max_position_embeddings=4096, llama_4_scaling_beta=0.1),
    )


def joint_mask(L: int, block: int) -> torch.Tensor:
    """[2L, 2L] bool: clean causal; noisy block b sees clean blocks < b and its own noisy block."""
    i = torch.arange(2 * L)
    clean, blk, pos = i < L, (i % L) // block, i % L
    qc, kc = clean[:, None], clean[None, :]
    return (
        (qc & kc & (pos[None, :] <= pos[:, None]))
        | (~qc & kc & (blk[None, :] < blk[:, None]))
        | (~qc & ~kc & (blk[None, :] == blk[:, None]))
    )


def hidden_states(model: TriModeModel, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states [B, L, hidden]: ``run_layers`` with SDPA attention.

    Same math as ``TriModeModel.run_layers`` (checked at start-up to fp32
    tolerance) but about 2x faster to train on CPU than its explicit softmax.
    """
    h = model.encoder.embed_tokens(ids)
    cos, sin, qscale = model.rotary(positions, h.dtype)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    B, L = ids.shape
    for layer in model.encoder.layers:
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(B, L, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(B, L, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(B, L, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        q = q * qscale[:, None, :, None].to(q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
        h = h + attn.o_proj(o.transpose(1, 2).reshape(B, L, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.encoder.norm(h)


def next_token_states(model: TriModeModel, seq: torch.Tensor) -> torch.Tensor:
    """Hidden states [B, n-1, hidden] of one causal forward over ``seq[:, :-1]`` ([B, n], positions from 0):
    state i predicts token i + 1."""
    B, n = seq.shape[0], seq.shape[1] - 1
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return hidden_states(model, seq[:, :-1], torch.arange(n)[None].expand(B, -1), causal[None].expand(B, -1, -1))


def sample_windows(stream: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - length - 1, (batch,), generator=gen)
    return torch.stack([stream[s : s + length] for s in starts.tolist()]).long()


def noisy_copy(x: torch.Tensor, block: int, p_full: float, gen: torch.Generator):
    """xt [B, L], masked [B, L] bool, per-position 1/t weight [B, L], full-block flag [B, L]."""
    B, L = x.shape
    nb = L // block
    t = torch.rand(B, nb, generator=gen).clamp(min=0.05)
    full = torch.rand(B, nb, generator=gen) < p_full
    t = torch.where(full, torch.ones_like(t), t)
    t_pos = t.repeat_interleave(block, dim=1)
    masked = torch.rand(B, L, generator=gen) < t_pos
    masked[:, ::block] = False  # block position 0 is the known seed / pending token
    xt = torch.where(masked, torch.full_like(x, MASK_ID), x)
    return xt, masked, 1.0 / t_pos, full.repeat_interleave(block, dim=1)


def joint_losses(model: TriModeModel, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 p_full: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """AR CE, 1/t-weighted masked-diffusion loss, and the CE of fully masked blocks (a float, for the log)."""
    B, L = x.shape
    xt, masked, w, full = noisy_copy(x, model.config.block_size, p_full, gen)
    h = hidden_states(model, torch.cat([x, xt], 1), positions[None].expand(B, -1), mask[None].expand(B, -1, -1))
    ar_logits = model.diffusion_head(h[:, : L - 1])
    ar_loss = F.cross_entropy(ar_logits.reshape(-1, ar_logits.shape[-1]), x[:, 1:].reshape(-1))
    hn = h[:, L:][masked]  # only masked noisy positions carry a loss
    ce = F.cross_entropy(model.diffusion_head(hn), x[masked], reduction="none")
    diff_loss = (ce * w[masked]).sum() / (B * L)
    full_ce = ce[full[masked]].mean().item() if full[masked].any() else float("nan")
    return ar_loss, diff_loss, full_ce


def optimize(opt: torch.optim.Optimizer, model: TriModeModel, loss: torch.Tensor) -> None:
    """One optimizer step on ``loss`` with the gradient norm clipped to 1."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def finetune_schedule(opt: torch.optim.Optimizer, base_lr: float, minutes: float):
    """Yield ``(step, lr)`` (step counts from 1) until ``minutes`` of wall time have passed, after setting
    the optimizer's lr: 20 warmup steps, then a cosine to 0 on wall time (the unloop and distill stages)."""
    budget, t0, step = minutes * 60.0, time.time(), 0
    while time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        step += 1
        lr = base_lr * min(1.0, step / 20) * 0.5 * (1 + math.cos(math.pi * frac))
        for g in opt.param_groups:
            g["lr"] = lr
        yield step, lr


def finetune_setup(args: argparse.Namespace, work: Path, seed: int, lr: float):
    """What a stage that fine-tunes every base weight starts from (unloop, distill): the workdir's
    base model and checkpoint, torch seeded with ``seed`` and a generator of its own, the joint
    objective's mask and position ids, and a fresh AdamW without weight decay."""
    model, ckpt = load_base(work)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    L = args.seq_len
    mask, positions = joint_mask(L, model.config.block_size), torch.arange(2 * L) % L
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    return model, ckpt, gen, mask, positions, opt


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def stage_main(args: argparse.Namespace) -> None:
    work = Path(args.workdir)
    stream = torch.load(work / "tokens.pt")
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(work / "tokenizer.json")).get_vocab_size()
    config = make_config(args, vocab)
    torch.manual_seed(args.seed)
    model = TriModeModel(config)
    for name, p in model.named_parameters():  # small init keeps early logits calm
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.data.mul_(1 / math.sqrt(2 * config.num_hidden_layers))
    n_params = sum(p.numel() for p in model.parameters())
    log(args, f"model: {n_params} parameters, config {json.dumps(config.to_dict())}")
    tokens_before = 0
    if args.resume:  # continue from the workdir's base.pt (weights only; a fresh optimizer and schedule)
        prev = torch.load(work / "base.pt")
        model.load_state_dict(prev["model"])
        tokens_before = prev.get("tokens_total", prev["tokens"])
        log(args, f"resumed from {work / 'base.pt'} after {tokens_before} clean tokens")

    L, Bk = args.seq_len, config.block_size
    mask = joint_mask(L, Bk)
    positions = torch.arange(2 * L) % L
    # Start-up check: the SDPA training forward equals the model's own run_layers.
    with torch.no_grad():
        ids = torch.randint(3, vocab, (1, 2 * L))
        ref, _, _ = model.run_layers(ids, positions[None], mask[None])
        ours = model.diffusion_head(hidden_states(model, ids, positions[None], mask[None]))
        assert (ref - ours).abs().max() < 1e-3, "training forward diverged from TriModeModel.run_layers"

    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60.0
    t0 = last_ckpt = time.time()
    step, tokens = 0, 0
    ema: dict[str, float] = {}
    while True:
        frac = (time.time() - t0) / budget
        if frac >= 1.0:
            break
        warm = min(1.0, step / args.warmup_steps)
        lr = args.lr * warm * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = sample_windows(stream, args.batch, L, gen)
        ar_loss, diff_loss, full_ce = joint_losses(model, x, mask, positions, args.p_full, gen)
        loss = args.alpha * ar_loss + diff_loss
        optimize(opt, model, loss)
        step += 1
        tokens += x.numel()
        for k, v in (("ar", ar_loss.item()), ("diff", diff_loss.item()), ("full_block_ce", full_ce)):
            if not math.isnan(v):
                ema[k] = v if k not in ema else 0.95 * ema[k] + 0.05 * v
        if step % args.log_every == 0:
            el = time.time() - t0
            log(args, f"step {step} tokens {tokens} lr {lr:.2e} ar {ema['ar']:.3f} diff {ema['diff']:.3f} "
                      f"full_block_ce {ema.get('full_block_ce', float('nan')):.3f} "
                      f"tok/s {tokens / el:.0f} elapsed {el / 60:.1f} min")
        if time.time() - last_ckpt > args.ckpt_minutes * 60:
            save_atomic({"config": config.to_dict(), "model": model.state_dict(), "step": step,
                         "tokens": tokens, "tokens_total": tokens_before + tokens, "ema": ema}, work / "base.pt")
            last_ckpt = time.time()
    el = time.time() - t0
    save_atomic({"config": config.to_dict(), "model": model.state_dict(), "step": step, "tokens": tokens,
                 "tokens_total": tokens_before + tokens, "ema": ema, "wall_s": el}, work / "base.pt")
    log(args, f"main done: {step} steps, {tokens} clean tokens, {el / 60:.1f} min, final ema {ema}")


# ----------------------------------------------------------------------------
# 3. Unlikelihood against greedy loops
# ----------------------------------------------------------------------------
def repeated_ngram_positions(seq: list[int], start: int, n: int) -> list[int]:
    """Indices j >= start whose token completes an n-gram already seen earlier in ``seq``."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for j in range(n - 1, len(seq)):
        gram = tuple(seq[j - n + 1 : j + 1])
        if j >= start and gram in seen:
            out.append(j)
        seen.add(gram)
    return out


def unlikelihood_loss(model: TriModeModel, ctx: torch.Tensor, cont: torch.Tensor, n: int,
                      scope: str = "all", states: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Sequence-level unlikelihood of ``cont`` (greedy continuations of ``ctx``) and its repeated n-gram share.

    ``-log(1 - p(token))`` from one causal forward over ``[ctx ; cont]`` at
    every continuation token that completes an n-gram already in the context
    or the continuation (``scope="all"``), or already in the continuation only
    (``scope="continuation"``: the model repeating itself, while reusing the
    context's names and phrases goes unpunished), summed and divided by the
    continuation token count. ``states``: that forward's ``next_token_states``,
    when the caller already has them.
    """
    ctx_len = ctx.shape[1]
    seq = torch.cat([ctx, cont], 1)
    flags = torch.zeros_like(seq, dtype=torch.bool)
    for b, row in enumerate(seq.tolist()):
        if scope == "all":
            flags[b, repeated_ngram_positions(row, ctx_len, n)] = True
        else:
            flags[b, [ctx_len + j for j in repeated_ngram_positions(row[ctx_len:], 0, n)]] = True
    h = next_token_states(model, seq) if states is None else states
    target_flags = flags[:, 1:]  # logits at i predict token i + 1
    probs = F.softmax(model.diffusion_head(h[target_flags]), -1)
    p_tok = probs.gather(1, seq[:, 1:][target_flags][:, None]).squeeze(1)
    loss = -torch.log((1 - p_tok).clamp(min=1e-5)).sum() / cont.numel()
    return loss, target_flags[:, ctx_len - 1 :].float().mean().item()


def stage_unloop(args: argparse.Namespace) -> None:
    """Continue the joint objective plus sequence-level unlikelihood (Welleck et
    al. 2019, "Neural text generation with unlikelihood training"): the model's
    own greedy continuations of corpus contexts, and at every token that
    completes an n-gram already in the context or continuation, the loss
    ``-log(1 - p(token))``. Greedy decoding of a small model falls into loops
    that maximum likelihood alone does not remove; this penalizes exactly them."""
    work = Path(args.workdir)
    model, ckpt, gen, mask, positions, opt = finetune_setup(args, work, args.seed + 2, args.ul_lr)
    stream = torch.load(work / "tokens.pt")
    L = args.seq_len
    t0, step, ema = time.time(), 0, {}
    for step, lr in finetune_schedule(opt, args.ul_lr, args.ul_minutes):
        ar_loss, diff_loss, _ = joint_losses(model, sample_windows(stream, args.batch, L, gen), mask, positions,
                                             args.p_full, gen)
        ctx_len = int(torch.randint(16, 160, (1,), generator=gen))
        ctx = sample_windows(stream, args.ul_batch, ctx_len, gen)
        _, _, cont = greedy_block(model, ctx, args.ul_tokens)
        ul_loss, rep = unlikelihood_loss(model, ctx, cont, args.ul_ngram, args.ul_scope)
        loss = args.alpha * ar_loss + diff_loss + args.ul_weight * ul_loss
        optimize(opt, model, loss)
        for k, v in (("ar", ar_loss.item()), ("diff", diff_loss.item()), ("ul", ul_loss.item()), ("repeat", rep)):
            ema[k] = v if k not in ema else 0.9 * ema[k] + 0.1 * v
        if step % 10 == 0:
            log(args, f"unloop step {step} lr {lr:.2e} ar {ema['ar']:.3f} diff {ema['diff']:.3f} ul {ema['ul']:.3f} "
                      f"greedy repeated {args.ul_ngram}-gram share {ema['repeat']:.3f} "
                      f"elapsed {(time.time() - t0) / 60:.1f} min")
    ckpt.update(model=model.state_dict(), unloop={"steps": step, "ema": ema, "wall_s": time.time() - t0})
    save_atomic(ckpt, work / "base.pt")
    log(args, f"unloop done: {step} steps, final ema {ema}")


# ----------------------------------------------------------------------------
# 4. Certainty-forcing self-distillation of the base model
# ----------------------------------------------------------------------------
def first_repeat(row: list[int], start: int, n: int) -> int:
    """Index of the first token at or after ``start`` that completes an n-gram seen before (len(row) if none)."""
    hits = repeated_ngram_positions(row, start, n)
    return hits[0] if hits else len(row)


def anchor_kl(model: TriModeModel, teacher: TriModeModel, seq: torch.Tensor,
              states: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || model) of the next-token distributions, one causal forward over ``seq`` [B, n] each
    (``states``: the model's ``next_token_states`` of ``seq``, when the caller already has them)."""
    with torch.no_grad():
        target = F.log_softmax(teacher.diffusion_head(next_token_states(teacher, seq)), -1)
    logp = F.log_softmax(model.diffusion_head(next_token_states(model, seq) if states is None else states), -1)
    return F.kl_div(logp.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")


def continuation_ce(model: TriModeModel, ctx: torch.Tensor, y: torch.Tensor,
                    states: torch.Tensor | None = None) -> torch.Tensor:
    """AR CE of the continuation ``y`` [B, n] after ``ctx`` [B, c]: one causal forward over ``[ctx ; y]``
    (``states``: its ``next_token_states``, when the caller already has them)."""
    h = next_token_states(model, torch.cat([ctx, y], 1)) if states is None else states
    h = h[:, ctx.shape[1] - 1 :]  # state i predicts y[i]
    return F.cross_entropy(model.diffusion_head(h).flatten(0, 1), y.flatten())


def stage_distill(args: argparse.Namespace) -> None:
    """Teach the base model's diffusion side to write what its own AR greedy
    decoding writes, confidently (the on-policy "certainty-forcing" distillation
    of dParallel, Chen et al. 2025). Each step: random contexts, the current
    model's greedy continuation ``[p, y1..y31]`` (KV cache, cut where it first
    repeats one of its own n-grams so loops are never taught), a noisy copy of that block
    (``p`` kept, each later position masked at one rate ``t ~ U(0,1)`` per
    row, a share fully masked as in a one-shot draft), and the CE of the masked
    positions against the greedy tokens from one bidirectional forward over the
    context's cache. The diffusion loss on corpus windows runs beside it, and
    AR greedy is held where it is by a KL anchor (``--dist-kl-weight``): the
    model's next-token distributions on these same continuations against those
    of the model the stage started from. (The AR CE on the corpus, ``--dist-alpha``,
    is off by default: it pulls AR back towards the maximum-likelihood fit that
    loops.) An experiment, off by default: self-training, where the AR side
    learns the same continuations too (``--dist-self-ar``), drawn from greedy
    that never repeats an n-gram (``--dist-ban-ngram``). Unlike the drafter
    LoRA this trains every base weight, which is what diffusion mode (no LoRA)
    decodes with."""
    work = Path(args.workdir)
    model, ckpt, gen, mask, positions, opt = finetune_setup(args, work, args.seed + 3, args.dist_lr)
    stream, raw_stream = context_streams(args, work)  # seeds its own random.Random: no torch RNG drawn
    L, Bk = args.seq_len, model.config.block_size
    teacher = None
    if args.dist_kl_weight:
        teacher = copy.deepcopy(model).requires_grad_(False)
        if args.dist_kl_teacher:  # weights of an earlier stage, e.g. the unloop stage's before a first distill run
            teacher.load_state_dict(torch.load(args.dist_kl_teacher)["model"])
    t0, step, ema = time.time(), 0, {}
    for step, lr in finetune_schedule(opt, args.dist_lr, args.dist_minutes):
        ar_loss, diff_loss, _ = joint_losses(model, sample_windows(stream, args.dist_anchor_batch, L, gen), mask,
                                             positions, args.p_full, gen)
        ctx = sample_contexts(args, stream, raw_stream, args.dist_batch, L - Bk, gen)
        ctx_len, B = ctx.shape[1], ctx.shape[0]
        ck, cv, y = greedy_block(model, ctx, Bk, args.dist_ban_ngram)
        # Cut where the continuation repeats one of its own n-grams (a loop);
        # reusing the context's names and phrases is how code reads, not a loop.
        cut = torch.tensor([first_repeat(r, 0, args.ul_ngram) for r in y.tolist()])
        valid = torch.arange(Bk)[None] < cut[:, None]
        valid[:, 0] = False  # p is given, never a target
        t = torch.rand(B, 1, generator=gen).clamp(min=0.05)
        t = torch.where(torch.rand(B, 1, generator=gen) < args.p_full, torch.ones_like(t), t)
        masked = torch.rand(B, Bk, generator=gen) < t
        masked[:, 0] = False
        masked[:, 1] |= ~masked[:, 1:].any(1)  # at least one mask per row
        block = torch.where(masked, torch.full_like(y, MASK_ID), y)
        logits, _, _ = model.step(block, ck, cv, ctx_len, pattern="bidirectional")
        sel = masked & valid
        dist_loss = F.cross_entropy(logits[sel], y[sel]) if sel.any() else logits.sum() * 0.0
        # The AR losses on these continuations share one causal forward of the model over them.
        seq = torch.cat([ctx, y], 1)
        states = (next_token_states(model, seq)
                  if args.dist_ul_weight or teacher is not None or args.dist_self_ar else None)
        # Teaching the diffusion side the model's own continuations makes AR
        # greedy loop more; unlikelihood on the same continuations holds it back.
        ul_loss, rep = (unlikelihood_loss(model, ctx, y, args.ul_ngram, args.ul_scope, states) if args.dist_ul_weight
                        else (0.0, 0.0))
        # Or hold AR greedy where it is: its next-token distributions on these very
        # continuations stay those of the model the stage started from.
        kl_loss = anchor_kl(model, teacher, seq, states) if teacher is not None else 0.0
        # Or teach AR greedy the same continuations (self-training; with --dist-ban-ngram,
        # on greedy text that never repeats an n-gram).
        self_ar = continuation_ce(model, ctx, y, states) if args.dist_self_ar else 0.0
        loss = (args.dist_alpha * ar_loss + diff_loss + args.dist_weight * dist_loss + args.dist_ul_weight * ul_loss
                + args.dist_kl_weight * kl_loss + args.dist_self_ar * self_ar)
        optimize(opt, model, loss)
        ul_loss, kl_loss, self_ar = (float(x.detach()) if torch.is_tensor(x) else x
                                     for x in (ul_loss, kl_loss, self_ar))  # for the log
        with torch.no_grad():
            conf, pred = F.softmax(logits.float(), -1).max(-1)
            sure = (conf[sel] >= 0.9).float().mean().item() if sel.any() else 0.0
            full = masked[:, 1:].all(1)
            ok = (pred[:, 1:] == y[:, 1:]).long().cumprod(1).sum(1).float() + 1
            accept = ok[full].mean().item() if full.any() else float("nan")
        stats = (("ar", ar_loss.item()), ("diff", diff_loss.item()), ("distill", dist_loss.item()),
                 ("sure", sure), ("accept", accept), ("loop_free", (cut >= Bk).float().mean().item()),
                 ("ul", ul_loss), ("repeat", rep), ("kl", kl_loss), ("self_ar", self_ar))
        for k, v in stats:
            if not math.isnan(v):
                ema[k] = v if k not in ema else 0.95 * ema[k] + 0.05 * v
        if step % 10 == 0:
            log(args, f"distill step {step} lr {lr:.2e} ar {ema['ar']:.3f} diff {ema['diff']:.3f} "
                      f"distill {ema['distill']:.3f} masked>=0.9 {ema['sure']:.3f} "
                      f"one-shot acceptance {ema.get('accept', float('nan')):.2f} "
                      f"loop-free blocks {ema['loop_free']:.2f} ul {ema['ul']:.3f} "
                      f"AR kl {ema['kl']:.4f} self-training AR CE {ema['self_ar']:.3f} "
                      f"greedy repeated {args.ul_ngram}-gram share {ema['repeat']:.3f} elapsed {(time.time() - t0) / 60:.1f} min")
    ckpt.update(model=model.state_dict(), distill={"steps": step, "ema": ema, "wall_s": time.time() - t0})
    save_atomic(ckpt, work / "base.pt")
    log(args, f"distill done: {step} steps, final ema {ema}")


# ----------------------------------------------------------------------------
# 5. Drafter LoRA by self-distillation
# ----------------------------------------------------------------------------
def load_base(work: Path) -> tuple[TriModeModel, dict]:
    ckpt = torch.load(work / "base.pt")
    model = TriModeModel(ModelConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model, ckpt


def attach_lora(model: TriModeModel, rank: int, alpha: int) -> list[LoRA]:
    loras = []
    for layer in model.encoder.layers:
        attn = layer.self_attn
        lora = LoRA(attn.num_heads * attn.head_dim, model.config.hidden_size, rank, alpha / rank)
        torch.nn.init.zeros_(lora.lora_B.weight)  # PEFT init: the adapter starts as a no-op
        attn.o_lora = lora
        loras.append(lora)
    return loras


class NgramBan:
    """Greedy picks that never complete an n-gram already in the row (context and
    continuation so far): the argmax over the tokens that have not yet followed the
    row's last n-1 tokens (``no_repeat_ngram_size`` decoding)."""

    def __init__(self, ctx: torch.Tensor, n: int):
        self.n, self.rows = n, ctx.tolist()
        self.seen = [{} for _ in self.rows]
        for row, seen in zip(self.rows, self.seen):
            for j in range(n - 1, len(row)):
                seen.setdefault(tuple(row[j - n + 1 : j]), set()).add(row[j])

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        keys = [tuple(row[len(row) - self.n + 1 :]) for row in self.rows]
        for b, (key, seen) in enumerate(zip(keys, self.seen)):
            if key in seen:
                logits[b, list(seen[key])] = float("-inf")
        toks = logits.argmax(-1)
        for row, seen, key, t in zip(self.rows, self.seen, keys, toks.tolist()):
            seen.setdefault(key, set()).add(t)
            row.append(t)
        return toks


@torch.no_grad()
def greedy_block(model: TriModeModel, ctx: torch.Tensor, n: int, ban_ngram: int = 0):
    """Context cache (LoRA off) and the greedy continuation [B, n] (p then n-1 more);
    with ``ban_ngram`` > 0, greedy that never repeats an n-gram (``NgramBan``)."""
    pick = NgramBan(ctx, ban_ngram).pick if ban_ngram else (lambda lg: lg.argmax(-1))
    logits, ck, cv = model.step(ctx, None, None, 0, pattern="causal")
    toks = [pick(logits[:, -1])]
    k, v = ck, cv
    for _ in range(n - 1):
        lg, nk, nv = model.step(toks[-1][:, None], k, v, k.shape[3], pattern="causal")
        k, v = torch.cat([k, nk], 3), torch.cat([v, nv], 3)
        toks.append(pick(lg[:, -1]))
    return ck, cv, torch.stack(toks, 1)


def context_streams(args: argparse.Namespace, work: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalized corpus stream and a raw-source one (800 corpus files as written).

    Prompts arrive as raw code (comments, docstrings, any layout), not in the
    normalized layout of the corpus, so the distillation stages draw part of
    their contexts from raw source.
    """
    from tokenizers import Tokenizer

    stream = torch.load(work / "tokens.pt")
    files = corpus_files()
    random.Random(args.seed).shuffle(files)
    raw_texts = [p.read_text(encoding="utf-8", errors="replace") for p in files[:800]]
    raw_stream = token_stream(Tokenizer.from_file(str(work / "tokenizer.json")), raw_texts)
    log(args, f"contexts: {len(stream) / 1e6:.1f} M normalized tokens, {len(raw_stream) / 1e6:.1f} M raw tokens "
              f"({args.raw_frac:.0%} of batches)")
    return stream, raw_stream


def sample_contexts(args, stream, raw_stream, batch: int, max_len: int, gen: torch.Generator):
    """A batch of contexts of one random length in [8, max_len), raw source with probability ``--raw-frac``."""
    ctx_len = int(torch.randint(8, max_len, (1,), generator=gen))
    raw = torch.rand((), generator=gen) < args.raw_frac
    return sample_windows(raw_stream if raw else stream, batch, ctx_len, gen)


def stage_lora(args: argparse.Namespace) -> None:
    work = Path(args.workdir)
    torch.manual_seed(args.seed + 1)
    model, _ = load_base(work)
    model.requires_grad_(False)
    loras = attach_lora(model, args.lora_r, args.lora_alpha)
    params = [p for lora in loras for p in lora.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lora_lr, weight_decay=0.0)
    stream, raw_stream = context_streams(args, work)
    gen = torch.Generator().manual_seed(args.seed + 1)
    Bk = model.config.block_size
    pos_w = args.lora_decay ** torch.arange(Bk - 1, dtype=torch.float32)  # weight of draft position 1..31
    budget = args.lora_minutes * 60.0
    t0, step, ema = time.time(), 0, {}
    while time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        lr = args.lora_lr * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        ctx = sample_contexts(args, stream, raw_stream, args.lora_batch, args.seq_len - Bk, gen)
        ctx_len = ctx.shape[1]
        ck, cv, target = greedy_block(model, ctx, Bk)  # target[:, 0] is p
        block = torch.full_like(target, MASK_ID)
        block[:, 0] = target[:, 0]
        # Generation costs far more than a draft forward/backward: reuse each batch.
        for _ in range(args.lora_reuse):
            logits, _, _ = model.step(block, ck, cv, ctx_len, pattern="bidirectional", lora=True)
            ce = F.cross_entropy(logits[:, 1:].reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1),
                                 reduction="none").view(len(ctx), Bk - 1)
            loss = (ce * pos_w).sum() / (pos_w.sum() * len(ctx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            with torch.no_grad():
                ok = (logits[:, 1:].argmax(-1) == target[:, 1:]).long()
                accept = ok.cumprod(1).sum(1).float().mean().item() + 1  # drafts accepted + bonus
            for k, v in (("loss", loss.item()), ("accept", accept)):
                ema[k] = v if k not in ema else 0.9 * ema[k] + 0.1 * v
        if step % (10 * args.lora_reuse) == 0:
            log(args, f"lora step {step} lr {lr:.2e} loss {ema['loss']:.3f} "
                      f"train acceptance {ema['accept']:.2f} elapsed {(time.time() - t0) / 60:.1f} min")
    state = {f"{i}.{k}": v for i, lora in enumerate(loras) for k, v in lora.state_dict().items()}
    save_atomic({"r": args.lora_r, "alpha": args.lora_alpha, "state": state, "steps": step,
                 "ema": ema, "wall_s": time.time() - t0}, work / "lora.pt")
    log(args, f"lora done: {step} steps, final ema {ema}")


# ----------------------------------------------------------------------------
# 6. Export the checkpoint layout
# ----------------------------------------------------------------------------
def stage_export(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    work, out = Path(args.workdir), Path(args.out)
    model, _ = load_base(work)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    assert not any("lora" in k for k in tensors)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "tokenizer.json").write_text((work / "tokenizer.json").read_text())
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>", "pad_token": "<|pad|>", "mask_token": "<|mask|>",
        "additional_special_tokens": SPECIAL_TOKENS[3:],
        "model_max_length": config["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    if (work / "lora.pt").exists():
        lora = torch.load(work / "lora.pt")
        ldir = out / "linear_spec_lora"
        ldir.mkdir(exist_ok=True)
        adapter = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora["r"], "lora_alpha": lora["alpha"],
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "target_modules": ["o_proj"], "base_model_name_or_path": "nemocompile/assets/tiny",
        }
        (ldir / "adapter_config.json").write_text(json.dumps(adapter, indent=2) + "\n")
        peft = {}
        for key, v in lora["state"].items():
            i, name = key.split(".", 1)  # "{i}.lora_A.weight"
            peft[f"base_model.model.encoder.layers.{i}.self_attn.o_proj.{name}"] = v.to(torch.bfloat16).contiguous()
        save_file(peft, str(ldir / "adapter_model.safetensors"), metadata={"format": "pt"})
    log(args, f"exported to {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", default="all", choices=["all", "corpus", "main", "unloop", "distill", "lora", "export"])
    ap.add_argument("--workdir", default="/tmp/tiny/work")
    ap.add_argument("--out", default=str(ASSET_DIR))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=48)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.05)
    ap.add_argument("--warmup-steps", type=int, default=60)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--alpha", type=float, default=1.0, help="weight of the AR loss")
    ap.add_argument("--p-full", type=float, default=0.3, help="fraction of fully masked (t=1) blocks")
    ap.add_argument("--minutes", type=float, default=46.0, help="wall-time budget of the main run")
    ap.add_argument("--resume", action="store_true", help="main: start from the workdir's base.pt")
    ap.add_argument("--ckpt-minutes", type=float, default=3.0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--ul-minutes", type=float, default=10.0, help="wall-time budget of the unloop stage")
    ap.add_argument("--ul-lr", type=float, default=3e-4)
    ap.add_argument("--ul-weight", type=float, default=1.0, help="weight of the unlikelihood loss")
    ap.add_argument("--ul-ngram", type=int, default=4)
    ap.add_argument("--ul-scope", default="all", choices=["all", "continuation"],
                    help="unlikelihood on tokens repeating an n-gram of the context or the continuation (all), "
                         "or of the continuation only")
    ap.add_argument("--ul-batch", type=int, default=16)
    ap.add_argument("--ul-tokens", type=int, default=48, help="greedy continuation length per context")
    ap.add_argument("--dist-minutes", type=float, default=30.0, help="wall-time budget of the distill stage")
    ap.add_argument("--dist-lr", type=float, default=3e-4)
    ap.add_argument("--dist-weight", type=float, default=1.0, help="weight of the self-distillation CE")
    ap.add_argument("--dist-alpha", type=float, default=0.0,
                    help="weight of the AR CE on corpus windows in the distill stage (its diffusion loss always counts)")
    ap.add_argument("--dist-ul-weight", type=float, default=0.0,
                    help="weight of unlikelihood on the same continuations (0 = off)")
    ap.add_argument("--dist-kl-weight", type=float, default=5.0,
                    help="weight of KL(start-of-stage model || model) of AR next-token distributions on the "
                         "same continuations (0 = off)")
    ap.add_argument("--dist-kl-teacher", default="",
                    help="a base.pt whose AR distributions the KL holds instead of the start-of-stage model's")
    ap.add_argument("--dist-self-ar", type=float, default=0.0,
                    help="weight of the AR CE on the same continuations (self-training; 0 = off)")
    ap.add_argument("--dist-ban-ngram", type=int, default=0,
                    help="continuations never repeat an n-gram of their context or themselves (0 = plain greedy)")
    ap.add_argument("--dist-batch", type=int, default=32, help="greedy continuations per step")
    ap.add_argument("--dist-anchor-batch", type=int, default=8,
                    help="corpus windows per step (diffusion loss; AR CE too if --dist-alpha > 0)")
    ap.add_argument("--lora-r", type=int, default=32)
    ap.add_argument("--lora-alpha", type=int, default=64)
    ap.add_argument("--lora-lr", type=float, default=2e-3)
    ap.add_argument("--lora-batch", type=int, default=32)
    ap.add_argument("--lora-decay", type=float, default=0.9, help="per-position weight decay of the draft loss")
    ap.add_argument("--lora-minutes", type=float, default=8.0)
    ap.add_argument("--raw-frac", "--lora-raw-frac", type=float, default=0.5,
                    help="share of distill/LoRA batches with raw-source contexts")
    ap.add_argument("--lora-reuse", type=int, default=3, help="optimizer steps per generated batch")
    args = ap.parse_args()
    if args.dist_ban_ngram < 0 or args.dist_ban_ngram == 1:
        ap.error("--dist-ban-ngram must be 0 (off) or an n-gram length of at least 2")
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    log(args, f"args {vars(args)}")
    stages = ["corpus", "main", "unloop", "distill", "lora", "export"] if args.stage == "all" else [args.stage]
    for stage in stages:
        {"corpus": stage_corpus, "main": stage_main, "unloop": stage_unloop, "distill": stage_distill, "lora": stage_lora, "export": stage_export}[stage](args)


if __name__ == "__main__":
    main()
