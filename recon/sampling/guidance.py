r"""Guidance: turn the prior's ``eps(x_t, t)`` into the conditional ``eps_y(x_t, t)`` for ``y``.

Measurement ``y = A x0 + sigma_y n``. The posterior score splits as

    grad log p_t(x_t | y) = grad log p_t(x_t) + grad log p_t(y | x_t),

and with ``grad log p_t = -eps / sigma`` every method here returns

    eps_y = eps - sigma(t) * grad log p_t(y | x_t)          (or, equivalently,
    eps_y = (x_t - s x0_y) / sigma                            for a corrected estimate x0_y),

so any integrator that consumes ``eps_fn(x, t)`` samples ``p(x0 | y)`` unchanged.

Notation: ``x0_hat(x_t) = (x_t - sigma eps)/s`` (Tweedie), ``J = d x0_hat / d x_t``.

Operators are duck-typed: ``forward(x)``, ``adjoint(y)``, ``sigma_y`` (``recon.operators``).
``y`` may be complex (k-space) while images are real; the real-valued problem is then
``R^D -> R^{2M}`` with the real inner product ``<a, b> = Re sum(conj(a) b)``, whose adjoint is
``Re(A^H v)``. Noise convention (``recon.operators.base``): ``sigma_y^2`` is the total variance
per entry, so each real component has variance ``sigma_y^2`` for real y and ``sigma_y^2 / 2``
for complex y (circular noise, ``p(y | x) ~ exp(-|y - A x|^2 / sigma_y^2)``); see
``noise_variance``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from recon.classical.linalg import batch_dot, conjugate_gradient, real_adjoint
from recon.classical.total_variation import tv_prox
from recon.registry import GUIDANCES
from recon.sampling.diffusion import DiffusionModel, eps_from_x0, tweedie
from recon.sampling.integrator import EpsFn, scales

__all__ = ["batch_dot", "conjugate_gradient"]  # re-exported: the guidances' linear algebra


# -- helpers ------------------------------------------------------------------------------------
def noise_variance(operator, y: Tensor) -> float:
    """Noise variance per real component of y: ``sigma_y^2``, or ``sigma_y^2 / 2`` if complex."""
    var = float(operator.sigma_y) ** 2
    return 0.5 * var if y.is_complex() else var


# -- guidance -----------------------------------------------------------------------------------
class Guidance(ABC):
    """Maps the prior's eps to the conditional eps for a measurement ``y`` (batched like ``x``)."""

    name: str = ""
    #: vector-Jacobian products through the network per conditional evaluation
    vjps_per_eval: int = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    @abstractmethod
    def eps(self, x: Tensor, t: float, y: Tensor, *, eps_fn: EpsFn, diffusion: DiffusionModel,
            operator) -> Tensor:
        """``eps_y(x, t)`` (detached); ``eps_fn(x, t)`` evaluates the prior network."""


class DPS(Guidance):
    r"""Diffusion posterior sampling (Chung et al. 2023), with the step taken on ``x0_hat``.

    The gradient is DPS's: through the network, ``g = grad_{x_t} ||y - A x0_hat(x_t)||^2 /
    ||y - A x0_hat||`` (the paper's normalisation; the norm per sample, held constant). The
    paper steps ``x_t`` by ``zeta' g`` after each of 1000 DDPM steps, a step that depends on
    the step count: at 16-32 steps it either barely acts or runs away. Here the step is made in
    the units of ``x0``, with length ``zeta s ||y - A x0_hat|| / 2``:

        x0_y = x0_hat - zeta s J^T A^H (A x0_hat - y),      J = d x0_hat / d x_t,

    i.e. ``eps_y = eps + zeta (s^2/sigma) J^T A^H (A x0_hat - y)``. Since ``s J -> I`` as
    ``t -> 0`` this ends as a Landweber step of length ``zeta`` on ``1/2 ||y - A x||^2``, stable
    for ``0 < zeta < 2 / ||A||^2`` whatever the number of steps (``||A|| <= 1`` for every
    operator here), and fades at high noise where ``s J = (s^2/sigma^2) Cov[x0 | x_t]`` is
    small; ``zeta = 1`` is the natural setting. One VJP per evaluation; not exact (it ignores
    the covariance of ``x0 | x_t`` and ``sigma_y``).
    """

    name = "dps"
    vjps_per_eval = 1

    def __init__(self, zeta: float = 1.0):
        if not (math.isfinite(zeta) and zeta >= 0):
            raise ValueError(f"zeta must be a finite non-negative step size, got {zeta}")
        self.zeta = float(zeta)

    def __repr__(self) -> str:
        return f"DPS(zeta={self.zeta})"

    def eps(self, x, t, y, *, eps_fn, diffusion, operator):
        s, sigma = scales(diffusion, t)
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(True)
            eps = eps_fn(x_, t)
            x0 = tweedie(x_, eps, s, sigma)
            r = y - operator.forward(x0)
            (grad,) = torch.autograd.grad(0.5 * batch_dot(r, r).sum(), x_)  # J^T A^H (A x0 - y)
        return eps.detach() + (self.zeta * s * s / sigma) * grad


