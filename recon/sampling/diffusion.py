r"""Diffusion models: the forward SDE and its closed-form marginals.

Forward SDE ``dx = f(t) x dt + g(t) dW`` with marginal ``x_t = s(t) x0 + sigma(t) eps``,
``eps ~ N(0, I)``, where

    s(t) = exp(int_0^t f),    sigma(t) = s(t) (int_0^t g^2 / s^2)^{1/2}.

All variance-preserving (VP) models satisfy ``s^2 + sigma^2 = 1`` and are described by
``alpha_bar(t) = s(t)^2``; then ``f = d log s / dt`` and ``g^2 = d sigma^2/dt - 2 f sigma^2
= -d log alpha_bar / dt``.

The network predicts ``eps``; Tweedie's formula and the score follow:

    x0_hat = (x_t - sigma eps) / s,    grad log p_t(x_t) = -eps / sigma.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor


def batch_view(t: Tensor, x: Tensor) -> Tensor:
    """A per-sample coefficient (B,) or scalar, in x's dtype and device, shaped to broadcast
    over ``x`` (B, ...)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must be a scalar or of shape (batch,)={x.shape[:1]}, got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def tweedie(x_t: Tensor, eps: Tensor, s: float | Tensor, sigma: float | Tensor) -> Tensor:
    """Tweedie's estimate ``x0_hat = (x_t - sigma eps) / s`` (``s``, ``sigma``: floats or
    tensors that broadcast over ``x_t``). The one place the formula is written."""
    return (x_t - sigma * eps) / s


def eps_from_x0(x_t: Tensor, x0: Tensor, s: float | Tensor, sigma: float | Tensor) -> Tensor:
    """The eps that Tweedie maps to ``x0``: ``eps = (x_t - s x0) / sigma``."""
    return (x_t - s * x0) / sigma


