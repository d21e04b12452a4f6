"""Measurement operators: exact adjoints, mask statistics, isometry, seeding, input checks."""

import math

import numpy as np
import pytest
import scipy.ndimage
import torch

from recon.operators import (
    Blur,
    Mask,
    UndersampledFourier,
    birdcage_maps,
    box_mask,
    cartesian_mask,
    fft2c,
    gaussian_kernel,
    ifft2c,
    missing_slices_mask,
    random_pixel_mask,
    variable_density_mask,
)

F64, C128 = torch.float64, torch.complex128


def rand(shape, dtype, seed):
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def inner(a, b):
    """<a, b> = sum(conj(a) b)."""
    return (a.conj() * b).sum()


def adjoint_gap(op, x, y):
    """|<Ax, y> - <x, A^H y>| / |<Ax, y>|, with the real part where the image domain is real."""
    lhs, rhs = inner(op(x), y), inner(x, op.adjoint(y))
    if not x.is_complex():
        lhs = lhs.real  # real domain: adjoint for Re<., .>; <x, A^H y> is then real
        assert not rhs.is_complex()
    return float((lhs - rhs).abs() / lhs.abs())


# ---- operators used in several tests (small shapes: 2 CPU cores) ------------------------------
H, W = 16, 20
MASKS_2D = {
    "pixels": lambda: random_pixel_mask((H, W), 0.3, generator=0),
    "box_centred": lambda: box_mask((H, W), 0.25),
    "box_random": lambda: box_mask((H, W), 0.25, centred=False, generator=1),
    "rows": lambda: missing_slices_mask((H, W), 0.5, axis=-2, generator=2),
}
KSPACE_MASKS = {
    "random4": lambda: cartesian_mask((H, W), 4, 0.08, kind="random", generator=0),
    "equispaced8": lambda: cartesian_mask((H, W), 8, 0.04, kind="equispaced", generator=0),
    "rows": lambda: cartesian_mask((H, W), 4, 0.08, axis=-2, generator=3),
    "vd_gauss": lambda: variable_density_mask((H, W), 4, 0.08, generator=0),
    "vd_poly": lambda: variable_density_mask((H, W), 3, 0.1, density="polynomial", generator=0),
}


def maps(n=4, shape=(H, W)):
    return birdcage_maps(shape, n, dtype=C128)


# ---- adjointness ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", MASKS_2D)
@pytest.mark.parametrize("dtype", [F64, C128])
def test_mask_adjoint(name, dtype):
    op = Mask(MASKS_2D[name]())
    x, y = rand((2, 3, H, W), dtype, 0), rand((2, 3, H, W), dtype, 1)
    assert adjoint_gap(op, x, y) < 1e-6


def test_mask_adjoint_on_volumes():
    d = 6
    for m in (missing_slices_mask((d, H, W), 0.5, axis=0, generator=0),  # whole slices
              box_mask((d, H, W), 0.2, centred=False, generator=0),     # cuboid hole
              random_pixel_mask((H, W), 0.5, generator=0)):              # same mask per slice
        op = Mask(m)
        x, y = rand((2, 1, d, H, W), F64, 0), rand((2, 1, d, H, W), F64, 1)
        assert adjoint_gap(op, x, y) < 1e-6


@pytest.mark.parametrize("blur", [
    lambda: Blur(sigma=1.2),
    lambda: Blur(rand((4, 5), F64, 7)),          # asymmetric, even-sized: checks the flip/conj
    lambda: Blur(rand((23, 25), F64, 8)),        # larger than the image: wrapped
], ids=["gauss", "asym_even", "wrapped"])
@pytest.mark.parametrize("dtype", [F64, C128])
def test_blur_adjoint(blur, dtype):
    op = blur()
    x, y = rand((2, 2, H, W), dtype, 0), rand((2, 2, H, W), dtype, 1)
    assert adjoint_gap(op, x, y) < 1e-6
    xv, yv = rand((1, 1, 3, H, W), dtype, 2), rand((1, 1, 3, H, W), dtype, 3)  # volume, slicewise
    assert adjoint_gap(op, xv, yv) < 1e-6