class TweedieCovariance(Guidance):
    r"""Tweedie-covariance guidance: MMPS (Rozet et al. 2024), PiGDM (Song et al. 2023).

    ``p(y | x_t) ~ N(A x0_hat, Sigma_y)``, ``Sigma_y = v I + A V A^H`` with the noise variance per
    real component ``v`` (``sigma_y^2``; ``sigma_y^2 / 2`` for complex y: ``noise_variance``) and
    the Tweedie covariance ``V = Cov[x0 | x_t] = (sigma^2 / s) J`` (``J`` symmetric for a
    conservative score). Holding ``Sigma_y`` constant,

        grad log p(y | x_t) = J^T A^H Sigma_y^{-1} (y - A x0_hat).

    ``Sigma_y^{-1} r`` is solved with ``cg_steps`` conjugate-gradient steps whose matvec
    ``w -> v w + (sigma^2/s) A J Re(A^H w)`` costs one VJP (``J v = J^T v``), plus one VJP
    for the gradient: ``cg_steps + 1`` VJPs per evaluation. For a Gaussian prior and linear
    ``A`` this is the exact conditional score (``x0 | x_t`` is Gaussian with that covariance), so
    with ``cg_steps >=`` the number of distinct eigenvalues of ``Sigma_y`` (at most ``dim(y)``,
    counting real components) the sampler targets the exact posterior. For other priors the
    Gaussian approximation of ``p(x0 | x_t)`` is not exact (e.g. mixture weights are biased).
    """

    name = "tweedie_covariance"

    def __init__(self, cg_steps: int = 1):
        if isinstance(cg_steps, bool) or not isinstance(cg_steps, int) or not 1 <= cg_steps <= 100:
            raise ValueError(f"cg_steps must be an integer in [1, 100] (each is one VJP per "
                             f"evaluation), got {cg_steps!r}")
        self.cg_steps = cg_steps

    @property
    def vjps_per_eval(self) -> int:
        return self.cg_steps + 1

    def __repr__(self) -> str:
        return f"TweedieCovariance(cg_steps={self.cg_steps})"

    def covariance_scale(self, s: float, sigma: float) -> float:
        """``V = covariance_scale * J``: ``sigma^2 / s``."""
        return sigma * sigma / s

    def eps(self, x, t, y, *, eps_fn, diffusion, operator):
        s, sigma = scales(diffusion, t)
        var_y = noise_variance(operator, y)
        c = self.covariance_scale(s, sigma)
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(True)
            eps = eps_fn(x_, t)
            x0 = tweedie(x_, eps, s, sigma)

            def jac(u: Tensor, retain: bool = True) -> Tensor:  # J^T u (= J u)
                return torch.autograd.grad(x0, x_, u, retain_graph=retain)[0]

            r = y - operator.forward(x0.detach())

            def matvec(v: Tensor) -> Tensor:
                return var_y * v + c * operator.forward(jac(real_adjoint(operator, v)))

            w = conjugate_gradient(matvec, r, self.cg_steps)
            grad = jac(real_adjoint(operator, w), retain=False)
        return eps.detach() - sigma * grad