class DiffusionModel(ABC):
    """A forward SDE with closed-form ``s(t)`` and ``sigma(t)`` on ``t in [0, t_max]``."""

    t_max: float = 1.0

    @abstractmethod
    def f(self, t: Tensor) -> Tensor:
        """Drift coefficient f(t) = d log s / dt."""

    @abstractmethod
    def g(self, t: Tensor) -> Tensor:
        """Diffusion coefficient g(t)."""

    @abstractmethod
    def s(self, t: Tensor) -> Tensor:
        """Signal scale s(t) = exp(int_0^t f)."""

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """Noise scale sigma(t)."""

    @abstractmethod
    def t_of_lambda(self, lam: Tensor) -> Tensor:
        """Inverse of the half log-SNR ``lambda(t) = log(s / sigma)``."""

    def log_snr(self, t: Tensor) -> Tensor:
        """Half log signal-to-noise ratio ``lambda(t) = log(s(t) / sigma(t))``."""
        return torch.log(self.s(t)) - torch.log(self.sigma(t))

    # -- conversions -------------------------------------------------------------------------
    def add_noise(self, x0: Tensor, t: Tensor, eps: Tensor | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
        """``x_t = s(t) x0 + sigma(t) eps`` (eps drawn if not given)."""
        if eps is None:
            eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        return batch_view(self.s(t), x0) * x0 + batch_view(self.sigma(t), x0) * eps

    def eps_to_x0(self, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Tweedie: ``x0_hat = (x_t - sigma eps) / s``."""
        return tweedie(x_t, eps, batch_view(self.s(t), x_t), batch_view(self.sigma(t), x_t))

    def x0_to_eps(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """``eps = (x_t - s x0) / sigma``."""
        return eps_from_x0(x_t, x0, batch_view(self.s(t), x_t), batch_view(self.sigma(t), x_t))

    def eps_to_score(self, eps: Tensor, t: Tensor) -> Tensor:
        """``grad log p_t = -eps / sigma``."""
        return -eps / batch_view(self.sigma(t), eps)

    def score_to_eps(self, score: Tensor, t: Tensor) -> Tensor:
        """``eps = -sigma grad log p_t``."""
        return -batch_view(self.sigma(t), score) * score

    def check_time(self, t_min: float, t_max: float) -> None:
        """Raise if ``[t_min, t_max]`` is not a valid sampling interval for this model."""
        if not 0.0 < t_min < t_max:
            raise ValueError(f"need 0 < t_min < t_max, got t_min={t_min}, t_max={t_max}")
        if t_max > self.t_max:
            raise ValueError(f"t_max={t_max} exceeds the model's t_max={self.t_max}")


class VPDiffusion(DiffusionModel):
    """Variance-preserving model defined by ``alpha_bar(t) = s(t)^2``, ``sigma^2 = 1 - alpha_bar``."""

    @abstractmethod
    def log_alpha_bar(self, t: Tensor) -> Tensor:
        """``log alpha_bar(t) = 2 log s(t)``."""

    @abstractmethod
    def d_log_alpha_bar(self, t: Tensor) -> Tensor:
        """``d log alpha_bar / dt``."""

    @abstractmethod
    def t_of_log_alpha_bar(self, log_ab: Tensor) -> Tensor:
        """Inverse of ``log_alpha_bar``."""

    def s(self, t: Tensor) -> Tensor:
        return torch.exp(0.5 * self.log_alpha_bar(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(self.log_alpha_bar(t)))

    def f(self, t: Tensor) -> Tensor:
        return 0.5 * self.d_log_alpha_bar(t)

    def g(self, t: Tensor) -> Tensor:
        # g^2 = d sigma^2/dt - 2 f sigma^2 = -alpha_bar' - alpha_bar'/alpha_bar (1 - alpha_bar)
        #     = -d log alpha_bar / dt.
        return torch.sqrt(-self.d_log_alpha_bar(t))

    def log_snr(self, t: Tensor) -> Tensor:
        log_ab = self.log_alpha_bar(t)
        return 0.5 * (log_ab - torch.log(-torch.expm1(log_ab)))

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        # alpha_bar = sigmoid(2 lambda)
        return self.t_of_log_alpha_bar(torch.nn.functional.logsigmoid(2.0 * lam))


class VPLinear(VPDiffusion):
    r"""VP SDE with linear ``beta(t) = beta_min + t (beta_max - beta_min)`` (Song et al. 2021).

    ``f = -beta/2``, ``g = sqrt(beta)``, ``s = exp(-1/2 int_0^t beta)``, ``sigma = sqrt(1 - s^2)``.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not (math.isfinite(beta_min) and math.isfinite(beta_max)):
            raise ValueError(f"beta_min and beta_max must be finite, got {beta_min}, {beta_max}")
        if beta_min <= 0:
            raise ValueError(f"beta_min must be > 0, got {beta_min}")
        if beta_min > beta_max:
            raise ValueError(f"beta_min={beta_min} must not exceed beta_max={beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def __repr__(self) -> str:
        return f"VPLinear(beta_min={self.beta_min}, beta_max={self.beta_max})"

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha_bar(self, t: Tensor) -> Tensor:
        return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)

    def d_log_alpha_bar(self, t: Tensor) -> Tensor:
        return -self.beta(t)

    def f(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    def g(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.beta(t))

    def t_of_log_alpha_bar(self, log_ab: Tensor) -> Tensor:
        # Solve (db/2) t^2 + b0 t + log_ab = 0 for t >= 0 (stable form of the quadratic root).
        b0, db = self.beta_min, self.beta_max - self.beta_min
        return -2.0 * log_ab / (b0 + torch.sqrt(b0**2 - 2.0 * db * log_ab))


class VPCosine(VPDiffusion):
    r"""VP model with the cosine schedule of Nichol & Dhariwal (2021).

    ``alpha_bar(t) = cos^2(u(t)) / cos^2(u(0))`` with ``u(t) = (t + c) / (1 + c) * pi/2``;
    ``s = sqrt(alpha_bar)``, ``sigma = sqrt(1 - alpha_bar)``, ``f = d log s/dt = -u' tan u``,
    ``g^2 = -d log alpha_bar/dt = 2 u' tan u``. Since ``s(1) = 0``, sampling stops at
    ``t_max = 0.999`` by default (``s(0.999) ~ 1.6e-3``).
    """

    def __init__(self, c: float = 0.008, t_max: float = 0.999):
        if not (c > 0 and math.isfinite(c)):
            raise ValueError(f"c must be a positive finite offset, got {c}")
        if not 0 < t_max < 1:
            raise ValueError(f"t_max must lie in (0, 1) for the cosine schedule, got {t_max}")
        self.c, self.t_max = float(c), float(t_max)
        self._du = math.pi / (2.0 * (1.0 + self.c))
        self._log_cos0 = math.log(math.cos(self.c * self._du))

    def __repr__(self) -> str:
        return f"VPCosine(c={self.c}, t_max={self.t_max})"

    def _u(self, t: Tensor) -> Tensor:
        return (t + self.c) * self._du

    def log_alpha_bar(self, t: Tensor) -> Tensor:
        # clamp: round-off must not make alpha_bar(0) exceed 1 (sigma(0) would be NaN)
        return (2.0 * (torch.log(torch.cos(self._u(t))) - self._log_cos0)).clamp(max=0.0)

    def d_log_alpha_bar(self, t: Tensor) -> Tensor:
        return -2.0 * self._du * torch.tan(self._u(t))

    def t_of_log_alpha_bar(self, log_ab: Tensor) -> Tensor:
        u = torch.arccos(torch.exp(0.5 * log_ab + self._log_cos0))
        return u / self._du - self.c

