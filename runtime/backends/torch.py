"""The eager reference backend: ``TriModeModel.step`` (the function the graphs were
exported from) run on the same buffers the compiled backends use.

Weights come from the checkpoint the manifest's ``source`` names, an explicit
checkpoint path, or a loaded model. The cache is read up to ``cache_len`` only
(eager PyTorch has no reason to pay for static shapes), exactly as the eager
decoders do, so this backend is also their per-step twin.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nemocompile.errors import BackendUnavailableError
from nemocompile.model.modeling import greedy_candidates

from . import GraphKey, StepIO, host_or_torch_array


class TorchBackend:
    name = "torch"

    def __init__(self, artifact_dir, manifest, device: str | None = None, model=None, threads: int | None = None):
        import torch

        from nemocompile.loader import load
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

    def open(self, graph, io: StepIO, cache) -> None:
        t = self.torch
        from nemocompile.model.layout import Layout

        def view(a):
            return None if a is None else t.from_numpy(a) if isinstance(a, np.ndarray) else a

        self.steps[(graph.step, graph.block_length)] = (
            Layout.from_dict(graph.layout), t.from_numpy(io.input_ids), t.from_numpy(cache.row_start),
            t.from_numpy(cache.cache_len),
            view(cache.k), view(cache.v), cache, view(io.logits), view(io.present_k), view(io.present_v),
            self.device == "cpu", view(io.candidate), view(io.confidence))

    def run(self, key: GraphKey) -> None:
        layout, ids, row_start, lengths, ck, cv, cache, logits, pk, pv, on_host, cand, conf = self.steps[key]
        n = int(lengths.max())  # the longest row: no slot past it is read
        if not on_host:
            ids, row_start, lengths = ids.to(self.device), row_start.to(self.device), lengths.to(self.device)
        with self.torch.inference_mode():
            out, k, v = self.model.step(ids, ck[:, :, :, :n], cv[:, :, :, :n], lengths, row_start, layout=layout)
            if logits is not None:
                logits.copy_(out)
            c, p = greedy_candidates(out)  # the graphs' argmax and its probability
            cand.copy_(c)
            conf.copy_(p)
            if pk is not None:
                pk.copy_(k)
                pv.copy_(v)

    def close(self) -> None:
        self.steps.clear()
