"""Token selection on host logits, in numpy: greedy, seeded sampling, diffusion candidates.

Greedy choices are the eager decoders' (argmax; the first index wins a tie).
Sampling draws from numpy's PCG64 seeded with ``seed``: reproducible run to run
and across backends, but not the same stream as the eager decoders' torch
generator.
"""

from __future__ import annotations

import numpy as np

from nemocompile.sampling import SamplingParams, distribution, draw


class Sampler:
    """Greedy at temperature 0, else seeded sampling. Logits are float32 rows ``[..., V]``.
    ``params``: the request's controls (nemocompile.sampling); None: temperature alone."""

    def __init__(self, temperature: float, seed, params: SamplingParams | None = None):
        self.params = params if params is not None else SamplingParams(float(temperature))
        self.temperature = float(temperature)
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        """The graph's argmax is the choice: temperature 0 and nothing that moves the argmax."""
        return self.temperature <= 0 and not self.params.shapes_logits

    def pick(self, p: np.ndarray) -> int:
        """A draw from the distribution ``p`` [V] (one-hot when greedy)."""
        return int(p.argmax()) if self.temperature <= 0 else draw(p, self.rng.random())

    def uniform(self) -> float:
        return float(self.rng.random())

    def sample(self, logits: np.ndarray) -> np.ndarray:
        """A token per row ``[...]``: argmax, or a draw from softmax(logits / T)."""
        if self.greedy:
            return logits.argmax(-1)
        z = logits / self.temperature
        z -= z.max(-1, keepdims=True)
        np.exp(z, out=z)
        cdf = np.cumsum(z, axis=-1)
        u = self.rng.random(cdf.shape[:-1]) * cdf[..., -1]
        # inverse CDF: the first index whose cumulative mass exceeds u
        token = (cdf <= u[..., None]).sum(-1)
        return np.minimum(token, logits.shape[-1] - 1)

    def candidates(self, logits: np.ndarray, with_confidence: bool = True,
                   scratch: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Diffusion candidates ``[n]`` for logits ``[n, V]`` (argmax, Gumbel-perturbed when
        sampling) and their softmax probability under the unperturbed logits (spec 3.2).
        ``scratch=True``: ``logits`` is a private copy this may overwrite."""
        if not self.params.plain:  # controls: Gumbel-max over the request's distribution
            with np.errstate(divide="ignore"):
                shaped = np.log(np.stack([distribution(v, self.params) for v in logits]))
            gumbel = 0.0
            if self.temperature > 0:
                u = np.maximum(self.rng.random(shaped.shape, dtype=np.float32), 1e-20)
                gumbel = -np.log(np.maximum(-np.log(u), 1e-20))
            cand = (shaped + gumbel).argmax(-1)
        elif self.greedy:
            cand = logits.argmax(-1)
        else:
            u = self.rng.random(logits.shape, dtype=np.float32)
            np.maximum(u, 1e-20, out=u)
            gumbel = -np.log(np.maximum(-np.log(u), 1e-20))
            cand = (logits / self.temperature + gumbel).argmax(-1)
        if not with_confidence:
            return cand, None
        z = logits if scratch else logits.copy()
        top = z.max(-1, keepdims=True)
        np.subtract(z, top, out=z)
        np.exp(z, out=z)  # z = exp(logits - max)
        total = z.sum(-1)
        return cand, np.take_along_axis(z, cand[:, None], -1)[:, 0] / total
