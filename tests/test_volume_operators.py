"""Volume operators (recon.operators.volume): (kz, ky)-undersampled 3-D k-space and dropped
slices are adjoint, their masks keep what they say, the real prox is the exact minimiser, a
slab drops the slices its volume drops, and 3-D TV uses the slices' shared information."""

from __future__ import annotations

import math

import pytest
import torch

from recon.classical.baselines import TotalVariation, TotalVariation3D
from recon.operators import (
    KyKzFourier,
    SliceDrop,
    build_kykz_fourier,
    build_slice_drop,
    fft3c,
    ifft3c,
    kykz_mask,
)
from recon.registry import BASELINES, OPERATORS

F64, C128 = torch.float64, torch.complex128


def rand(shape, dtype, seed):
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def adjoint_gap(op, x, y):
    """|<Ax, y> - <x, A^H y>| / |<Ax, y>|, the real inner product where the image is real."""
    lhs, rhs = (op(x).conj() * y).sum(), (x.conj() * op.adjoint(y)).sum()
    if not x.is_complex():
        lhs = lhs.real
        assert not rhs.is_complex()
    return float((lhs - rhs).abs() / lhs.abs())


def psnr(x, ref):
    return float(10 * torch.log10(ref.max() ** 2 / (x - ref).square().mean()))


SHAPES = {"even": (6, 8, 4), "odd": (5, 7, 3), "mixed": (7, 6, 5)}


