"""The eager reference backend: ``TriModeModel.step`` (the function the graphs were
exported from) run on the same buffers the compiled backends use.

Weights come from the checkpoint the manifest's ``source`` names, an explicit
checkpoint path, or a loaded model. A forward of b rows runs those rows only;
each row reads its own cache slots up to its own ``cache_len`` (eager PyTorch
has no static shapes to pay for): rows of one length run as one batch, rows of
different lengths as one forward per length, exactly as the eager decoders read
their cache, so this backend is also their per-step twin.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nemocompile.errors import BackendUnavailableError
from nemocompile.model.modeling import greedy_candidates, token_logprobs

from . import GraphKey, StepIO, host_or_torch_array


class TorchBackend:
    name = "torch"

    def __init__(self, artifact_dir, manifest, device: str | None = None, model=None, threads: int | None = None):
        import torch

        from nemocompile.model.loader import load
        from nemocompile.model import TriModeModel

        self.torch = torch
        if threads:
            torch.set_num_threads(int(threads))
        if isinstance(model, TriModeModel):
            self.model = model
        else:
            path = model if model is not None else manifest.source
            if path is None:
                raise BackendUnavailableError("the manifest names no source checkpoint: pass the checkpoint "
                                              "(model=PATH, or --model DIR) for the torch backend")
            if not Path(path).is_dir():
                raise BackendUnavailableError(f"{path}: the artifact's source checkpoint is not here; pass the "
                                              "checkpoint (model=PATH, or --model DIR) for the torch backend")
            dtype = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}[manifest.dtype]
            self.model = load(path, dtype=dtype, device=device or "cpu")
        if self.model.config.hash() != manifest.config_hash:
            raise BackendUnavailableError("the torch backend's checkpoint does not match the artifact's model "
                                          "config; pass the checkpoint the artifact was exported from")
        if manifest.has_lora and not self.model.has_lora:
            raise BackendUnavailableError("the artifact's draft graph has the drafter LoRA but this checkpoint has "
                                          "no linear_spec_lora/; pass the checkpoint the artifact was exported from")
        self.device = str(self.model.device) if device is None else device
        self.steps: dict[GraphKey, tuple] = {}

    def allocate(self, shape, dtype: str):
        return host_or_torch_array(shape, dtype, self.device)

    def open(self, graph, io: StepIO, cache, slots) -> None:
        from nemocompile.model.layout import Layout

        self.steps[(graph.step, graph.block_length)] = (Layout.from_dict(graph.layout), io, cache)

    def run(self, key: GraphKey, b: int, n: int) -> None:
        t = self.torch
        layout, io, cache = self.steps[key]

        def host(a):
            return None if a is None else t.from_numpy(a) if isinstance(a, np.ndarray) else a

        ck, cv = host(cache.k), host(cache.v)  # [layers, N, kv_heads, C, head_dim]
        lengths = io.cache_len[:b]
        for length in np.unique(lengths):  # rows of one length share a forward: none reads past its own
            idx = np.flatnonzero(lengths == length)
            rows = t.from_numpy(io.rows[idx]).to(ck.device)
            ids = t.from_numpy(io.input_ids[idx]).to(self.device)
            row_start = t.from_numpy(io.row_start[idx]).to(self.device)
            with t.inference_mode():
                used_k = ck[:, :, :, :int(length)].index_select(1, rows)
                used_v = cv[:, :, :, :int(length)].index_select(1, rows)
                out, k, v = self.model.step(ids, used_k, used_v, int(length), row_start, layout=layout)
                at = t.from_numpy(idx).to(out.device)
                logits = out if io.logits is None else out[:, : io.logits.shape[1]]  # fused steps: the spine's
                outputs = [("logits", logits), *zip(("candidate", "confidence"), greedy_candidates(out))]
                if io.top_logprobs is not None:  # the spine's positions (a fused step's branches only draft)
                    scored = out[:, :io.top_logprobs.shape[1]]
                    outputs += zip(("top_logprobs", "top_ids", "next_logprob"), token_logprobs(scored, ids))
                for name, value in outputs:
                    buf = host(getattr(io, name))
                    if buf is not None:
                        buf.index_copy_(0, at.to(buf.device), value.to(buf.dtype).to(buf.device))
                if io.present_k is not None:
                    for buf, value in ((host(io.present_k), k), (host(io.present_v), v)):
                        buf.index_copy_(0, at.to(buf.device), value.transpose(0, 1).to(buf.device))

    def close(self) -> None:
        self.steps.clear()
