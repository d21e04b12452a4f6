r"""Total variation inside a data-consistency step (DiffusionMBIR, Chung et al. CVPR 2023).

``D x``: circular forward differences over the last two dims (as ``sigpy.linop.FiniteDifference``),
``TV(x) = ||D x||_1`` (anisotropic), ``||D||^2 <= 8``.

``tv_prox`` solves the data-consistency problem with TV added,

    x = argmin_x  1/2 ||y - A x||^2 + lam/2 ||x - x0||^2 + mu TV(x),

by primal-dual hybrid gradient (Chambolle & Pock 2011) with ``K = D``, ``F = mu ||.||_1`` and
``G(x) = 1/2 ||y - A x||^2 + lam/2 ||x - x0||^2``, whose prox is the operator's own prox:

    prox_{tau G}(v) = operator.prox((lam x0 + v / tau) / (lam + 1 / tau), y, lam + 1 / tau).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_DIMS = (-2, -1)


def finite_difference(x: Tensor) -> Tensor:
    """``D x``: ``(2, *x.shape)``, ``x - roll(x, 1)`` along H then W (circular)."""
    return torch.stack([x - torch.roll(x, 1, d) for d in _DIMS])


def finite_difference_adjoint(z: Tensor) -> Tensor:
    """``D^T z`` for ``z`` of shape ``(2, *x.shape)``."""
    return sum(z[i] - torch.roll(z[i], -1, d) for i, d in enumerate(_DIMS))


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic ``TV(x) = ||D x||_1`` per sample ``(B,)``."""
    return finite_difference(x).abs().transpose(0, 1).flatten(1).sum(1)


def tv_prox(operator, x0: Tensor, y: Tensor, lam: float, mu: float, iterations: int = 20,
            x_init: Tensor | None = None) -> Tensor:
    """``argmin 1/2 ||y - A x||^2 + lam/2 ||x - x0||^2 + mu TV(x)`` by ``iterations`` PDHG steps
    (primal and dual steps ``0.99 / sqrt(8)``) from ``x_init`` (default: the prox without TV,
    ``operator.prox(x0, y, lam)``). ``mu = 0`` returns that prox."""
    x = operator.prox(x0, y, lam) if x_init is None else x_init
    if mu <= 0 or iterations <= 0:
        return x
    step = 0.99 / math.sqrt(8.0)
    lam_g = lam + 1.0 / step
    z = torch.zeros((2, *x.shape), dtype=x.dtype, device=x.device)
    x_bar = x
    for _ in range(iterations):
        z = (z + step * finite_difference(x_bar)).clamp(-mu, mu)
        v = x - step * finite_difference_adjoint(z)
        x_new = operator.prox((lam * x0 + v / step) / lam_g, y, lam_g)
        x_bar = 2.0 * x_new - x
        x = x_new
    return x
