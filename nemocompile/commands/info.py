"""`nemocompile info`: what a checkpoint needs before it is exported.

Reads config.json, the safetensors headers (never the weights, so it is instant
on a 16 GB checkpoint), the adapter's config and the tokenizer files.
"""

from __future__ import annotations

import json

BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def add_parser(sub) -> None:
    from .common import add_model_arg

    p = sub.add_parser("info", help="show a checkpoint's config, parameters, memory and KV-cache sizes")
    add_model_arg(p)
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="KV-cache capacity per sequence to size (default: the artifact's, else 512 as export)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences in the cache (default: the artifact's, else 1)")
    p.add_argument("--artifact", default=None, metavar="DIR",
                   help="size the KV cache at this exported artifact's capacity and batch")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def checkpoint_info(directory, max_seq_len: int = 512, batch_size: int = 1) -> dict:
    """Everything ``info`` reports, from the checkpoint's files (no weights are read)."""
    from pathlib import Path

    from nemocompile.model.config import ModelConfig
    from ..errors import CheckpointError
    from nemocompile.model.loader import LORA_DIR, embedded_model_dir, weight_shapes
    from nemocompile.text.tokenizer import Tokenizer

    if max_seq_len < 1 or batch_size < 1:
        raise CheckpointError("--max-seq-len and --batch-size must be at least 1")
    directory = Path(directory) if directory is not None else embedded_model_dir()
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory; pass a Hugging Face style checkpoint directory")
    cfg = ModelConfig.from_file(directory / "config.json")
    stored = weight_shapes(directory)
    params = sum(_numel(shape) for shape, _ in stored.values())
    stored_bytes = sum(_numel(shape) * width for shape, width in stored.values())

    lora = None
    lora_dir = directory / LORA_DIR
    if (lora_dir / "adapter_config.json").is_file():
        acfg = json.loads((lora_dir / "adapter_config.json").read_text())
        shapes = weight_shapes(lora_dir, "adapter_model.safetensors") \
            if (lora_dir / "adapter_model.safetensors").is_file() else {}
        lora = {"r": acfg.get("r"), "lora_alpha": acfg.get("lora_alpha"), "use_rslora": bool(acfg.get("use_rslora")),
                "target_modules": acfg.get("target_modules"),
                "parameters": sum(_numel(s) for s, _ in shapes.values()),
                "stored_bytes": sum(_numel(s) * w for s, w in shapes.values()), "runs_in": "fp32"}

    tok = Tokenizer(directory) if (directory / "tokenizer.json").is_file() else None
    chat = None
    if tok is not None and tok.chat_templates:
        source = "chat_template.jinja" if (directory / "chat_template.jinja").is_file() else "tokenizer_config.json"
        chat = {"source": source, "names": sorted(tok.chat_templates),
                "enable_thinking": any("enable_thinking" in t for t in tok.chat_templates.values())}
    kv_token = {k: 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * b for k, b in BYTES.items()}
    lora_fp32 = 4 * lora["parameters"] if lora else 0
    return {
        "source": str(directory),
        "torch_dtype": cfg.torch_dtype,
        "parameters": params,
        "config_parameters": cfg.num_parameters(),
        "stored_weight_bytes": stored_bytes,
        "weight_bytes": {k: params * b + lora_fp32 for k, b in BYTES.items()},  # the adapter stays fp32
        "kv_bytes_per_token": kv_token,
        "kv_capacity": {"max_seq_len": max_seq_len, "batch_size": batch_size},
        "kv_bytes_per_sequence": {k: v * max_seq_len for k, v in kv_token.items()},
        "kv_bytes_total": {k: v * max_seq_len * batch_size for k, v in kv_token.items()},
        "lora": lora,
        "lora_parameters": lora["parameters"] if lora else 0,
        "chat_template": chat,
        "thinking_tokens": tok.thinking_tokens if tok is not None else {},
        "eos_token_ids": list(cfg.eos_ids),
        "tokenizer_vocab": tok.vocab_size if tok is not None else None,
        "config": cfg.to_dict(),
    }


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def run(args) -> int:
    seq, batch = args.max_seq_len, args.batch_size
    if args.artifact is not None:
        from nemocompile.artifact.manifest import Manifest

        manifest = Manifest.load(args.artifact)
        seq = seq or manifest.cache_capacity
        batch = batch or manifest.batch_size
    info = checkpoint_info(args.model, seq or 512, batch or 1)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cfg = info["config"]
    lora, chat = info["lora"], info["chat_template"]
    w, kt, ks = info["weight_bytes"], info["kv_bytes_per_token"], info["kv_bytes_per_sequence"]
    cap = info["kv_capacity"]
    print(f"checkpoint      {info['source']} (stored as {info['torch_dtype'] or 'unstated dtype'}, "
          f"{_size(info['stored_weight_bytes'])})")
    print(f"parameters      {info['parameters']:,}"
          + (f" + drafter LoRA {lora['parameters']:,} (r={lora['r']}, alpha={lora['lora_alpha']}, runs in fp32)"
             if lora else " (no drafter LoRA: linear-spec drafts with the base weights)"))
    print(f"weights         " + ", ".join(f"{k} {_size(v)}" for k, v in w.items()))
    print(f"kv cache        per token " + ", ".join(f"{k} {_size(v)}" for k, v in kt.items()))
    print(f"                per sequence of {cap['max_seq_len']} tokens " + ", ".join(
        f"{k} {_size(v)}" for k, v in ks.items()) + (f" (x{cap['batch_size']} sequences)"
                                                     if cap["batch_size"] > 1 else ""))
    print(f"layers          {cfg['num_hidden_layers']} x hidden {cfg['hidden_size']}, mlp {cfg['intermediate_size']}")
    print(f"attention       {cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} kv heads x "
          f"{cfg['head_dim']}")
    print(f"vocab           {cfg['vocab_size']} (mask {cfg['mask_token_id']}, eos "
          f"{', '.join(map(str, info['eos_token_ids']))})")
    rope = cfg["rope_parameters"]
    print(f"rope            {rope['rope_type']} theta={rope['rope_theta']:g} factor={rope['factor']:g} "
          f"original_max={rope['original_max_position_embeddings']} "
          f"llama4_beta={rope['llama_4_scaling_beta']:g}")
    print(f"block size      {cfg['block_size']}; max positions {cfg['max_position_embeddings']}")
    print("chat template   " + (f"{chat['source']} ({', '.join(chat['names'])})"
                                + ("; takes enable_thinking" if chat["enable_thinking"] else "") if chat else "none"))
    thinking = info["thinking_tokens"]
    print("thinking tokens " + (", ".join(f"{t}={i}" for t, i in thinking.items()) if thinking else "none"))
    return 0