@pytest.mark.parametrize("name", KSPACE_MASKS)
@pytest.mark.parametrize("coils", [None, 4], ids=["single", "multicoil"])
def test_fourier_adjoint_complex_domain(name, coils):
    op = UndersampledFourier(KSPACE_MASKS[name](), None if coils is None else maps(coils))
    x = rand((2, 1, H, W), C128, 0)
    y = rand(op.measurement_shape(x.shape), C128, 1)
    assert adjoint_gap(op, x, y) < 1e-6


@pytest.mark.parametrize("name", KSPACE_MASKS)
@pytest.mark.parametrize("coils", [None, 3], ids=["single", "multicoil"])
def test_fourier_adjoint_real_domain(name, coils):
    """real_output=True: A maps R^N -> C^M; its adjoint for Re<.,.> is Re(A^H y)."""
    op = UndersampledFourier(KSPACE_MASKS[name](), None if coils is None else maps(coils),
                             real_output=True)
    x = rand((2, 1, H, W), F64, 0)
    y = rand(op.measurement_shape(x.shape), C128, 1)
    assert op.adjoint(y).dtype == F64
    assert adjoint_gap(op, x, y) < 1e-6
    # without real_output, A^H y is complex and only its real part pairs with a real x
    complex_op = UndersampledFourier(op.mask, op.coil_maps)
    assert torch.equal(complex_op.adjoint(y).real, op.adjoint(y))


def test_fourier_adjoint_odd_shape():
    m = variable_density_mask((15, 17), 3, 0.1, generator=0)
    op = UndersampledFourier(m, birdcage_maps((15, 17), 3, dtype=C128))
    x = rand((1, 1, 15, 17), C128, 0)
    assert adjoint_gap(op, x, rand(op.measurement_shape(x.shape), C128, 1)) < 1e-6
    full = UndersampledFourier(torch.ones(15, 17), birdcage_maps((15, 17), 3, dtype=C128))
    torch.testing.assert_close(full.normal(x), x)


@pytest.mark.parametrize("shape", [(8, 6), (9, 7)], ids=["even", "odd"])
@pytest.mark.parametrize("coils", [None, 3], ids=["single", "multicoil"])
@pytest.mark.parametrize("real_output", [False, True])
@pytest.mark.parametrize("kind,dims", [("points", (-2, -1)), ("columns", (-1,)), ("rows", (-2,))])
def test_fourier_normal_without_the_centring_shifts_is_adjoint_of_forward(shape, coils,
                                                                          real_output, kind,
                                                                          dims):
    """``UndersampledFourier.normal`` runs ``F^H M F`` on the uncentred grid, along the axes
    the mask varies on only (Cartesian lines: one): equal to ``A^H (A x)`` through the centred
    2-D transforms, for real and complex images."""
    m = {"points": lambda: variable_density_mask(shape, 3, 0.2, generator=1),
         "columns": lambda: cartesian_mask(shape, 3, 0.2, generator=1),
         "rows": lambda: cartesian_mask(shape, 3, 0.2, axis=-2, generator=1)}[kind]()
    assert UndersampledFourier(m).spectral_dims == dims
    op = UndersampledFourier(m, None if coils is None else birdcage_maps(shape, coils,
                                                                         dtype=C128),
                             real_output=real_output)
    for dtype in (F64,) if real_output else (F64, C128):
        x = rand((2, 1, *shape), dtype, 0)
        torch.testing.assert_close(op.normal(x), op.adjoint(op(x)), atol=1e-12, rtol=0)


