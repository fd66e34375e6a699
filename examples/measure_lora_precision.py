"""Which way of running the fp32 drafter adapter on bf16 weights is closest to exact?

Three ways to run a PEFT adapter on a bf16 checkpoint's draft forwards:

- ``fp32 delta``: PEFT's default and nemocompile's: adapter in fp32, delta computed in
  fp32 and added to the bf16 o_proj output in fp32, the sum cast to bf16;
- ``merged then cast``: ``W + scale * B @ A`` computed in fp32, cast to bf16, used as
  the draft forwards' o_proj (PEFT's ``merge_and_unload`` on a bf16 model);
- ``bf16 delta``: the adapter cast to bf16 and its delta computed in bf16.

Each is compared with a float64 run of the same bf16 base weights and fp32 adapter
(draft logits on held-out prompts followed by a block of masks), and the
acceptance length each gives in greedy linear self-speculation is reported.

    python examples/measure_lora_precision.py --threads 1          # the embedded tiny model
    python examples/measure_lora_precision.py --model DIR --limit 4
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import nemocompile


class MergedDraft(nn.Module):
    """Stands in for a layer's LoRA: the draft o_proj is the merged weight rounded to the model's dtype."""

    def __init__(self, o_proj: nn.Linear, lora) -> None:
        super().__init__()
        merged = o_proj.weight.double() + lora.scale * (lora.lora_B.weight.double() @ lora.lora_A.weight.double())
        self.weight = nn.Parameter(merged.to(o_proj.weight.dtype), requires_grad=False)

    def add_to(self, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)  # replaces the base output


def variants(model):
    merged = copy.deepcopy(model)
    for layer in merged.encoder.layers:
        layer.self_attn.o_lora = MergedDraft(layer.self_attn.o_proj, layer.self_attn.o_lora)
    low = copy.deepcopy(model)
    for layer in low.encoder.layers:
        for lin in (layer.self_attn.o_lora.lora_A, layer.self_attn.o_lora.lora_B):
            lin.weight.data = lin.weight.data.to(model.dtype)
    ref = copy.deepcopy(model).double()
    for layer in ref.encoder.layers:
        layer.self_attn.o_lora.double()
    return {"fp32 delta": model, "merged then cast": merged, "bf16 delta": low}, ref


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint with linear_spec_lora/ (default: the embedded tiny model)")
    p.add_argument("--prompts", default=None, help="one prompt per line (default: the held-out prompts)")
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--block-length", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = nemocompile.load(args.model, dtype="bf16")
    if not model.has_lora:
        print("error: the checkpoint has no linear_spec_lora/ adapter", file=sys.stderr)
        return 2
    path = Path(args.prompts) if args.prompts else nemocompile.embedded_model_dir().parent / "heldout_prompts.txt"
    prompts = [line for line in path.read_text().splitlines() if line.strip()][: args.limit]
    L = args.block_length or model.config.block_size
    runs, ref = variants(model)
    print(f"{Path(model.source).name}: bf16 weights, fp32 adapter; {len(prompts)} prompts, block {L}")
    print(f"{'variant':18} {'mean |dlogit|':>14} {'max |dlogit|':>13} {'top-1 vs f64':>13} {'acceptance':>11}")
    for name, m in runs.items():
        errs, maxes, agree, total, acc = [], [], 0, 0, []
        for text in prompts:
            ids = model.tokenizer.encode(text)
            block = torch.tensor([ids + [ids[-1]] + [model.config.mask_token_id] * (L - 1)])
            with torch.no_grad():
                got = m(block, pattern="bidirectional", lora=True)[0, len(ids):].double()
                want = ref(block, pattern="bidirectional", lora=True)[0, len(ids):]
            d = (got - want).abs()
            errs.append(float(d.mean()))
            maxes.append(float(d.max()))
            agree += int((got.argmax(-1) == want.argmax(-1)).sum())
            total += got.shape[0]
            r = nemocompile.generate(m, text, mode="linear-spec", max_new_tokens=args.max_new_tokens, block_length=L)
            acc.append(r.stats.acceptance_length)
        print(f"{name:18} {sum(errs) / len(errs):14.3e} {max(maxes):13.3e} {agree / total:13.3f} "
              f"{sum(acc) / len(acc):11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
