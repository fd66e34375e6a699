"""Write a synthetic tri-mode checkpoint in the published layout, at any size.

The files are what a real Nemotron-Labs-Diffusion checkpoint holds (spec
section 1): ``config.json`` with every field the published configs write
(training-only and transformers fields included), ``generation_config.json``,
one BF16 ``model.safetensors`` with exactly 9 x layers + 3 tensors, tokenizer
files with a ChatML ``chat_template.jinja`` that handles ``<think>``, and
(optionally) a PEFT ``linear_spec_lora/`` drafter stored in fp32. Only the
weights are random, so the checkpoint measures size, memory and plumbing,
never quality.

    python examples/synthetic_checkpoint.py --preset 8B --out /tmp/nld-8b        # ~16 GB
    python examples/synthetic_checkpoint.py --preset 14B --layers 2 --out /tmp/c  # a two-layer cut

``model.safetensors`` is written tensor by tensor (the safetensors format is an
8-byte header length, a JSON header, then the raw bytes), because
``safetensors.torch.save_file`` needs every tensor in memory at once: at 8B
that is 16 GB of RAM before the first byte is written.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import torch

# The published configs (spec section 1). Values a size does not override are the 8B's.
BASE_CONFIG = {
    "architectures": ["NemotronLabsDiffusionModel"],
    "auto_map": {"AutoConfig": "configuration_nemotron_labs_diffusion.NemotronLabsDiffusionConfig",
                 "AutoModel": "modeling_nemotron_labs_diffusion.NemotronLabsDiffusionModel"},
    "model_type": "nemotron_labs_diffusion",
    "vocab_size": 131072, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 34,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5,
    "hidden_act": "silu", "tie_word_embeddings": False, "max_position_embeddings": 262144,
    "block_size": 32, "mask_token_id": 100, "bos_token_id": 1, "eos_token_id": 11,
    "dlm_paradigm": "bidirectional",
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0,
                        "original_max_position_embeddings": 16384, "beta_fast": 32.0, "beta_slow": 1.0,
                        "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1},
    # only for training or for transformers
    "ar_loss_weight": 1.0, "dlm_loss_weight": 1.0, "dp_varying_mask_ratio": False,
    "attn_implementation": "sdpa", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
    "sliding_window": None, "initializer_range": 0.02, "use_cache": True,
    "transformers_version": "4.57.1", "torch_dtype": "bfloat16",
}

PRESETS = {
    "3B": {"num_hidden_layers": 26, "hidden_size": 3072, "intermediate_size": 9216},
    "3B-Base": {"num_hidden_layers": 26, "hidden_size": 3072, "intermediate_size": 9216, "eos_token_id": 2,
                "max_position_embeddings": 4096, "rope_parameters": {"factor": 0.25}},
    "8B": {},
    "14B": {"num_hidden_layers": 40, "hidden_size": 5120, "intermediate_size": 16384,
            "rope_parameters": {"rope_theta": 1e9}},
}

# ChatML with the reasoning models' <think> handling (Qwen3-style): enable_thinking=false
# pre-fills an empty think block.
CHAT_TEMPLATE = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}{%- if not loop.first %}{{ raise_exception('the system message must come first') }}{%- endif %}
{%- elif message.role == 'assistant' %}
{%- set content = message.content %}
{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}
{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}
"""


# the chat and reasoning tokens the published tokenizers have as single special tokens
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")


