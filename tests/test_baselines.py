"""Classical baselines (recon.baselines): the sigpy wrapping of our operators is adjoint, each
solver reaches the minimum of its own objective, and lam is chosen on validation slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recon.baselines import (
    LAMBDA_GRID,
    L1Wavelet,
    OperatorLinop,
    TotalVariation,
    select_lambda,
)
from recon.registry import BASELINES, OPERATORS

SHAPE = (24, 20)


def _operators(sigma_y=0.01):
    return {"mask": OPERATORS["mask"](SHAPE, keep=0.4, sigma_y=sigma_y, seed=0),
            "blur": OPERATORS["blur"](SHAPE, sigma=1.5, sigma_y=sigma_y, seed=0),
            "fourier": OPERATORS["fourier"](SHAPE, acceleration=3, center_fraction=0.1,
                                            sigma_y=sigma_y, seed=0)}


def _phantom(batch=2) -> torch.Tensor:
    """Piecewise-constant discs and a bar: what TV is made for."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SHAPE[0]), torch.linspace(-1, 1, SHAPE[1]),
                            indexing="ij")
    img = 0.5 * (xx**2 + yy**2 < 0.7).float() + 0.5 * ((xx - 0.2).abs() < 0.15).float() * (yy.abs() < 0.5)
    return torch.stack([img * (1 + 0.2 * b) for b in range(batch)])[:, None]


@pytest.mark.parametrize("name", ["mask", "blur", "fourier"])
def test_the_sigpy_linop_is_the_operator_and_its_real_adjoint(name):
    op = _operators()[name].double()
    L = OperatorLinop(op, (2, 1, *SHAPE))
    rng = np.random.default_rng(0)
    x = rng.standard_normal(L.ishape)
    v = rng.standard_normal(L.oshape)
    lhs, rhs = float((L(x) * v).sum()), float((x * L.H(v)).sum())
    assert abs(lhs - rhs) / abs(lhs) < 1e-10
    y = op.forward(torch.from_numpy(x))
    y = torch.view_as_real(y) if y.is_complex() else y
    np.testing.assert_allclose(L(x), y.numpy(), rtol=1e-12)
    assert L.H.H.ishape == L.ishape and L.H.oshape == L.ishape


def _objective(baseline, x: torch.Tensor, y: torch.Tensor, lam: float) -> float:
    """1/2 ||A x - y||^2 + lam R(x), R from the same sigpy linops the solver uses."""
    import sigpy as sp

    r = baseline.operator.forward(x) - y
    fit = 0.5 * float((r.abs() ** 2).sum())
    xs = x.numpy().astype(np.float64)
    if isinstance(baseline, TotalVariation):
        reg = np.abs(sp.linop.FiniteDifference(xs.shape, axes=(-2, -1))(xs)).sum()
    else:
        reg = np.abs(sp.linop.Wavelet(xs.shape, axes=(-2, -1), wave_name="db4")(xs)).sum()
    return fit + lam * float(reg)


@pytest.mark.parametrize("name", ["mask", "blur", "fourier"])
@pytest.mark.parametrize("cls", [TotalVariation, L1Wavelet], ids=lambda c: c.name)
def test_each_baseline_minimises_its_objective(name, cls):
    """The solution's objective is below that of the truth, the naive reconstruction and
    nearby perturbations of the solution: the solver reaches the minimiser it documents."""
    op = _operators()[name]
    x = _phantom()
    y = op.measure(x, generator=1)
    lam = 0.01
    solver = cls(op, lam)  # default iterations
    x_hat = solver.solve(y)
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype and torch.isfinite(x_hat).all()
    naive = op.pseudo_inverse(y)
    naive = naive.real if naive.is_complex() else naive
    f = _objective(solver, x_hat, y, lam)
    assert f < _objective(solver, x, y, lam) and f < _objective(solver, naive, y, lam)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        nearby = x_hat + 0.01 * torch.randn(x.shape, generator=g)
        assert f <= _objective(solver, nearby, y, lam) + 1e-4 * abs(f)


def test_tv_beats_naive_on_a_piecewise_constant_image_and_lam_zero_fits_the_data():
    ops, x = _operators(), _phantom()
    for name, op in ops.items():
        y = op.measure(x, generator=3)
        naive = op.pseudo_inverse(y)
        naive = naive.real if naive.is_complex() else naive
        tv = TotalVariation(op, {"fourier": 0.001}.get(name, 0.01)).solve(y)
        assert (tv - x).square().mean() < (0.3 if name == "mask" else 0.9) * \
            (naive - x).square().mean(), name
    mask = ops["mask"]
    y = mask.measure(x, generator=4)
    fit = TotalVariation(mask, 0.0, iterations=300).solve(y)
    torch.testing.assert_close(mask.forward(fit), y, atol=1e-4, rtol=0)


def test_baselines_have_the_sampler_api_and_refuse_bad_settings():
    op = _operators()["fourier"]
    y = op.measure(_phantom(), generator=0)
    post = L1Wavelet(op, 0.001, iterations=20).sample(y, n_samples=3)
    assert post.nfe == 0 and post.vjp == 0 and post.samples.shape[0] == 1
    assert (post.std == 0).all() and post.mean.shape == (2, 1, *SHAPE)
    with pytest.raises(ValueError, match="lam is not set"):
        TotalVariation(op).solve(y)
    for bad in ({"lam": -1.0}, {"lam": float("nan")}, {"iterations": 0}, {"iterations": 2.5}):
        with pytest.raises(ValueError):
            TotalVariation(op, **bad)
    assert set(BASELINES) == {"sense", "tv", "l1_wavelet"}


def test_select_lambda_takes_the_best_score_on_the_grid():
    best, scores = select_lambda(lambda lam: -(np.log10(lam) + 2.0) ** 2)
    assert best == pytest.approx(1e-2) and set(scores) == set(LAMBDA_GRID)
    with pytest.raises(ValueError, match="empty"):
        select_lambda(lambda lam: 0.0, grid=())


def test_tune_baseline_chooses_lam_on_validation_slices(tmp_path):
    """On prepared slices, ``tune_baseline`` measures them as the test slices would be and
    returns the grid value with the best mean PSNR; that value is interior for TV on a
    smooth head phantom (neither no regularisation nor the most)."""
    import nibabel as nib

    from recon.config import BaselineConfig, DataConfig, OperatorConfig
    from recon.reconstruction import tune_baseline
    from recon.volumes import prepare_volume

    grid = np.meshgrid(*[np.linspace(-1.2, 1.2, n) for n in (24, 28, 6)], indexing="ij")
    r = grid[0] ** 2 + grid[1] ** 2
    vol = ((r < 1.0) * (100 + 30 * (r < 0.4))).astype(np.float32)
    path = tmp_path / "val.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), path)
    data = DataConfig(image_size=None, normalise="foreground", manifest=tmp_path / "m.yaml")
    prepared = prepare_volume(path, data, tmp_path / "prep", 2, name="val")
    op = OperatorConfig(name="fourier", params={"acceleration": 4, "center_fraction": 0.1})
    out = tune_baseline([prepared], op, BaselineConfig(name="tv", params={"iterations": 60}),
                        sigma_y=0.01)
    assert out["slices"] == 2 and out["volumes"] == 1 and out["lam"] in LAMBDA_GRID
    scores = list(out["scores"].values())
    assert max(scores) == pytest.approx(scores[[f"{v:.4g}" for v in LAMBDA_GRID].index(
        f"{out['lam']:.4g}")])
    assert max(scores) > scores[0] and max(scores) > scores[-1]
