r"""Total variation inside a data-consistency step (DiffusionMBIR, Chung et al. CVPR 2023).

``D x``: forward differences over the slice's two axes (H, W), circular as
``sigpy.linop.FiniteDifference``, and, for a volume ``(..., S, H, W)``, along the slices (z), not
circular (a slab's first and last slices are not neighbours), each axis with its own weight:
``TV(x) = mu ||D_hw x||_1 + mu_z ||D_z x||_1`` (anisotropic), ``||D||^2 <= 4 x axes``.

``tv_prox`` solves the data-consistency problem with TV added,

    x = argmin_x  1/2 ||y - A x||^2 + lam/2 ||x - x0||^2 + mu TV_hw(x) + mu_z TV_z(x),

by primal-dual hybrid gradient (Chambolle & Pock 2011) with ``K = D``, ``F(z) = sum_a mu_a
||z_a||_1`` and ``G(x) = 1/2 ||y - A x||^2 + lam/2 ||x - x0||^2``, whose prox is the operator's own:

    prox_{tau G}(v) = operator.prox((lam x0 + v / tau) / (lam + 1 / tau), y, lam + 1 / tau).

With ``mu = 0`` and ``mu_z > 0`` only the slices are coupled: the 2-D prior acts in-plane and TV
along z across slices, as DiffusionMBIR does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from recon.classical.cancellation import check_cancelled

_DIMS = (-2, -1)
Z = -3
"""The slice axis of a volume ``(..., S, H, W)``."""


def _first_slice_zeroed(t: Tensor) -> Tensor:
    """``t`` with its first slice (dim ``Z``) set to zero: what makes ``D_z`` non-circular."""
    t = t.clone()
    t.select(Z, 0).zero_()
    return t


def finite_difference(x: Tensor, dims: Sequence[int] = _DIMS) -> Tensor:
    """``D x``: ``(len(dims), *x.shape)``, ``x - roll(x, 1)`` along each of ``dims`` (circular),
    except along ``Z``, where the first slice's difference is 0."""
    return torch.stack([_first_slice_zeroed(x - torch.roll(x, 1, d)) if d == Z
                        else x - torch.roll(x, 1, d) for d in dims])


def finite_difference_adjoint(z: Tensor, dims: Sequence[int] = _DIMS) -> Tensor:
    """``D^T z`` for ``z`` of shape ``(len(dims), *x.shape)``."""
    out = 0
    for i, d in enumerate(dims):
        zi = _first_slice_zeroed(z[i]) if d == Z else z[i]
        out = out + zi - torch.roll(zi, -1, d)
    return out


def total_variation(x: Tensor, dims: Sequence[int] = _DIMS) -> Tensor:
    """Anisotropic ``TV(x) = ||D x||_1`` per sample ``(B,)``."""
    return finite_difference(x, dims).abs().transpose(0, 1).flatten(1).sum(1)


def tv_prox(operator, x0: Tensor, y: Tensor, lam: float, mu: float, iterations: int = 20,
            x_init: Tensor | None = None, mu_z: float = 0.0) -> Tensor:
    """``argmin 1/2 ||y - A x||^2 + lam/2 ||x - x0||^2 + mu TV_hw(x) + mu_z TV_z(x)`` by
    ``iterations`` PDHG steps (primal and dual steps ``0.99 / ||D||``) from ``x_init``
    (default: the prox without TV, ``operator.prox(x0, y, lam)``). ``mu_z`` needs volumes
    ``(..., S, H, W)`` (slices along dim -3). ``mu = mu_z = 0`` returns that prox."""
    if mu < 0 or mu_z < 0:
        raise ValueError(f"TV weights must be >= 0, got mu={mu}, mu_z={mu_z}")
    prox = operator.proximal(y)  # what depends on y alone, once for all the iterations
    x = prox(x0, lam) if x_init is None else x_init
    weights = {d: w for d, w in ((Z, mu_z), (-2, mu), (-1, mu)) if w > 0}
    if not weights or iterations <= 0:
        return x
    if Z in weights and x.ndim < 4:
        raise ValueError(f"through-plane TV needs volumes (N, S, H, W), got shape {tuple(x.shape)}")
    dims = tuple(weights)
    bound = torch.tensor([weights[d] for d in dims], dtype=x.dtype, device=x.device)
    bound = bound.reshape(-1, *([1] * x.ndim))
    step = 0.99 / math.sqrt(4.0 * len(dims))
    lam_g = lam + 1.0 / step
    z = torch.zeros((len(dims), *x.shape), dtype=x.dtype, device=x.device)
    x_bar = x
    for _ in range(iterations):
        check_cancelled()
        z = torch.maximum(torch.minimum(z + step * finite_difference(x_bar, dims), bound), -bound)
        v = x - step * finite_difference_adjoint(z, dims)
        x_new = prox((lam * x0 + v / step) / lam_g, lam_g)
        x_bar = 2.0 * x_new - x
        x = x_new
    return x
