"""Classical baselines (recon.classical.baselines): the sigpy wrapping of our operators is adjoint, each
solver reaches the minimum of its own objective, and lam is chosen on validation slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recon.classical.baselines import (
    LAMBDA_GRID,
    L1Wavelet,
    Sense,
    TotalVariation,
    select_lambda,
)
from recon.classical.sigpy_linop import OperatorLinop
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
    assert set(BASELINES) == {"sense", "tv", "tv3d", "l1_wavelet"}


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
    from recon.reconstruct.reconstruction import tune_baseline
    from recon.reconstruct.volumes import prepare_volume

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


# -- lam from the measurement's own noise level (the discrepancy principle) ----------------------
def _multicoil(sigma: float, seed: int = 0):
    """A 4-coil 3x Cartesian problem with complex images (a disc and a bar under a linear phase)
    and known noise ``sigma`` per complex k-space entry: ``(operator, magnitude truth, y)``."""
    from recon.operators import UndersampledFourier, birdcage_maps, cartesian_mask

    shape = (32, 28)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, shape[0]), torch.linspace(-1, 1, shape[1]),
                            indexing="ij")
    img = 0.6 * (xx**2 / 0.8 + yy**2 < 0.8).float() + \
        0.4 * ((xx - 0.2).abs() < 0.15).float() * (yy.abs() < 0.5)
    x = (img * torch.exp(1.5j * (xx + 0.5 * yy))).to(torch.complex64)[None, None]
    op = UndersampledFourier(cartesian_mask(shape, acceleration=3, center_fraction=0.2,
                                            generator=0), birdcage_maps(shape, num_coils=4),
                             sigma_y=sigma)
    return op, img, op.measure(x, generator=seed)


def _psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.max() ** 2 / (x - ref).square().mean()))


def test_discrepancy_lambda_is_the_largest_lam_under_the_bound():
    """The formula on a known residual curve: the bisection brackets the crossing of
    ``tau m sigma^2`` to within one step; a floor above it moves the bound to floor +
    ``kappa m sigma^2``; without kappa (plain Morozov) nothing meets it and the grid's lower end
    is returned; a curve under the bound everywhere gives the upper end."""
    from recon.classical.baselines import DISCREPANCY_KAPPA, DISCREPANCY_TAU, discrepancy_lambda

    m, sigma = 1000, 0.1
    step = (max(LAMBDA_GRID) / min(LAMBDA_GRID)) ** (1 / 32)
    for floor, crossing in ((0.5, (DISCREPANCY_TAU - 0.5) / 10),
                            (1.2, DISCREPANCY_KAPPA / 10)):
        calls = []

        def residual(lam, floor=floor, calls=calls):
            calls.append(lam)
            return m * sigma**2 * (floor + 10 * lam)

        lam = discrepancy_lambda(residual, m, sigma)
        assert lam <= crossing < lam * step * 1.0001, (floor, lam, crossing)
        assert len(calls) <= 8 and calls[0] == 0.0
    assert discrepancy_lambda(lambda lam: m * sigma**2 * (1.2 + lam), m, sigma, kappa=None) == \
        pytest.approx(min(LAMBDA_GRID))
    assert discrepancy_lambda(lambda lam: 0.0 * lam, m, sigma) == pytest.approx(max(LAMBDA_GRID))


@pytest.mark.parametrize("cls", [Sense, L1Wavelet], ids=lambda c: c.name)
def test_discrepancy_lam_fits_the_data_to_the_noise_level_and_follows_sigma(cls):
    """Multi-coil k-space with known sigma: the chosen lam's complex solution leaves
    ``||y - A x||^2 <= tau m sigma^2`` (m = measured complex entries) and the next lam of the
    search exceeds it; less noise, smaller lam; ``solve`` returns that solution's magnitude."""
    from recon.classical.baselines import DISCREPANCY_TAU

    chosen = {}
    for sigma in (0.03, 0.01):
        op, _, y = _multicoil(sigma)
        baseline = cls(op, "discrepancy")
        magnitude = baseline.solve(y)
        (lam,) = baseline.chosen_lam
        m = 4 * int(op.mask.sum())

        def ratio(lam, op=op, y=y, m=m, sigma=sigma):
            x = cls(op, lam).solve_complex(y)
            return float((op.forward(x) - y).abs().square().sum()) / (m * sigma**2)

        step = (max(LAMBDA_GRID) / min(LAMBDA_GRID)) ** (1 / 32)
        assert min(LAMBDA_GRID) < lam < max(LAMBDA_GRID)
        assert ratio(0.0) < 0.8 and ratio(lam) <= DISCREPANCY_TAU < ratio(lam * step), sigma
        torch.testing.assert_close(magnitude, cls(op, lam).solve_complex(y).abs(), atol=1e-4,
                                   rtol=1e-3)
        chosen[sigma] = lam
    assert chosen[0.01] < chosen[0.03] / 2


@pytest.mark.parametrize("cls", [Sense, L1Wavelet], ids=lambda c: c.name)
def test_discrepancy_lam_beats_zero_filled_where_a_fixed_lam_at_either_end_does_not(cls):
    """A noisy acquisition (sigma 0.03 per entry, the image peaks at 1): with lam from the
    discrepancy principle the baseline is above zero-filled PSNR, while the grid's smallest lam
    (noise amplified) and largest (over-smoothed) are below it: the rule is what holds."""
    op, truth, y = _multicoil(0.03, seed=1)
    zero_filled = _psnr(op.pseudo_inverse(y).abs()[0, 0], truth)
    assert _psnr(cls(op, "discrepancy").solve(y)[0, 0], truth) > zero_filled
    for lam in (min(LAMBDA_GRID), max(LAMBDA_GRID)):
        assert _psnr(cls(op, lam).solve(y)[0, 0], truth) < zero_filled, lam


def test_a_solve_does_not_depend_on_numpy_draws_before_it_nor_change_them():
    """sigpy starts the power iteration behind PDHG's step from numpy's global generator: the
    solve seeds it for itself (the same image whatever was drawn before) and puts it back."""
    op = _operators(sigma_y=0.02)["mask"]
    y = op.measure(_phantom(), generator=5)
    tv = TotalVariation(op, 0.02, iterations=30)
    outs = []
    for seed in (1, 2):
        np.random.seed(seed)
        outs.append(tv.solve(y))
        after = np.random.normal()
        np.random.seed(seed)
        assert after == np.random.normal()  # the caller's stream is where it was
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_discrepancy_lam_is_per_image_on_image_operators_and_needs_a_noise_level():
    """On a batch of images each slice gets the lam it gets alone (a fainter slice, at the same
    noise, a different lam); an operator without noise level is refused, as are unknown rules."""
    op = _operators(sigma_y=0.02)["mask"]
    x = _phantom(batch=2) * torch.tensor([1.0, 0.3]).view(2, 1, 1, 1)
    y = op.measure(x, generator=5)
    tv = TotalVariation(op, "discrepancy", iterations=100)
    both = tv.solve(y)
    lams = list(tv.chosen_lam)
    for i in range(2):
        alone = tv.solve(y[i: i + 1])
        assert tv.chosen_lam == [lams[i]]
        torch.testing.assert_close(both[i: i + 1], alone, atol=0, rtol=0)
    assert lams[0] != lams[1]
    with pytest.raises(ValueError, match="needs the noise level"):
        TotalVariation(_operators(sigma_y=0.0)["mask"], "discrepancy").solve(y)
    with pytest.raises(ValueError, match="'discrepancy'"):
        TotalVariation(op, "morozov")
