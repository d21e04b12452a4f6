"""What every reconstructor returns for a batch of measurements: a ``Posterior``.

The samplers (``recon.sampling.cond_denoiser.CondDenoiser``) summarise their chains in it; the
classical solvers (``recon.classical.baselines``) return their one deterministic answer in it
(std 0, no network evaluation), so either runs wherever the other does. It sits here, below
the samplers, so that both reach it downward.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Posterior:
    """Summary of ``n_samples`` posterior samples for each of ``B`` measurements.

    ``mean`` and ``std`` have shape ``(B, *x_shape)``; ``std`` is the pixel-wise standard
    deviation over samples (the uncertainty map; unbiased, zeros when ``n_samples == 1``);
    ``samples`` has shape ``(n_samples, B, *x_shape)`` (``None`` if not kept). ``nfe`` counts
    network forward evaluations per chain, ``vjp`` the vector-Jacobian products through the
    network per chain, ``seconds`` the wall-clock time of the whole batch.
    """

    mean: Tensor
    std: Tensor
    samples: Tensor | None
    nfe: int
    vjp: int
    seconds: float