def test_fourier_adjoint_on_volumes():
    d = 3
    per_slice = torch.stack([cartesian_mask((H, W), 4, 0.08, generator=s) for s in range(d)])
    for op in (UndersampledFourier(KSPACE_MASKS["random4"]()),            # same mask per slice
               UndersampledFourier(per_slice, maps(2)),                    # mask (D, H, W) + coils
               UndersampledFourier(per_slice, maps(2), real_output=True)):
        dtype = F64 if op.real_output else C128
        x = rand((2, 1, d, H, W), dtype, 0)
        y = rand(op.measurement_shape(x.shape), C128, 1)
        assert op(x).shape == op.measurement_shape(x.shape)
        assert adjoint_gap(op, x, y) < 1e-6
    assert UndersampledFourier(per_slice, maps(2)).measurement_shape((2, 1, d, H, W)) == \
        (2, 1, d, 2, H, W)


def test_float32_operators_are_adjoint_to_float32_precision():
    for op in (Mask(MASKS_2D["pixels"]()), Blur(sigma=1.0),
               UndersampledFourier(KSPACE_MASKS["random4"](),
                                   birdcage_maps((H, W), 4, dtype=torch.complex64))):
        x = rand((2, 1, H, W), torch.float32, 0)
        y = rand(op.measurement_shape(x.shape),
                 torch.complex64 if op.complex_measurements else torch.float32, 1)
        assert op(x).dtype == y.dtype
        assert op.adjoint(y).dtype == (torch.complex64 if op.complex_measurements
                                       else torch.float32)
        assert adjoint_gap(op, x.to(torch.complex64) if op.complex_measurements else x, y) < 1e-4


@pytest.mark.parametrize("op", [
    Mask(box_mask((H, W), 0.3)), Blur(rand((3, 4), F64, 0)),
    UndersampledFourier(cartesian_mask((H, W), 4, 0.08, generator=0), real_output=True),
], ids=["mask", "blur", "fourier"])
def test_autograd_gradient_equals_adjoint(op):
    """DPS differentiates ||y - A x||^2 with autograd: the gradient must be 2 A^H(A x - y)."""
    x = rand((1, 1, H, W), F64, 0).requires_grad_()
    y = op(rand((1, 1, H, W), F64, 1)).detach()
    (grad,) = torch.autograd.grad((op(x) - y).abs().square().sum(), x)
    torch.testing.assert_close(grad, 2 * op.adjoint(op(x) - y).detach())


# ---- correctness of the forward maps ---------------------------------------------------------
def test_gaussian_blur_equals_scipy_wrap():
    x = rand((2, 1, 24, 28), F64, 0)
    expected = scipy.ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, 1.5, 1.5), mode="wrap")
    torch.testing.assert_close(Blur(sigma=1.5)(x), torch.from_numpy(expected))
    assert gaussian_kernel(1.5).sum().item() == pytest.approx(1.0)


def test_blur_is_centred_circular_convolution():
    k, x = rand((3, 4), F64, 0), rand((7, 9), F64, 1)
    expected = sum(k[a, b] * torch.roll(x, (a - 1, b - 2), dims=(0, 1))
                   for a in range(3) for b in range(4))
    torch.testing.assert_close(Blur(k)(x), expected)


@pytest.mark.parametrize("h,w", [(8, 6), (7, 5)])
def test_fft2c_is_centred_and_orthonormal(h, w):
    k = fft2c(torch.ones(1, 1, h, w, dtype=C128))
    assert k[0, 0, h // 2, w // 2].real == pytest.approx(math.sqrt(h * w))
    assert k.abs().sum() == pytest.approx(math.sqrt(h * w))
    x = rand((2, h, w), C128, 0)
    torch.testing.assert_close(ifft2c(fft2c(x)), x)
    expected = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x.numpy(), axes=(-2, -1)),
                                           norm="ortho"), axes=(-2, -1))
    torch.testing.assert_close(fft2c(x), torch.from_numpy(expected))


def test_full_mask_fourier_is_isometric():
    full = torch.ones(H, W, dtype=torch.bool)
    x = rand((2, 1, H, W), C128, 0)
    for op in (UndersampledFourier(full), UndersampledFourier(full, maps(6))):
        y = op(x)
        assert y.norm().item() == pytest.approx(x.norm().item(), rel=1e-12)
        torch.testing.assert_close(op.adjoint(y), x)
        torch.testing.assert_close(op.pseudo_inverse(y), x)
    xr = rand((2, 1, H, W), F64, 1)
    op = UndersampledFourier(full, maps(6), real_output=True)
    torch.testing.assert_close(op.normal(xr), xr)


