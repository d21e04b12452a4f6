"""Total variation in the data-consistency step: the difference operator's adjoint, and the PDHG
solution of 1/2 ||y - A x||^2 + lam/2 ||x - x0||^2 + mu TV(x) against sigpy's own solver of
the same problem (``sigpy.app.LinearLeastSquares`` by its own PDHG)."""

import numpy as np
import pytest
import sigpy as sp
import torch

from recon.classical.sigpy_linop import OperatorLinop
from recon.classical.total_variation import (
    finite_difference,
    finite_difference_adjoint,
    total_variation,
    tv_prox,
)
from recon.operators import build_blur, build_fourier, build_mask
from recon.sampling.guidance import DataConsistency

F64 = torch.float64
SHAPE = (18, 15)


def rand(shape, seed):
    return torch.rand(shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def test_finite_difference_adjoint_and_sigpy():
    x, z = rand((2, 1, *SHAPE), 0), rand((2, 2, 1, *SHAPE), 1)
    lhs, rhs = (finite_difference(x) * z).sum(), (x * finite_difference_adjoint(z)).sum()
    assert abs(float(lhs - rhs)) < 1e-12 * float(lhs.abs())
    D = sp.linop.FiniteDifference((2, 1, *SHAPE), axes=(-2, -1))
    np.testing.assert_allclose(np.abs(D(x.numpy())).reshape(2, 2, -1).sum((0, 2)),
                               total_variation(x).numpy(), rtol=1e-12)


@pytest.mark.parametrize("build", [
    lambda: build_mask(SHAPE, keep=0.4, sigma_y=0.05, seed=1),
    lambda: build_fourier(SHAPE, 4, 0.1, sigma_y=0.05, seed=1),
    lambda: build_blur(SHAPE, 1.5, sigma_y=0.05),
], ids=["mask", "fourier", "blur"])
def test_tv_prox_solves_the_problem_sigpy_solves(build):
    op = build().double()
    x0, y = rand((2, 1, *SHAPE), 2), op.measure(rand((2, 1, *SHAPE), 3), generator=4)
    lam, mu = 0.3, 0.05
    ours = tv_prox(op, x0, y, lam, mu, iterations=400)
    ishape = (2, 1, *SHAPE)
    # lam/2 ||x - x0||^2 as rows of the least squares: [A; sqrt(lam) I] x ~ [y; sqrt(lam) x0]
    A = sp.linop.Vstack([OperatorLinop(op, ishape), np.sqrt(lam) * sp.linop.Identity(ishape)])
    D = sp.linop.FiniteDifference(ishape, axes=(-2, -1))
    y_np = np.concatenate([(torch.view_as_real(y) if y.is_complex() else y).numpy().ravel(),
                           np.sqrt(lam) * x0.numpy().ravel()])
    app = sp.app.LinearLeastSquares(A, y_np, x=np.zeros(ishape), G=D,
                                    proxg=sp.prox.L1Reg(D.oshape, mu), max_iter=1000,
                                    solver="PrimalDualHybridGradient", sigma=0.1, show_pbar=False)
    theirs = torch.from_numpy(np.asarray(app.run()))

    def objective(x):
        r = y - op(x)
        return (0.5 * r.abs().square().flatten(1).sum(1)
                + 0.5 * lam * (x - x0).square().flatten(1).sum(1) + mu * total_variation(x))

    assert torch.allclose(objective(ours), objective(theirs), rtol=1e-5)
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=0)
    # 20 iterations (the guidance's default) are within 2 % of the optimum
    assert (objective(tv_prox(op, x0, y, lam, mu, 20)) <= 1.02 * objective(theirs)).all()
    assert torch.equal(tv_prox(op, x0, y, lam, 0.0), op.prox(x0, y, lam))


def test_data_consistency_with_tv_is_smoother_and_validates():
    op = build_mask(SHAPE, keep=0.4, sigma_y=0.05, seed=1).double()
    x = rand((1, 1, *SHAPE), 5)
    y = op.measure(x, generator=6)

    def eps(v, t):
        return torch.zeros_like(v)

    from recon.sampling.diffusion import VPCosine
    diffusion = VPCosine()
    plain = DataConsistency().eps(x, 0.3, y, eps_fn=eps, diffusion=diffusion, operator=op)
    smooth = DataConsistency(tv=0.1).eps(x, 0.3, y, eps_fn=eps, diffusion=diffusion, operator=op)
    s, sigma = float(diffusion.s(torch.tensor(0.3))), float(diffusion.sigma(torch.tensor(0.3)))
    x0_plain, x0_smooth = (x - sigma * plain) / s, (x - sigma * smooth) / s
    assert total_variation(x0_smooth) < 0.9 * total_variation(x0_plain)
    for bad in ({"tv": -1.0}, {"tv": float("nan")}, {"tv_iterations": 0}, {"prior_weight": 0.0}):
        with pytest.raises(ValueError):
            DataConsistency(**bad)
