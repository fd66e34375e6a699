"""Write a random tri-mode checkpoint of a chosen shape (for speed and memory measurements, not quality).

    python examples/synthetic_checkpoint.py OUT_DIR                       # ~200M: hidden 1024, 12 layers, vocab 32000
    python examples/synthetic_checkpoint.py OUT_DIR --hidden 4096 --layers 36 --intermediate 12288 --vocab 131072 \\
        --heads 32 --kv-heads 8
"""

from __future__ import annotations

import argparse

import torch

from nemocompile.config import ModelConfig, RopeConfig
from nemocompile.loader import save
from nemocompile.model import TriModeModel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    cfg = ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      head_dim=a.hidden // a.heads, max_position_embeddings=4096, block_size=16, mask_token_id=3,
                      eos_token_id=2, rope=RopeConfig(original_max_position_embeddings=4096, factor=1.0))
    torch.manual_seed(a.seed)
    model = TriModeModel(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0.0, 0.02)
    save(model.eval(), a.out)
    print(f"{a.out}: {sum(t.numel() for t in model.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
