"""`nemocompile info`: a checkpoint's configuration, size and adapter."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    from .common import add_model_arg

    p = sub.add_parser("info", help="show a checkpoint's config, parameter count and sizes")
    add_model_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..loader import load

    model = load(args.model)
    cfg = model.config
    params = sum(p.numel() for n, p in model.named_parameters() if ".o_lora." not in n)
    lora = sum(p.numel() for n, p in model.named_parameters() if ".o_lora." in n)
    info = {
        "source": model.source,
        "parameters": params,
        "lora_parameters": lora,
        "bytes_bf16": params * 2,
        "kv_bytes_per_token_bf16": 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2,
        "tokenizer_vocab": model.tokenizer.vocab_size if model.tokenizer else None,
        "config": cfg.to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"checkpoint      {info['source']}")
    print(f"parameters      {params:,} ({params * 2 / 2**20:.1f} MiB in bf16)"
          + (f" + drafter LoRA {lora:,}" if lora else " (no drafter LoRA)"))
    print(f"layers          {cfg.num_hidden_layers} x hidden {cfg.hidden_size}, mlp {cfg.intermediate_size}")
    print(f"attention       {cfg.num_attention_heads} heads / {cfg.num_key_value_heads} kv heads x {cfg.head_dim}")
    print(f"vocab           {cfg.vocab_size} (mask {cfg.mask_token_id}, eos {cfg.eos_token_id})")
    print(f"rope            {cfg.rope.rope_type} theta={cfg.rope.rope_theta:g} factor={cfg.rope.factor:g} "
          f"original_max={cfg.rope.original_max_position_embeddings}")
    print(f"block size      {cfg.block_size}; max positions {cfg.max_position_embeddings}")
    print(f"kv cache        {info['kv_bytes_per_token_bf16']:,} bytes/token in bf16")
    return 0
