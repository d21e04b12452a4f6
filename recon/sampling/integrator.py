r"""Integrators: one step of the reverse dynamics from ``t`` to ``t_next < t``.

Each integrator calls ``eps_fn(x, t) -> eps_hat`` (``t`` a Python float) ``nfe`` times per step.
With the score ``grad log p_t = -eps/sigma`` the dynamics are

- probability-flow ODE:  ``dx/dt = f x - 1/2 g^2 grad log p_t = f x + g^2 eps / (2 sigma)``,
- reverse SDE:           ``dx = [f x + g^2 eps / sigma] dt + g dW``  (dt < 0).

Coefficients are evaluated in float64 on the host, so a step adds no device synchronisation.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from recon.sampling.diffusion import DiffusionModel, tweedie

EpsFn = Callable[[Tensor, float], Tensor]


def scales(diffusion: DiffusionModel, t: float) -> tuple[float, float]:
    """``(s(t), sigma(t))`` as Python floats (evaluated in float64)."""
    tt = torch.tensor(t, dtype=torch.float64)
    return float(diffusion.s(tt)), float(diffusion.sigma(tt))


def _coef(diffusion: DiffusionModel, t: float) -> tuple[float, float, float, float]:
    """``(s, sigma, f, g)`` at time t as Python floats (evaluated in float64)."""
    tt = torch.tensor(t, dtype=torch.float64)
    return tuple(float(fn(tt)) for fn in (diffusion.s, diffusion.sigma, diffusion.f, diffusion.g))


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


class Integrator(ABC):
    """One step ``x_t -> x_{t_next}``; ``nfe`` network evaluations per step."""

    nfe: int = 1
    stochastic: bool = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    @abstractmethod
    def step(self, diffusion: DiffusionModel, eps_fn: EpsFn, x: Tensor, t: float, t_next: float,
             generator: torch.Generator | None = None) -> Tensor:
        """Advance ``x`` from ``t`` to ``t_next``."""


def ode_velocity(diffusion: DiffusionModel, eps_fn: EpsFn, x: Tensor, t: float) -> Tensor:
    """Probability-flow ODE velocity ``dx/dt = f x + g^2 eps / (2 sigma)``."""
    _, sigma, f, g = _coef(diffusion, t)
    return f * x + (0.5 * g * g / sigma) * eps_fn(x, t)


class EulerIntegrator(Integrator):
    """Euler on the probability-flow ODE: ``x' = x + h v(x, t)``, ``h = t' - t`` (order 1)."""

    nfe = 1

    def step(self, diffusion, eps_fn, x, t, t_next, generator=None):
        return x + (t_next - t) * ode_velocity(diffusion, eps_fn, x, t)


class HeunIntegrator(Integrator):
    """Heun (trapezoid) on the probability-flow ODE (order 2, 2 NFE).

    ``x_e = x + h v(x, t)``, ``x' = x + h/2 (v(x, t) + v(x_e, t'))``. Karras et al. fall back to
    Euler on a last step that ends at sigma = 0; our grids end at ``t_min > 0`` where the
    velocity is finite, so every step is a full Heun step.
    """

    nfe = 2

    def step(self, diffusion, eps_fn, x, t, t_next, generator=None):
        h = t_next - t
        v = ode_velocity(diffusion, eps_fn, x, t)
        v_next = ode_velocity(diffusion, eps_fn, x + h * v, t_next)
        return x + 0.5 * h * (v + v_next)


class DDIMIntegrator(Integrator):
    r"""DDIM (Song et al. 2021), generalised to any (s, sigma).

    ``x0 = (x - sigma eps)/s``; ``x' = s' x0 + sqrt(sigma'^2 - c^2) eps + c z`` with
    ``c = eta sigma' sqrt(1 - (s sigma' / (s' sigma))^2)``. ``eta = 0`` is deterministic (the
    exponential integrator of order 1 in lambda); ``eta = 1`` is ancestral sampling.
    """

    def __init__(self, eta: float = 0.0):
        if not (0.0 <= eta <= 1.0):
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        self.eta = float(eta)
        self.stochastic = eta > 0

    def __repr__(self) -> str:
        return f"DDIMIntegrator(eta={self.eta})"

    def step(self, diffusion, eps_fn, x, t, t_next, generator=None):
        s, sigma = scales(diffusion, t)
        s_n, sigma_n = scales(diffusion, t_next)
        eps = eps_fn(x, t)
        x0 = tweedie(x, eps, s, sigma)
        c = self.eta * sigma_n * math.sqrt(max(0.0, 1.0 - (s * sigma_n / (s_n * sigma)) ** 2))
        out = s_n * x0 + math.sqrt(max(0.0, sigma_n**2 - c**2)) * eps
        if c > 0:
            out = out + c * _randn_like(x, generator)
        return out


class DiffPIRIntegrator(Integrator):
    r"""The re-noising step of DiffPIR (Zhu et al. 2023) and DDS (Chung et al. 2024).

    ``x0 = (x - sigma eps)/s``; ``x' = s' x0 + sigma' (sqrt(1 - zeta) eps + sqrt(zeta) z)``.
    ``zeta = 1`` re-noises fully: ``x'`` keeps nothing of ``x`` but ``x0`` (with a guided eps,
    the data-consistent estimate), so a correction made at one step is not carried forward as
    noise; ``zeta = 0`` is DDIM with ``eta = 0``. DDIM with ``eta = 1`` redraws only the
    fraction ``1 - (s sigma' / (s' sigma))^2`` of the noise variance (a quarter to three
    quarters per step on a 30-step cosine grid).

    Not a sampler of ``p_t`` for ``zeta > 0``: with the exact score the mean of ``x0`` is exact
    (``E[x0 | x_t]`` averages to ``E[x0]``) but the spread shrinks, since
    ``Cov[x'] = s'^2 Cov[E[x0 | x_t]] + sigma'^2 I`` omits ``E[Cov[x0 | x_t]]``; the chain
    ends between a posterior sample and the posterior mean, which is what PSNR rewards.
    """

    stochastic = True

    def __init__(self, zeta: float = 1.0):
        if not (0.0 <= zeta <= 1.0):
            raise ValueError(f"zeta must lie in [0, 1], got {zeta}")
        self.zeta = float(zeta)
        self.stochastic = zeta > 0

    def __repr__(self) -> str:
        return f"DiffPIRIntegrator(zeta={self.zeta})"

    def step(self, diffusion, eps_fn, x, t, t_next, generator=None):
        s, sigma = scales(diffusion, t)
        s_n, sigma_n = scales(diffusion, t_next)
        eps = eps_fn(x, t)
        out = s_n * tweedie(x, eps, s, sigma)
        if self.zeta < 1.0:
            out = out + sigma_n * math.sqrt(1.0 - self.zeta) * eps
        if self.zeta > 0.0:
            out = out + sigma_n * math.sqrt(self.zeta) * _randn_like(x, generator)
        return out


class DPMpp2sIntegrator(Integrator):
    r"""DPM-Solver++(2S) (Lu et al. 2022): data prediction, one midpoint in ``lambda = log(s/sigma)``.

    With ``h = lambda' - lambda``, midpoint ``lambda_m = lambda + h/2``:
    ``u = (sigma_m/sigma) x - s_m (e^{-h/2} - 1) x0(x, t)``,
    ``x' = (sigma'/sigma) x - s' (e^{-h} - 1) x0(u, t_m)`` (order 2, 2 NFE).
    """

    nfe = 2

    def step(self, diffusion, eps_fn, x, t, t_next, generator=None):
        tt = torch.tensor([t, t_next], dtype=torch.float64)
        lam, lam_n = diffusion.log_snr(tt).tolist()
        h = lam_n - lam
        t_mid = float(diffusion.t_of_lambda(torch.tensor(lam + 0.5 * h, dtype=torch.float64)))
        s, sigma = scales(diffusion, t)
        s_m, sigma_m = scales(diffusion, t_mid)
        s_n, sigma_n = scales(diffusion, t_next)
        x0 = tweedie(x, eps_fn(x, t), s, sigma)
        u = (sigma_m / sigma) * x - s_m * math.expm1(-0.5 * h) * x0
        x0_mid = tweedie(u, eps_fn(u, t_mid), s_m, sigma_m)
        return (sigma_n / sigma) * x - s_n * math.expm1(-h) * x0_mid


class EulerMaruyamaIntegrator(Integrator):
    """Euler–Maruyama on the reverse SDE: ``x' = x + h (f x + g^2 eps/sigma) + g sqrt(-h) z``."""

    nfe = 1
    stochastic = True

    def step(self, diffusion, eps_fn, x, t, t_next, generator=None):
        h = t_next - t
        _, sigma, f, g = _coef(diffusion, t)
        drift = f * x + (g * g / sigma) * eps_fn(x, t)
        return x + h * drift + g * math.sqrt(-h) * _randn_like(x, generator)

