"""Batched linear algebra shared by the guidances, the operators' prox and the classical solvers:
per-sample real inner products, conjugate gradient, and an operator's adjoint between real spaces."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from recon.classical.cancellation import check_cancelled


def _per_sample(c: Tensor, x: Tensor) -> Tensor:
    """A per-sample coefficient ``(B,)`` shaped to broadcast over ``x`` ``(B, ...)``."""
    return c.to(x.real.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def batch_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample real inner product ``Re sum(conj(a) b)`` over all but the first dimension."""
    prod = torch.conj(a) * b
    if prod.is_complex():
        prod = prod.real
    return prod.reshape(prod.shape[0], -1).sum(-1)


def real_adjoint(operator, v: Tensor) -> Tensor:
    """``Re(A^H v)``: the adjoint of ``A`` seen as a map between real spaces (images are real)."""
    out = operator.adjoint(v)
    return out.real if out.is_complex() else out


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, steps: int,
                       tol: float = 0.0) -> Tensor:
    r"""Batched conjugate gradient for ``M w = b`` (M symmetric positive semi-definite per sample).

    Runs at most ``steps`` iterations from ``w = 0`` with per-sample step sizes
    ``alpha = <r, r>/<p, M p>`` and ``beta = <r', r'>/<r, r>``; a sample whose residual has
    fallen to ``|r| <= max(tol, 8 eps) |b|`` keeps its solution (at round-off, so a singular but
    consistent system, e.g. a prox with ``lam = 0``, does not divide round-off by round-off and
    run away), and the iterations end once every sample has.
    Inner products are real (``batch_dot``), so complex ``b`` is solved as the real system on
    (Re, Im) pairs.
    """
    w = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = batch_dot(r, r)
    floor = rs * max(float(tol), 8.0 * torch.finfo(rs.dtype).eps) ** 2
    for _ in range(steps):
        check_cancelled()
        if not bool((rs > floor).any()):
            break
        mp = matvec(p)
        pmp = batch_dot(p, mp)
        live = (pmp > 0) & (rs > floor)
        alpha = torch.where(live, rs / torch.where(live, pmp, 1.0), 0.0)
        w = w + _per_sample(alpha, p) * p
        r = r - _per_sample(alpha, mp) * mp
        rs_new = batch_dot(r, r)
        beta = torch.where(rs > 0, rs_new / torch.where(rs > 0, rs, 1.0), 0.0)
        p = r + _per_sample(beta, p) * p
        rs = rs_new
    return w