def make_config(preset: str = "8B", **overrides) -> dict:
    """A config.json dict: the 8B's fields, a preset's changes, then ``overrides``
    (``rope_parameters`` entries are merged, not replaced)."""
    if preset not in PRESETS:
        raise SystemExit(f"error: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = json.loads(json.dumps(BASE_CONFIG))
    for changes in (PRESETS[preset], overrides):
        for key, value in changes.items():
            if key == "rope_parameters":
                config["rope_parameters"].update(value)
            else:
                config[key] = value
    return config


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, in the published names (9 x layers + 3)."""
    h, i, v, d = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    shapes = {"encoder.embed_tokens.weight": (v, h)}
    for n in range(config["num_hidden_layers"]):
        p = f"encoder.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
    shapes["encoder.norm.weight"] = (h,)
    shapes["diffusion_head.weight"] = (v, h)
    return shapes


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], make, dtype: str = "BF16") -> int:
    """Write ``make(name, shape)`` tensors one at a time; returns the file's size in bytes."""
    width = {"BF16": 2, "F16": 2, "F32": 4}[dtype]
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = width
        for s in shape:
            size *= s
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in shapes.items():
            t = make(name, shape).contiguous()
            f.write(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())
    return 8 + len(blob) + offset


def write_checkpoint(out: str | Path, config: dict, seed: int = 0, std: float = 0.02, lora_rank: int = 0,
                     lora_alpha: float | None = None, extra_eos: list[int] | None = None,
                     tokenizer_from: str | Path | None = None) -> Path:
    """Write a checkpoint in the published layout to ``out`` (created; must not hold one).

    Random normal(0, ``std``) BF16 weights (norms 1); ``lora_rank`` > 0 adds an fp32
    ``linear_spec_lora/`` adapter on o_proj; ``extra_eos`` ids go into
    generation_config.json after the config's. Tokenizer files come from
    ``tokenizer_from`` (default: the embedded tiny model's)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)

    def random_weight(name: str, shape) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        rows = []  # a row block at a time keeps the fp32 scratch small at checkpoint sizes
        for start in range(0, shape[0], 4096):
            part = (min(4096, shape[0] - start), *shape[1:])
            rows.append(torch.randn(part, generator=gen).mul_(std).to(torch.bfloat16))
        return torch.cat(rows)

    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    eos = config["eos_token_id"] if isinstance(config["eos_token_id"], list) else [config["eos_token_id"]]
    (out / "generation_config.json").write_text(json.dumps({
        "_from_model_config": True, "bos_token_id": config.get("bos_token_id", 1),
        "eos_token_id": eos + list(extra_eos or []), "transformers_version": config.get("transformers_version"),
    }, indent=2) + "\n")
    write_safetensors(out / "model.safetensors", tensor_shapes(config), random_weight)

    source = Path(tokenizer_from) if tokenizer_from else Path(__file__).resolve().parents[1] / "nemocompile/assets/tiny"
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(source / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_TOKENS
                            if tok.token_to_id(t) is None])
    if tok.get_vocab_size(with_added_tokens=True) > config["vocab_size"]:
        raise SystemExit(f"error: the tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens, more "
                         f"than vocab_size {config['vocab_size']}")
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = json.loads((source / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)  # the published layout keeps it in chat_template.jinja
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)

    if lora_rank:
        d = out / "linear_spec_lora"
        d.mkdir(exist_ok=True)
        h, q = config["hidden_size"], config["num_attention_heads"] * config["head_dim"]
        shapes = {}
        for n in range(config["num_hidden_layers"]):
            base = f"base_model.model.encoder.layers.{n}.self_attn.o_proj"
            shapes[f"{base}.lora_A.weight"] = (lora_rank, q)
            shapes[f"{base}.lora_B.weight"] = (h, lora_rank)
        write_safetensors(d / "adapter_model.safetensors", shapes,
                          lambda name, shape: torch.randn(shape, generator=gen) * std, dtype="F32")
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora_rank,
            "lora_alpha": lora_alpha if lora_alpha is not None else 4 * lora_rank, "lora_dropout": 0.0,
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "target_modules": ["o_proj"],
            "base_model_name_or_path": str(out),
        }, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="8B", choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="directory to write (created)")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (a cut of the model)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override a config field, e.g. --set hidden_size=256 --set eos_token_id=[11,2]")
    p.add_argument("--lora-rank", type=int, default=0, help="add an fp32 drafter adapter of this rank (published: 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--std", type=float, default=0.02, help="weights ~ normal(0, std)")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set takes KEY=JSON, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    if args.layers is not None:
        overrides["num_hidden_layers"] = args.layers
    out = Path(args.out)
    if (out / "config.json").exists():
        p.error(f"{out} already holds a checkpoint; pass an empty or new directory")
    config = make_config(args.preset, **overrides)
    write_checkpoint(out, config, seed=args.seed, std=args.std, lora_rank=args.lora_rank,
                     lora_alpha=4 * args.lora_rank if args.lora_rank else None)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out}: {size / 1e9:.2f} GB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