def test_rss_with_data_keeps_the_acquired_samples_and_is_the_reference_when_x_is_exact():
    """``rss_with_data(x, y)``: with a full mask it is the RSS of y's coil images whatever x
    is (a fully sampled scan's reference); with x exact and y = A x it is |x| sqrt(sum |S|^2);
    otherwise the acquired lines come from y and the rest from x's coil k-space."""
    s, mask = maps(6), KSPACE_MASKS["random4"]()
    x, other = rand((2, 1, H, W), C128, 0), rand((2, 1, H, W), C128, 1)
    full = UndersampledFourier(torch.ones(H, W, dtype=torch.bool), s)
    y = full(x) + 0.1 * rand((2, 1, 6, H, W), C128, 2)
    torch.testing.assert_close(full.rss_with_data(other, y),
                               ifft2c(y).abs().square().sum(-3).sqrt())
    op = UndersampledFourier(mask, s)
    torch.testing.assert_close(op.rss_with_data(x, op(x)),
                               x.abs() * s.abs().square().sum(0).sqrt())
    y = op(x) + 0.1 * op(rand((2, 1, H, W), C128, 3))
    coil_k = fft2c(other.unsqueeze(-3) * s)
    expected = ifft2c(torch.where(mask, y, coil_k)).abs().square().sum(-3).sqrt()
    torch.testing.assert_close(op.rss_with_data(other, y), expected)
    with pytest.raises(ValueError, match="needs coil maps"):
        UndersampledFourier(mask).rss_with_data(x, op(x)[:, :, 0])


def test_birdcage_maps_are_normalised_and_smooth():
    s = birdcage_maps((32, 24), 8, dtype=C128)
    assert s.shape == (8, 32, 24)
    torch.testing.assert_close(s.abs().square().sum(0), torch.ones(32, 24, dtype=F64))
    energy = fft2c(s).abs().square()  # smooth: k-space energy is concentrated at low frequencies
    assert energy[:, 12:21, 9:16].sum() > 0.95 * energy.sum()
    assert s[0].abs().std() > 0.05  # but not constant


def test_single_coil_zero_filled_is_pseudo_inverse():
    op = UndersampledFourier(KSPACE_MASKS["random4"]())
    y = op(rand((1, 1, H, W), C128, 0))
    x0 = op.pseudo_inverse(y)
    torch.testing.assert_close(op(x0), y)  # A A^+ y = y on the range of A
    torch.testing.assert_close(x0, ifft2c(y))


def test_baselines_of_mask_and_blur():
    m = MASKS_2D["box_centred"]()
    x = rand((1, 1, H, W), F64, 0)
    torch.testing.assert_close(Mask(m).pseudo_inverse(Mask(m)(x)), x * m)
    y = Blur(sigma=1.0)(x)
    torch.testing.assert_close(Blur(sigma=1.0).pseudo_inverse(y), y)


# ---- mask statistics ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["random", "equispaced"])
@pytest.mark.parametrize("acceleration,center_fraction,n", [(4, 0.08, 320), (8, 0.04, 368),
                                                            (6, 0.06, 256)])
def test_cartesian_fraction_and_centre(kind, acceleration, center_fraction, n):
    masks = torch.stack([cartesian_mask((2, n), acceleration, center_fraction, kind=kind,
                                        generator=s) for s in range(100)])
    assert (masks == masks[:, :1]).all()  # whole columns
    fractions = masks[:, 0].double().mean(1)
    assert abs(fractions.mean().item() - 1 / acceleration) < 0.01
    if kind == "equispaced":
        assert (fractions - 1 / acceleration).abs().max() < 0.02
    num_low = round(n * center_fraction)
    start = n // 2 - num_low // 2  # the DC line n // 2 of the centred FFT is inside
    assert masks[:, :, start:start + num_low].all()