class DataConsistency(Guidance):
    r"""Data consistency on Tweedie's estimate (score-MRI, Chung & Ye 2022; DiffPIR, Zhu et al.
    2023; DDS, Chung et al. 2024); no gradients through the network.

    ``x0_dc = argmin_x ||y - A x||^2 / v + w ||x - x0_hat||^2 / r_t^2`` with the noise level of
    ``x_t / s``, ``r_t^2 = sigma^2 / s^2``, ``v`` the noise variance per real component
    (``sigma_y^2``, or ``sigma_y^2 / 2`` for complex y: ``noise_variance``) and the prior's weight
    ``w`` (``prior_weight``, DiffPIR's lambda; 1 is the Gaussian posterior of ``x0`` given
    ``x0_hat``), i.e. ``operator.prox(x0_hat, y, lam = w v / r_t^2)``: closed form for masks,
    single-coil Cartesian k-space and circular blur, a few CG steps otherwise (multi-coil
    k-space: at most 10, each chain stopping once its residual is ``cg_tol`` of its first). When
    ``A A^H = I`` (masks, masked orthonormal Fourier) this is

        x0_dc = x0_hat + rho_t A^H (y - A x0_hat),     rho_t = r_t^2 / (r_t^2 + w v),

    the measured coefficients of ``x0_hat`` pulled towards ``y`` (replaced when ``sigma_y = 0``
    or ``soft=False``, ``lam = 0``). With ``tv = mu > 0`` total variation shares the step
    (DiffusionMBIR): ``argmin 1/2 ||y - A x||^2 + lam/2 ||x - x0_hat||^2 + mu TV(x)`` by
    ``tv_iterations`` PDHG steps (``recon.classical.total_variation.tv_prox``); ``mu`` is in the units of
    the TV baseline's ``lam``. With ``tv_z = mu_z > 0`` the images are slabs ``(N, S, H, W)``
    of ``S`` slices sampled as one (``recon.reconstruct.coupling``) and TV along the slices couples them in
    the same step: ``+ mu_z ||D_z x||_1`` (DiffusionMBIR's through-plane TV). Then
    ``eps_y = (x_t - s x0_dc)/sigma`` and the integrator continues from ``x0_dc``. Images are
    real and the prox is the exact minimiser over real images (for Cartesian k-space it pairs
    each frequency with its mirror).
    """

    name = "data_consistency"

    def __init__(self, soft: bool = True, prior_weight: float = 1.0, tv: float = 0.0,
                 tv_iterations: int = 20, tv_z: float = 0.0, cg_tol: float = 0.0):
        if not (math.isfinite(prior_weight) and prior_weight > 0):
            raise ValueError(f"prior_weight must be a finite number > 0, got {prior_weight}")
        if not (math.isfinite(tv) and tv >= 0):
            raise ValueError(f"tv must be a finite number >= 0, got {tv}")
        if not (math.isfinite(tv_z) and tv_z >= 0):
            raise ValueError(f"tv_z must be a finite number >= 0, got {tv_z}")
        if isinstance(tv_iterations, bool) or not isinstance(tv_iterations, int) or \
                not 1 <= tv_iterations <= 1000:
            raise ValueError(f"tv_iterations must be an integer in [1, 1000], got {tv_iterations!r}")
        if not (math.isfinite(cg_tol) and 0 <= cg_tol < 1):
            raise ValueError(f"cg_tol must be a number in [0, 1), got {cg_tol}")
        if not isinstance(soft, bool):
            raise ValueError(f"soft must be true or false, got {soft!r}")
        self.soft = soft
        self.prior_weight = float(prior_weight)
        self.tv, self.tv_iterations, self.tv_z = float(tv), tv_iterations, float(tv_z)
        self.cg_tol = float(cg_tol)

    def __repr__(self) -> str:
        tv = f", tv={self.tv}" if self.tv else ""
        tv += f", tv_z={self.tv_z}" if self.tv_z else ""
        tv += f", tv_iterations={self.tv_iterations}" if tv else ""
        tv += f", cg_tol={self.cg_tol}" if self.cg_tol else ""
        return f"DataConsistency(soft={self.soft}, prior_weight={self.prior_weight}{tv})"

    def weight(self, s: float, sigma: float, var_y: float) -> float:
        """``rho_t = r_t^2 / (r_t^2 + w v)`` (1 for the hard version or ``v = 0``)."""
        if not self.soft or var_y == 0:
            return 1.0
        r2 = (sigma / s) ** 2
        return r2 / (r2 + self.prior_weight * var_y)

    def eps(self, x, t, y, *, eps_fn, diffusion, operator):
        s, sigma = scales(diffusion, t)
        x0 = tweedie(x, eps_fn(x, t), s, sigma)
        var_y = noise_variance(operator, y)
        lam = self.prior_weight * var_y * (s / sigma) ** 2 if self.soft else 0.0
        if self.tv > 0 or self.tv_z > 0:
            x0_dc = tv_prox(operator, x0, y, lam, self.tv, self.tv_iterations, mu_z=self.tv_z)
        elif hasattr(operator, "prox"):
            x0_dc = operator.prox(x0, y, lam, **({"tol": self.cg_tol} if self.cg_tol else {}))
        else:  # a duck-typed operator: one step towards the data (exact when A A^H = I)
            x0_dc = x0 + self.weight(s, sigma, var_y) * real_adjoint(operator, y - operator.forward(x0))
        return eps_from_x0(x, x0_dc, s, sigma)


def make_guidance(name: str, **kwargs) -> Guidance:
    """Build a guidance by name (``GUIDANCES``), e.g. ``make_guidance("dps", zeta=0.5)``."""
    try:
        cls = GUIDANCES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown guidance {name!r}; valid names: {sorted(GUIDANCES)}") from None
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for guidance {name!r}: {err}") from err
