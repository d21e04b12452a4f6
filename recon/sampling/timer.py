"""Timers: decreasing grids ``t_max = t_0 > t_1 > ... > t_n = t_min`` for ``n`` steps."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from recon.sampling.diffusion import DiffusionModel


class Timer(ABC):
    """A grid of ``steps + 1`` decreasing times from ``t_max`` down to ``t_min``.

    ``t_max=None`` takes the diffusion model's own ``t_max``.
    """

    def __init__(self, steps: int, t_min: float = 1e-3, t_max: float | None = None):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if not (t_min > 0 and math.isfinite(t_min)):
            raise ValueError(f"t_min must be a positive finite time, got {t_min}")
        if t_max is not None and not (t_min < t_max and math.isfinite(t_max)):
            raise ValueError(f"t_min={t_min} must be smaller than t_max={t_max}, a finite time")
        self.steps, self.t_min, self.t_max = steps, float(t_min), t_max

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, t_min={self.t_min}, t_max={self.t_max})"

    def times(self, diffusion: DiffusionModel) -> Tensor:
        """The grid as a float64 tensor of shape ``(steps + 1,)``."""
        t_max = diffusion.t_max if self.t_max is None else float(self.t_max)
        diffusion.check_time(self.t_min, t_max)
        u = torch.linspace(0.0, 1.0, self.steps + 1, dtype=torch.float64)
        t = self._warp(u, self.t_min, t_max, diffusion)
        t[0], t[-1] = t_max, self.t_min  # exact end points despite round-off
        return t

    @abstractmethod
    def _warp(self, u: Tensor, t_min: float, t_max: float, diffusion: DiffusionModel) -> Tensor:
        """Map ``u`` in [0, 1] (0 -> t_max, 1 -> t_min) to times."""


class LinearTimer(Timer):
    """Uniform in t: ``t_i = t_max + (i/n) (t_min - t_max)``."""

    def _warp(self, u, t_min, t_max, diffusion):
        return t_max + u * (t_min - t_max)


class CosineTimer(Timer):
    """Denser near t = 0: ``t_i = t_min + (t_max - t_min) (1 - cos(pi/2 (1 - i/n)))``."""

    def _warp(self, u, t_min, t_max, diffusion):
        return t_min + (t_max - t_min) * (1.0 - torch.cos(0.5 * math.pi * (1.0 - u)))


class KarrasTimer(Timer):
    r"""Karras et al. (2022) rho-grid in the noise level ``nu = sigma/s = exp(-lambda)``.

    ``nu_i = (nu_max^{1/rho} + (i/n)(nu_min^{1/rho} - nu_max^{1/rho}))^rho``, mapped back to t
    with the model's inverse log-SNR.
    """

    def __init__(self, steps: int, t_min: float = 1e-3, t_max: float | None = None,
                 rho: float = 7.0):
        super().__init__(steps, t_min, t_max)
        if not (rho > 0 and math.isfinite(rho)):
            raise ValueError(f"rho must be a positive finite number, got {rho}")
        self.rho = float(rho)

    def _warp(self, u, t_min, t_max, diffusion):
        ends = torch.tensor([t_max, t_min], dtype=torch.float64)
        nu_max, nu_min = torch.exp(-diffusion.log_snr(ends)) ** (1.0 / self.rho)
        nu = (nu_max + u * (nu_min - nu_max)) ** self.rho
        return diffusion.t_of_lambda(-torch.log(nu))

