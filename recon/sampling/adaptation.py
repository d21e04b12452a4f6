r"""The prior adapted to the scan it reconstructs, self-supervised by the measurement itself.

Steerable Conditional Diffusion (Barbano et al. 2023) and D3IP (Chung & Ye, ECCV 2024): a
copy of the prior whose GroupNorm scale and shift ``theta`` (a few hundred numbers; the rest
frozen) are fitted during sampling to

    L(theta) = ||y - A x0_hat(x_t; theta)||^2 / (m sigma_y^2),

``m`` the measured entries: before each of the sampler's evaluations at ``t <= t_max``,
``iterations`` Adam steps of learning rate ``lr`` on ``L`` at the current ``x_t`` (``CondDenoiser``
takes the gradient through the network). One ``Adapter`` serves every slice of a slab (D3IP's one
adapter per volume: a slice starts from where the last one left the weights, so the cost of
adapting is paid once), and starts from the prior itself (``theta`` = the trained values).
``state()`` gives the adapted values and the seconds spent, for the run's artefacts.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["Adapter"]


class Adapter(nn.Module):
    """A copy of ``network`` whose normalisation layers' affine parameters are trainable."""

    def __init__(self, network: nn.Module, lr: float = 1e-3, iterations: int = 1,
                 t_max: float = 1.0):
        super().__init__()
        if not (lr > 0 and iterations >= 1 and 0 < t_max <= 1):
            raise ValueError(f"need lr > 0, iterations >= 1 and 0 < t_max <= 1; got {lr}, "
                             f"{iterations}, {t_max}")
        # contiguous weights: torch 2.13's CPU backward through the channels_last prior segfaults
        self.network = copy.deepcopy(network).to(memory_format=torch.contiguous_format)
        self.network.requires_grad_(False)
        self.names = [f"{name}.{p}" for name, m in self.network.named_modules()
                      if isinstance(m, nn.GroupNorm | nn.LayerNorm | nn.BatchNorm2d) and m.affine
                      for p in ("weight", "bias")]
        self.adapted = [self.network.get_parameter(n) for n in self.names]
        if not self.adapted:
            raise ValueError("the prior has no normalisation layer with a scale and shift to adapt")
        for p in self.adapted:
            p.requires_grad_(True)
        self.optimizer = torch.optim.Adam(self.adapted, lr=lr)
        self.iterations, self.t_max = iterations, float(t_max)
        self.seconds, self.updates, self.losses = 0.0, 0, []

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.network(x_t, t)

    def fit(self, loss: Callable[[], Tensor], t: float) -> None:
        """``iterations`` Adam steps on ``loss()`` (a scalar through this network) when
        ``t <= t_max``."""
        if t > self.t_max:
            return
        start = time.perf_counter()
        with torch.enable_grad():
            for _ in range(self.iterations):
                self.optimizer.zero_grad(set_to_none=True)
                value = loss()
                value.backward()
                self.optimizer.step()
                self.losses.append(float(value.detach()))
        self.updates += self.iterations
        self.seconds += time.perf_counter() - start

    def state(self) -> dict[str, Tensor]:
        """The adapted parameters by name (detached copies)."""
        return {n: p.detach().clone() for n, p in zip(self.names, self.adapted, strict=True)}