def test_cartesian_rows_axis():
    m = cartesian_mask((40, 30), 4, 0.1, axis=-2, generator=0)
    assert (m == m[:, :1]).all() and m[18:22].all()


@pytest.mark.parametrize("density", ["gaussian", "polynomial"])
@pytest.mark.parametrize("acceleration", [4, 8])
def test_variable_density_fraction_centre_and_density(density, acceleration):
    h, w = 64, 48
    m = variable_density_mask((h, w), acceleration, 0.08, density=density, generator=0)
    assert int(m.sum()) == round(h * w / acceleration)
    assert m[h // 2 - 2:h // 2 + 3, w // 2 - 2:w // 2 + 2].all()  # the 5 x 4 centre box
    inner_ring = m[h // 4:3 * h // 4, w // 4:3 * w // 4].double().mean()
    outer = (m.sum() - m[h // 4:3 * h // 4, w // 4:3 * w // 4].sum()) / (h * w * 3 / 4)
    assert inner_ring > 2 * outer


@pytest.mark.parametrize("make,frac", [
    (lambda s: random_pixel_mask((10, 10), 0.37, generator=s), 0.37),
    (lambda s: box_mask((10, 10), 0.36, centred=False, generator=s), 0.64),
    (lambda s: missing_slices_mask((10, 10), 0.3, generator=s), 0.7),
    (lambda s: missing_slices_mask((5, 10, 10), 0.4, axis=0, generator=s), 0.6),
])
def test_inpainting_masks_keep_the_requested_fraction(make, frac):
    assert make(0).double().mean().item() == pytest.approx(frac)


def test_missing_slices_drop_whole_slices():
    m = missing_slices_mask((6, 5, 4), 0.5, axis=0, generator=0)
    per_slice = m.reshape(6, -1)
    assert ((per_slice.all(1)) | (~per_slice.any(1))).all() and int(per_slice.all(1).sum()) == 3


# ---- seeding -------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda g: random_pixel_mask((H, W), 0.3, generator=g),
    lambda g: box_mask((H, W), 0.2, centred=False, generator=g),
    lambda g: missing_slices_mask((H, W), 0.5, generator=g),
    lambda g: cartesian_mask((H, 64), 4, 0.08, generator=g),
    lambda g: cartesian_mask((H, 64), 4, 0.08, kind="equispaced", generator=g),
    lambda g: variable_density_mask((H, W), 4, 0.08, generator=g),
], ids=["pixels", "box", "slices", "random_lines", "equispaced", "vd"])
def test_masks_are_reproducible(make):
    assert torch.equal(make(3), make(3))
    assert torch.equal(make(torch.Generator().manual_seed(3)), make(3))
    assert any(not torch.equal(make(3), make(s)) for s in (4, 5, 6))


def test_measure_noise_is_seeded_and_has_the_stated_variance():
    sigma = 0.5
    m = cartesian_mask((64, 64), 4, 0.08, generator=0)
    op = UndersampledFourier(m, maps(2, (64, 64)), sigma_y=sigma)
    x = torch.zeros(4, 1, 64, 64, dtype=F64)
    y = op.measure(x, generator=0)
    assert torch.equal(y, op.measure(x, generator=0))
    assert not torch.equal(y, op.measure(x, generator=1))
    sampled = y[..., m]
    assert (y[..., ~m] == 0).all()  # unsampled k-space stays zero
    assert sampled.abs().square().mean().item() == pytest.approx(sigma**2, rel=0.05)
    assert sampled.real.var().item() == pytest.approx(sigma**2 / 2, rel=0.05)
    assert sampled.imag.var().item() == pytest.approx(sigma**2 / 2, rel=0.05)
    mask_op = Mask(m, sigma_y=sigma)
    ym = mask_op.measure(x, generator=0)
    assert (ym[..., ~m] == 0).all() and ym[..., m].var().item() == pytest.approx(sigma**2, rel=0.05)
    yb = Blur(sigma=1.0, sigma_y=sigma).measure(x, generator=torch.Generator().manual_seed(0))
    assert yb.var().item() == pytest.approx(sigma**2, rel=0.05)
    assert torch.equal(Blur(sigma=1.0).measure(x + 1), Blur(sigma=1.0)(x + 1))  # sigma_y = 0


# ---- devices and dtypes --------------------------------------------------------------------
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_operators_follow_to_device_and_dtype(device):
    ops = [Mask(box_mask((H, W), 0.3)), Blur(sigma=1.0),
           UndersampledFourier(KSPACE_MASKS["random4"](), birdcage_maps((H, W), 3))]
    for op in ops:
        ref = op(rand((1, 1, H, W), F64, 0))
        op64 = op.to(device=device, dtype=F64)
        assert all(b.device.type == device for b in op64.buffers())
        out = op64(rand((1, 1, H, W), F64, 0).to(device))
        assert out.device.type == device
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-6)
    four = ops[2]
    assert four.coil_maps.dtype == C128 and four.coil_maps.imag.abs().max() > 0.1
    assert set(four.state_dict()) == {"mask", "coil_maps_real"}


# ---- bad input -----------------------------------------------------------------------------
def test_wrong_size_mask_names_expected_and_got():
    with pytest.raises(ValueError, match=r"expected trailing dims \(8, 8\), got \(16, 16\)"):
        Mask(torch.ones(8, 8))(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"expected trailing dims \(8, 8\), got \(16, 16\)"):
        UndersampledFourier(torch.ones(8, 8))(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"coil maps do not match.*expected.*\(8, 8\), "
                                         r"got \(16, 16\)"):
        UndersampledFourier(torch.ones(8, 8), birdcage_maps((16, 16), 2))
    with pytest.raises(ValueError, match="binary"):
        Mask(torch.full((8, 8), 0.5))


@pytest.mark.parametrize("make", [lambda s: Mask(torch.ones(4, 4), sigma_y=s),
                                  lambda s: Blur(sigma=1.0, sigma_y=s),
                                  lambda s: UndersampledFourier(torch.ones(4, 4), sigma_y=s)],
                         ids=["mask", "blur", "fourier"])
def test_negative_sigma_y(make):
    with pytest.raises(ValueError, match="sigma_y"):
        make(-0.1)
    op = make(0.0)
    with pytest.raises(ValueError, match="sigma_y"):
        op.sigma_y = float("nan")


def test_bad_measurements_are_named():
    op = UndersampledFourier(torch.ones(8, 8), birdcage_maps((8, 8), 2))
    good = op(torch.zeros(1, 1, 8, 8))
    op.check_measurement(good, x_shape=(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"y of shape .*expected trailing dims \(2, 8, 8\)"):
        op.pseudo_inverse(torch.zeros(1, 1, 8, 8, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"y of shape .*expected trailing dims \(2, 8, 8\)"):
        op.adjoint(torch.zeros(1, 3, 8, 8, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"measured with shape \(1, 2, 2, 8, 8\)"):
        op.check_measurement(good, x_shape=(1, 2, 8, 8))
    with pytest.raises(ValueError, match="must be complex"):
        op.pseudo_inverse(good.real)
    with pytest.raises(ValueError, match="must be complex"):
        op.adjoint(good.abs())
    bad = good.clone()
    bad[0, 0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        op.pseudo_inverse(bad)
    with pytest.raises(ValueError, match="NaN/Inf"):
        Mask(torch.ones(8, 8)).check_measurement(torch.full((1, 1, 8, 8), float("inf")))
    with pytest.raises(ValueError, match=r"y of shape.*expected trailing dims \(8, 8\)"):
        Mask(torch.ones(8, 8)).pseudo_inverse(torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match="floating-point"):
        Blur(sigma=1.0).pseudo_inverse(torch.zeros(1, 1, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="must be real"):
        UndersampledFourier(torch.ones(8, 8), real_output=True)(torch.zeros(1, 1, 8, 8, dtype=C128))


def test_bad_mask_parameters():
    with pytest.raises(ValueError, match="center_fraction"):
        cartesian_mask((16, 64), 8, 0.5)
    with pytest.raises(ValueError, match="kind"):
        cartesian_mask((16, 64), 4, 0.08, kind="spiral")
    with pytest.raises(ValueError, match="acceleration"):
        variable_density_mask((16, 16), 0.5)
    with pytest.raises(ValueError, match="keep"):
        random_pixel_mask((4, 4), 1.5)
    with pytest.raises(ValueError, match="exactly one"):
        Blur(torch.ones(3, 3), sigma=1.0)
    with pytest.raises(ValueError, match="radius"):
        birdcage_maps((8, 8), 4, radius=1.0)


# -- prox: argmin ||y - A x||^2 + lam ||x - x0||^2 ----------------------------------------------
def _prox_residual(op, x, x0, y, lam):
    """The optimality condition Re(A^H (A x - y)) + lam (x - x0), relative to |A^H y| + lam |x0|."""
    g = op.adjoint(op(x) - y)
    g = (g.real if g.is_complex() and not x.is_complex() else g) + lam * (x - x0)
    scale = op.adjoint(y).abs().norm() + lam * x0.abs().norm()
    return float(g.abs().norm() / scale)


@pytest.mark.parametrize("lam", [0.05, 1.0, 20.0])
@pytest.mark.parametrize("make", [
    lambda: Mask(random_pixel_mask((12, 10), 0.4, 1), sigma_y=0.1),
    lambda: Blur(sigma=1.3, sigma_y=0.1),
    lambda: UndersampledFourier(cartesian_mask((12, 10), 4, 0.1, generator=2), sigma_y=0.1),
    lambda: UndersampledFourier(cartesian_mask((12, 10), 4, 0.1, generator=2),
                                coil_maps=birdcage_maps((12, 10), 3), sigma_y=0.1),
], ids=["mask", "blur", "fourier", "fourier-multicoil-cg"])
def test_prox_solves_the_regularised_least_squares(make, lam):
    op = make().double()
    dtype = C128 if isinstance(op, UndersampledFourier) else F64
    x_true, x0 = rand((2, 1, 12, 10), dtype, 3), rand((2, 1, 12, 10), dtype, 4)
    y = op.measure(x_true, generator=5)
    x = op.prox(x0, y, lam, steps=60)
    assert _prox_residual(op, x, x0, y, lam) < 1e-6


@pytest.mark.parametrize("shape", [(12, 10), (9, 7)], ids=["even", "odd"])
@pytest.mark.parametrize("lam", [0.05, 20.0])
def test_blur_prox_of_real_images_on_the_half_spectrum_is_the_full_one(shape, lam):
    """Real images and a real y take the real FFT's half spectrum (``Blur.proximal``): the
    minimiser, equal to the full complex prox's real part, on even and odd grids."""
    op = Blur(sigma=1.3, sigma_y=0.1).double()
    x0 = rand((2, 1, *shape), F64, 1)
    y = op.measure(rand((2, 1, *shape), F64, 2), generator=3)
    x = op.prox(x0, y, lam)
    assert not x.is_complex() and x.shape == x0.shape
    assert _prox_residual(op, x, x0, y, lam) < 1e-9
    torch.testing.assert_close(x, op.prox(x0.to(C128), y, lam).real, atol=1e-12, rtol=0)
    torch.testing.assert_close(op.proximal(y)(x0, lam), x, atol=0, rtol=0)


def test_prox_hard_data_consistency():
    """lam = 0 keeps the measured data exactly and x0 elsewhere."""
    m = random_pixel_mask((8, 8), 0.5, 0)
    op = Mask(m, sigma_y=0.0).double()
    x0, y = rand((1, 1, 8, 8), F64, 1), op(rand((1, 1, 8, 8), F64, 2))
    x = op.prox(x0, y, 0.0)
    assert torch.equal(x[..., m], y[..., m]) and torch.equal(x[..., ~m], x0[..., ~m])


def _symmetric(mask):
    """mask | M(-k): conjugate-symmetric on the centred grid."""
    return mask | UndersampledFourier(mask).mirrored_mask()


@pytest.mark.parametrize("shape", [(8, 8), (9, 7), (10, 13)], ids=["even", "odd", "mixed"])
@pytest.mark.parametrize("lam", [0.0, 0.3, 5.0])
@pytest.mark.parametrize("kind", ["lines", "lines-symmetric", "points", "rows-symmetric"])
def test_real_fourier_prox_is_the_exact_real_minimiser(shape, lam, kind):
    """For real images the closed form pairs k with -k; it equals the real problem solved by
    conjugate gradient (``Operator.prox``) to 1e-5, whether or not the mask is symmetric under
    k -> -k, and it is the real part of the complex prox only when it is."""
    make = {"lines": lambda: cartesian_mask(shape, 3, 0.2, generator=1),
            "lines-symmetric": lambda: _symmetric(cartesian_mask(shape, 3, 0.2, generator=1)),
            "points": lambda: variable_density_mask(shape, 3, 0.2, generator=2),
            "rows-symmetric": lambda: _symmetric(cartesian_mask(shape, 3, 0.2, axis=-2,
                                                                generator=3))}[kind]
    mask = make()
    real = UndersampledFourier(mask, sigma_y=0.1, real_output=True).double()
    y = real.measure(rand((2, 1, *shape), F64, 4), generator=5)
    x0 = rand((2, 1, *shape), F64, 6)
    x = real.prox(x0, y, lam)
    assert not x.is_complex()
    reference = super(UndersampledFourier, real).prox(x0, y, lam, steps=4 * mask.numel())
    torch.testing.assert_close(x, reference, atol=1e-5, rtol=0)
    assert _prox_residual(real, x, x0, y, lam) < 1e-9
    loose = UndersampledFourier(mask, sigma_y=0.1).double().prox(x0.to(C128), y, lam).real
    symmetric = bool((real.mirrored_mask() == mask).all())
    assert symmetric == torch.allclose(loose, x, atol=1e-9), kind
    # the real prox never leaves a higher objective than the real part of the complex one
    def objective(v):
        return float((y - real(v)).abs().square().sum() + lam * (v - x0).square().sum())
    assert objective(x) <= objective(loose) + 1e-12


@pytest.mark.parametrize("n", [6, 7])
def test_mirrored_mask_is_the_mask_at_minus_k(n):
    """M(-k) on the centred grid: index i holds frequency i - n//2."""
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[1, 4] = True  # frequency (1 - n//2, 4 - n//2)
    mirrored = UndersampledFourier(mask).mirrored_mask()
    c = n // 2
    assert mirrored.sum() == 1 and mirrored[(2 * c - 1) % n, (2 * c - 4) % n]
    # a real image's spectrum is conjugate-symmetric on exactly that pairing
    k = fft2c(rand((n, n), F64, 0).to(C128))
    flipped = torch.roll(torch.flip(k, (-2, -1)), (1 - n % 2, 1 - n % 2), (-2, -1))
    torch.testing.assert_close(flipped, k.conj())


def test_real_fourier_prox_in_float32_with_a_tiny_lam_stays_bounded():
    """At the start of a chain lam is ~1e-10: where neither k nor -k is sampled, float32
    round-off of the FFTs divided by lam once flooded the image (+-3000 from inputs in [0, 1]).
    There the prox keeps F x0 exactly."""
    op = UndersampledFourier(cartesian_mask((48, 40), 4, 0.08, generator=0), sigma_y=0.01,
                             real_output=True)
    x = torch.rand(1, 1, 48, 40, generator=torch.Generator().manual_seed(0))
    y = op.measure(x, generator=1)
    x0 = torch.rand(1, 1, 48, 40, generator=torch.Generator().manual_seed(2))
    for lam in (1e-10, 1e-6, 1e-2):
        out = op.prox(x0, y, lam)
        assert out.dtype == torch.float32 and float(out.abs().max()) < 3.0, lam
        reference = op.double().prox(x0.double(), y.to(torch.complex128), lam)
        op.float()
        torch.testing.assert_close(out.double(), reference, atol=1e-4, rtol=0)