# ---- the transform and the masks ------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES)
def test_fft3c_is_centred_and_orthonormal(shape):
    x = rand((2, *shape), C128, 0)
    torch.testing.assert_close(ifft3c(fft3c(x)), x)
    torch.testing.assert_close(fft3c(x).norm(), x.norm())
    k = fft3c(torch.ones(shape, dtype=C128))  # DC at (S // 2, H // 2, W // 2)
    assert k.abs().argmax() == (shape[0] // 2 * shape[1] + shape[1] // 2) * shape[2] + shape[2] // 2
    torch.testing.assert_close(k.abs().max(), torch.tensor(math.sqrt(math.prod(shape)), dtype=F64))


@pytest.mark.parametrize("kind", ["random", "poisson"])
@pytest.mark.parametrize("acceleration,center_fraction", [(4, 0.08), (8, 0.1), (2.5, 0.2)])
def test_kykz_mask_fraction_centre_density_and_seed(kind, acceleration, center_fraction):
    s, h = 40, 48
    mask = kykz_mask((s, h), acceleration, center_fraction, kind=kind, generator=0)
    assert mask.shape == (s, h) and mask.dtype == torch.bool
    assert int(mask.sum()) == round(s * h / acceleration)
    cs, ch = round(s * center_fraction), round(h * center_fraction)
    zs, ys = (s - cs + 1) // 2, (h - ch + 1) // 2
    assert cs * ch > 0 and mask[zs:zs + cs, ys:ys + ch].all()
    # variable density: the inner half of the radii is sampled more densely than the outer
    # (Poisson disc: radius 1 + slope rho, a mild slope at low acceleration; 1.27x at 2.5)
    kz = (torch.arange(s) - s // 2) / (s / 2)
    ky = (torch.arange(h) - h // 2) / (h / 2)
    r = (kz[:, None] ** 2 + ky[None, :] ** 2).sqrt()
    inner, outer = mask[r < 0.5].float().mean(), mask[r >= 0.5].float().mean()
    print(f"{kind} R={acceleration}: inner {float(inner):.3f}, outer {float(outer):.3f}")
    assert inner > 1.2 * outer
    assert torch.equal(mask, kykz_mask((s, h), acceleration, center_fraction, kind=kind,
                                       generator=0))
    assert not torch.equal(mask, kykz_mask((s, h), acceleration, center_fraction, kind=kind,
                                           generator=1))


def test_poisson_disc_spreads_points_more_evenly_than_random():
    """Poisson-disc sampling keeps points apart: far fewer 4-adjacent sampled pairs outside the
    centre than variable-density random at the same count."""
    def adjacent(m):
        m = m.clone()
        m[18:22, 22:26] = False  # leave the fully sampled centre out
        return int((m[1:] & m[:-1]).sum() + (m[:, 1:] & m[:, :-1]).sum())
    pairs = {kind: sum(adjacent(kykz_mask((40, 48), 4, 0.08, kind=kind, generator=g))
                       for g in range(3)) for kind in ("random", "poisson")}
    print(f"4-adjacent sampled pairs over 3 masks: {pairs}")
    assert pairs["poisson"] < 0.5 * pairs["random"]


def test_bad_mask_and_operator_parameters():
    with pytest.raises(ValueError, match="kind"):
        kykz_mask((8, 8), kind="lines")
    with pytest.raises(ValueError, match="centre"):
        kykz_mask((20, 20), 8, 0.5, kind="poisson")
    with pytest.raises(ValueError, match=r"\(S, H\)"):
        kykz_mask((8, 8, 8))
    with pytest.raises(ValueError, match="volume shape"):
        build_kykz_fourier((8, 8))
    with pytest.raises(ValueError, match="offset"):
        SliceDrop((4, 3, 3), factor=2, offset=2)
    with pytest.raises(ValueError, match="indices"):
        SliceDrop((4, 3, 3), indices=[0, 1, 2])
    with pytest.raises(ValueError, match="increasing"):
        SliceDrop((3, 3, 3), indices=[0, 2, 1])
    op = build_kykz_fourier((6, 8, 4), sigma_y=0.1)
    with pytest.raises(ValueError, match=r"\(S, H\) = \(6, 8\)"):
        op(rand((1, 6, 7, 4), F64, 0))
    with pytest.raises(ValueError, match="real"):
        op(rand((1, 6, 8, 4), C128, 0))
    with pytest.raises(ValueError, match="complex"):
        op.check_measurement(rand((1, 6, 8, 4), F64, 0))


# ---- adjointness ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["random", "poisson"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES)
def test_kykz_fourier_adjoint(kind, shape):
    mask = kykz_mask(shape[:2], 3, 0.2, kind=kind, generator=0)
    y = rand((2, 1, *shape), C128, 1)
    complex_op = KyKzFourier(mask)
    gap = adjoint_gap(complex_op, rand((2, 1, *shape), C128, 0), y)
    assert gap < 1e-5, gap
    real_op = KyKzFourier(mask, real_output=True)
    gap = adjoint_gap(real_op, rand((2, 1, *shape), F64, 0), y)
    assert gap < 1e-5, gap
    assert real_op.pseudo_inverse(y).dtype == F64
    assert complex_op.pseudo_inverse(y).dtype == C128


@pytest.mark.parametrize("dtype", [F64, C128])
def test_slice_drop_adjoint(dtype):
    op = SliceDrop((7, 5, 4), factor=3, offset=1)
    x, y = rand((2, 1, 7, 5, 4), dtype, 0), rand((2, 1, 7, 5, 4), dtype, 1)
    assert adjoint_gap(op, x, y) < 1e-5


def test_measurements_are_zero_where_nothing_is_measured():
    x = rand((2, 1, 6, 8, 4), F64, 0)
    op = build_kykz_fourier((6, 8, 4), 3, 0.2, sigma_y=0.1, seed=0).double()
    y = op.measure(x, generator=1)
    assert op.acceleration == pytest.approx(3.0, rel=0.05)
    assert (y[..., ~op.mask, :] == 0).all() and (y[..., op.mask, :] != 0).all()
    op.check_measurement(y, x.shape)
    drop = build_slice_drop((6, 8, 4), factor=2, offset=1, sigma_y=0.1)
    y = drop.measure(x, generator=1)
    assert torch.equal(drop.kept, torch.tensor([False, True] * 3))
    assert (y[..., ::2, :, :] == 0).all() and (y[..., 1::2, :, :] != 0).all()


# ---- prox -------------------------------------------------------------------------------------
def _dense_real(op, shape):
    """The real matrix of ``x -> (Re A x, Im A x)`` on real volumes of ``shape``."""
    n = math.prod(shape)
    cols = op(torch.eye(n, dtype=F64).reshape(n, *shape)).reshape(n, -1)
    return torch.cat([cols.real, cols.imag], 1).T


@pytest.mark.parametrize("kind", ["random", "poisson"])
@pytest.mark.parametrize("lam", [0.0, 0.3, 5.0])
@pytest.mark.parametrize("shape", [(4, 6, 3), (5, 5, 2), (3, 4, 4)], ids=["even", "odd", "mixed"])
def test_kykz_prox_is_the_exact_real_minimiser(shape, lam, kind):
    """Over real volumes the closed form (k paired with -k) equals the dense least-squares
    solution of ||y - A x||^2 + lam ||x - x0||^2 (lam = 0: the data fit nearest x0)."""
    op = KyKzFourier(kykz_mask(shape[:2], 2.5, 0.25, kind=kind, generator=3), sigma_y=0.1,
                     real_output=True).double()
    y = op.measure(rand((1, *shape), F64, 4), generator=5)
    x0 = rand((1, *shape), F64, 6)
    x = op.prox(x0, y, lam)
    assert x.dtype == F64 and x.shape == x0.shape
    a = _dense_real(op, shape)
    b = torch.cat([y.real.flatten(), y.imag.flatten()])
    if lam > 0:
        ref = torch.linalg.solve(a.T @ a + lam * torch.eye(a.shape[1], dtype=F64),
                                 a.T @ b + lam * x0.flatten())
    else:
        ref = x0.flatten() + torch.linalg.pinv(a) @ (b - a @ x0.flatten())
    err = float((x.flatten() - ref).abs().max())
    assert err < 1e-8, err
    # the real part of the complex prox is not it when the mask is not symmetric under k -> -k
    loose = op.prox(x0.to(C128), y, lam).real
    symmetric = bool((op.mirrored_mask() == op.mask).all())
    assert symmetric == torch.allclose(loose, x, atol=1e-9)


def test_kykz_prox_over_complex_volumes_zeroes_the_gradient():
    op = build_kykz_fourier((5, 6, 4), 3, 0.2, sigma_y=0.1, seed=1).double()
    op.real_output = False
    y = op.measure(rand((2, 5, 6, 4), C128, 0), generator=1)
    x0 = rand((2, 5, 6, 4), C128, 2)
    for lam in (0.0, 0.7):
        x = op.prox(x0, y, lam)
        grad = op.adjoint(op(x) - y) + lam * (x - x0)
        assert float(grad.abs().max()) < 1e-12


# ---- slice drop -------------------------------------------------------------------------------
def test_a_slab_drops_the_slices_its_volume_drops():
    s, h, w = 12, 5, 4
    x = rand((2, s, h, w), F64, 0)
    whole = SliceDrop((s, h, w), factor=3, offset=1)  # keeps slices 1, 4, 7, 10
    slab = build_slice_drop((8, h, w), factor=3, offset=1, indices=range(3, 11))
    assert slab.kept.tolist() == whole.kept[3:11].tolist() == [False, True, False] * 2 + [False, True]
    torch.testing.assert_close(slab.mask, whole.mask[3:11], rtol=0, atol=0)
    y, y_slab = whole(x), slab(x[:, 3:11])
    torch.testing.assert_close(y_slab, y[:, 3:11], rtol=0, atol=0)
    # between the slab's first and last kept slices (4 .. 10) its naive interpolation is the
    # volume's; before slice 4 the slab sees no kept slice and repeats slice 4 (a halo's job)
    inside, full = slab.pseudo_inverse(y_slab), whole.pseudo_inverse(y)
    torch.testing.assert_close(inside[:, 1:], full[:, 4:11], rtol=0, atol=1e-12)
    torch.testing.assert_close(inside[:, 0], x[:, 4], rtol=0, atol=0)
    assert not torch.allclose(full[:, 3], x[:, 4])


@pytest.mark.parametrize("factor,offset,s", [(2, 0, 9), (3, 0, 10), (2, 1, 9)])
def test_slice_drop_pseudo_inverse_interpolates_linearly_in_z(factor, offset, s):
    """Exact for a volume linear in z between the first and last kept slices, the nearest
    kept slice beyond them."""
    a, b = rand((2, 1, 1, 5, 4), F64, 0), rand((2, 1, 1, 5, 4), F64, 1)
    z = torch.arange(s, dtype=F64).reshape(s, 1, 1)
    x = a + b * z
    op = SliceDrop((s, 5, 4), factor=factor, offset=offset)
    out = op.pseudo_inverse(op(x))
    kept = torch.nonzero(op.kept).flatten()
    first, last = int(kept[0]), int(kept[-1])
    torch.testing.assert_close(out[..., first:last + 1, :, :], x[..., first:last + 1, :, :])
    for i in range(first):
        torch.testing.assert_close(out[..., i, :, :], x[..., first, :, :])
    for i in range(last + 1, s):
        torch.testing.assert_close(out[..., i, :, :], x[..., last, :, :])
    assert not torch.allclose(out, op(x))  # the dropped slices are filled in
    none = SliceDrop((1, 5, 4), factor=2, offset=1)  # a slab that keeps nothing: zeros
    assert (none.pseudo_inverse(none(x[..., :1, :, :])) == 0).all()


# ---- 3-D TV and the config layer --------------------------------------------------------------
def _blocks(s=8, h=16, w=16):
    """Piecewise constant in z (two blocks of slices) and in-plane (a disc and a bar)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h, dtype=F64),
                            torch.linspace(-1, 1, w, dtype=F64), indexing="ij")
    disc = (xx**2 + yy**2 < 0.6).to(F64)
    bar = ((xx - 0.2).abs() < 0.2).to(F64) * (yy.abs() < 0.6)
    vol = torch.stack([0.6 * disc + 0.4 * bar if i < s // 2 else 0.3 * disc + 0.7 * bar
                       for i in range(s)])
    return vol[None]  # (1, S, H, W)


def test_tv3d_recovers_dropped_slices_that_slice_by_slice_tv_cannot():
    """Every other slice dropped: 2-D TV leaves the dropped slices at zero, 3-D TV fills them
    from their neighbours (measured: 21.5 dB against 10.7 dB; the linear interpolation of
    ``pseudo_inverse`` scores 29.8 dB here, as TV along z cannot choose the value of a dropped
    slice at a step between two blocks, and PDHG reaches the last slice, which has one
    neighbour, slowly)."""
    x = _blocks()
    op = build_slice_drop(tuple(x.shape[1:]), factor=2, sigma_y=0.01).double()
    y = op.measure(x, generator=0)
    tv2, tv3 = TotalVariation(op, 0.01).solve(y), TotalVariation3D(op, 0.01).solve(y)
    naive = op.pseudo_inverse(y)
    scores = {name: psnr(v, x) for name, v in (("tv", tv2), ("tv3d", tv3), ("naive", naive))}
    print("PSNR on every other slice dropped:", {k: round(v, 2) for k, v in scores.items()})
    assert tv3.shape == x.shape and tv3.dtype == x.dtype
    assert scores["tv3d"] > scores["tv"] + 8.0
    for s in (1, 5):  # dropped slices inside a block: recovered
        assert float((tv3 - x)[:, s].square().mean()) < 1e-3
        assert float((tv2 - x)[:, s].square().mean()) > 0.05


def test_tv3d_beats_slice_by_slice_tv_on_kykz_undersampling():
    """4x (kz, ky) Poisson disc: 3-D TV about 42 dB, 2-D TV 33.6 dB, zero-filled 16.7 dB."""
    x = _blocks()
    op = build_kykz_fourier(tuple(x.shape[1:]), 4, 0.15, kind="poisson", sigma_y=0.01,
                            seed=0).double()
    y = op.measure(x, generator=0)
    tv2, tv3 = TotalVariation(op, 0.003).solve(y), TotalVariation3D(op, 0.003).solve(y)
    naive = op.pseudo_inverse(y)
    scores = {name: psnr(v, x) for name, v in (("tv", tv2), ("tv3d", tv3), ("naive", naive))}
    print("PSNR at 4x (kz, ky) Poisson disc:", {k: round(v, 2) for k, v in scores.items()})
    assert scores["tv3d"] > scores["tv"] + 3.0 and scores["tv"] > scores["naive"] + 3.0


def test_tv3d_differences_are_not_circular_along_z():
    """A volume constant in-plane and linear in z has 3-D TV (S - 1) |slope| H W: no wrap-around
    difference between the first and last slice."""
    import numpy as np

    s, h, w = 5, 3, 4
    vol = np.broadcast_to(np.arange(s, dtype=np.float64)[:, None, None], (1, s, h, w)).copy()
    op = build_slice_drop((s, h, w), factor=1)
    d = TotalVariation3D(op, 0.01).differences(vol.shape)
    assert float(np.abs(d(vol)).sum()) == (s - 1) * h * w
    two_d = TotalVariation(op, 0.01).differences(vol.shape)
    assert float(np.abs(two_d(vol)).sum()) == 0.0
    v = np.random.default_rng(0).standard_normal(d.oshape)
    u = np.random.default_rng(1).standard_normal(d.ishape)
    assert abs(float((d(u) * v).sum() - (u * d.H(v)).sum())) < 1e-10


def test_the_config_layer_builds_the_volume_operators_and_tv3d_by_name():
    from recon.config import BaselineConfig, OperatorConfig

    op = OPERATORS["kykz_fourier"]((6, 8, 4), acceleration=4, kind="poisson", sigma_y=0.01,
                                   seed=0)
    assert isinstance(op, KyKzFourier) and op.real_output and op.sigma_y == 0.01
    assert torch.equal(op.mask, build_kykz_fourier((6, 8, 4), 4, kind="poisson", seed=0).mask)
    cfg = OperatorConfig(name="kykz_fourier", params={"acceleration": 3, "kind": "random"})
    assert isinstance(cfg.build((6, 8, 4), sigma_y=0.01, seed=0), KyKzFourier)
    drop = OperatorConfig(name="slice_drop", params={"factor": 3}).build(
        (4, 8, 4), sigma_y=0.0, seed=0, indices=[3, 4, 5, 6])
    assert isinstance(drop, SliceDrop) and drop.kept.tolist() == [True, False, False, True]
    with pytest.raises(ValueError, match="unknown parameter"):
        OperatorConfig(name="slice_drop", params={"keep": 0.5})
    assert BASELINES["tv3d"] is TotalVariation3D
    assert isinstance(BaselineConfig(name="tv3d", params={"lam": 0.01}).build(op),
                      TotalVariation3D)
