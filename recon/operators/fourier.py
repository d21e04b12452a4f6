r"""Undersampled MRI: orthonormal centred 2-D Fourier transform, k-space masks, coil maps.

Centred orthonormal DFT on the last two dims (DC at index ``(H // 2, W // 2)``):

    fft2c(x)  = fftshift(fft2(ifftshift(x), norm="ortho"))
    ifft2c(k) = fftshift(ifft2(ifftshift(k), norm="ortho")) = fft2c^H(k) = fft2c^{-1}(k)

Mask generators return boolean tensors (True = sampled) in the same centred layout and take a
``torch.Generator`` or an int seed:

- ``cartesian_mask``: fastMRI-style lines (``RandomMaskFunc`` / ``EquispacedMaskFractionFunc``
  logic) with a fully sampled centre of ``round(n * center_fraction)`` lines; the expected
  sampled fraction is ``1 / acceleration``. Usual pairs: (4, 0.08) and (8, 0.04).
- ``variable_density_mask``: 2-D random points drawn from a radial density, exactly
  ``round(H * W / acceleration)`` points including a fully sampled central box.
- ``birdcage_maps``: smooth synthetic coil sensitivities with ``sum_c |S_c|^2 = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from recon.operators.base import (
    Operator,
    Seed,
    _check_fraction,
    _shape,
    as_generator,
    binary_mask,
    check_trailing_shape,
    complex_dtype,
    real_dtype,
)

_DIMS = (-2, -1)
MAX_COILS = 64
"""The most simulated coils (receive arrays have up to 64 channels; 64 maps of a 512 x 512 slice
in complex64 are 128 MiB)."""


def fft2c(x: Tensor) -> Tensor:
    """Centred orthonormal 2-D DFT over the last two dims."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=_DIMS), norm="ortho"),
                              dim=_DIMS)


def ifft2c(k: Tensor) -> Tensor:
    """Inverse (= adjoint) of ``fft2c``."""
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=_DIMS), norm="ortho"),
                              dim=_DIMS)


def _check_acceleration(acceleration: float, center_fraction: float) -> tuple[float, float]:
    acceleration, center_fraction = float(acceleration), float(center_fraction)
    if not (math.isfinite(acceleration) and acceleration >= 1.0):
        raise ValueError(f"acceleration must be a finite number >= 1, got {acceleration}")
    return acceleration, _check_fraction(center_fraction, "center_fraction")


def _check_2d(shape: Sequence[int]) -> tuple[int, int]:
    shape = _shape(shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"a k-space mask shape must be (H, W) with positive sizes, got {shape}")
    return shape


def _centre(n: int, num_low: int) -> slice:
    """The ``num_low`` central indices, fastMRI's ``pad = (n - num_low + 1) // 2``."""
    pad = (n - num_low + 1) // 2
    return slice(pad, pad + num_low)


def cartesian_mask(shape: Sequence[int], acceleration: float = 4, center_fraction: float = 0.08,
                   kind: str = "random", axis: int = -1, generator: Seed = None) -> Tensor:
    """Cartesian line mask of shape ``(H, W)``: whole lines chosen along ``axis``.

    With ``n = shape[axis]`` lines (``axis=-1``: columns, fastMRI's phase-encode convention),
    ``num_low = round(n * center_fraction)`` central lines are always sampled, and

    - ``kind="random"`` (fastMRI ``RandomMaskFunc``): every line is also sampled independently
      with probability ``p = (n / acceleration - num_low) / (n - num_low)``, so the expected
      number of sampled lines is ``n / acceleration``;
    - ``kind="equispaced"`` (fastMRI ``EquispacedMaskFractionFunc``): lines at
      ``round(offset + j * a)`` for ``0 <= offset + j a < n - 1`` with the adjusted spacing
      ``a = acceleration (num_low - n) / (num_low acceleration - n)`` and a random integer
      ``offset`` in ``[0, round(a))``, so that the total is about ``n / acceleration``.
    """
    h, w = _check_2d(shape)
    acceleration, center_fraction = _check_acceleration(acceleration, center_fraction)
    if axis not in (-1, -2, 0, 1):
        raise ValueError(f"axis must be -1 (columns) or -2 (rows), got {axis}")
    n = (h, w)[axis]
    num_low = round(n * center_fraction)
    if num_low * acceleration > n:
        raise ValueError(f"center_fraction={center_fraction} gives {num_low} centre lines, more "
                         f"than the n/acceleration = {n / acceleration:.1f} lines allowed")
    gen = as_generator(generator)
    line = torch.zeros(n, dtype=torch.bool)
    line[_centre(n, num_low)] = True
    if kind == "random":
        if num_low < n:
            prob = (n / acceleration - num_low) / (n - num_low)
            line |= torch.rand(n, generator=gen, dtype=torch.float64) < prob
    elif kind == "equispaced":
        if num_low * acceleration < n:
            spacing = acceleration * (num_low - n) / (num_low * acceleration - n)
            offset = int(torch.randint(0, round(spacing), (1,), generator=gen))
            picks = torch.arange(offset, n - 1, spacing, dtype=torch.float64).round().long()
            line[picks] = True
    else:
        raise ValueError(f"kind must be 'random' or 'equispaced', got {kind!r}")
    view = (1, n) if axis in (-1, 1) else (n, 1)
    return line.reshape(view).expand(h, w).clone()


def variable_density_mask(shape: Sequence[int], acceleration: float = 4,
                          center_fraction: float = 0.08, density: str = "gaussian",
                          std: float = 0.3, power: float = 2.0, generator: Seed = None) -> Tensor:
    """2-D variable-density random mask of shape ``(H, W)`` with a fully sampled centre.

    A central box of ``round(H c) x round(W c)`` points (``c = center_fraction``) is always
    sampled; the rest of the ``round(H W / acceleration)`` points are drawn without replacement
    with weights from the normalised radius ``r = |(ky / (H/2), kx / (W/2))|`` (``r = 1`` at the
    middle of each edge):

    - ``density="gaussian"``: ``exp(-r^2 / (2 std^2))``;
    - ``density="polynomial"``: ``(1 - r / sqrt(2))^power`` (zero at the corners).
    """
    h, w = _check_2d(shape)
    acceleration, center_fraction = _check_acceleration(acceleration, center_fraction)
    ky = (torch.arange(h, dtype=torch.float64) - h // 2) / (h / 2)
    kx = (torch.arange(w, dtype=torch.float64) - w // 2) / (w / 2)
    r = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
    if density == "gaussian":
        if not std > 0:
            raise ValueError(f"std must be positive, got {std}")
        weight = torch.exp(-0.5 * (r / std) ** 2)
    elif density == "polynomial":
        if not power > 0:
            raise ValueError(f"power must be positive, got {power}")
        weight = (1.0 - r / math.sqrt(2.0)).clamp(min=0.0) ** power
    else:
        raise ValueError(f"density must be 'gaussian' or 'polynomial', got {density!r}")
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[_centre(h, round(h * center_fraction)), _centre(w, round(w * center_fraction))] = True
    target = round(h * w / acceleration)
    extra = target - int(mask.sum())
    if extra < 0:
        raise ValueError(f"the fully sampled centre (center_fraction={center_fraction}) has "
                         f"{int(mask.sum())} points, more than the {target} allowed by "
                         f"acceleration={acceleration}")
    weight = weight.masked_fill(mask, 0.0).flatten()
    if extra > int((weight > 0).sum()):
        raise ValueError(f"the {density} density has too few non-zero points for "
                         f"acceleration={acceleration}")
    if extra > 0:
        picks = torch.multinomial(weight, extra, replacement=False,
                                  generator=as_generator(generator))
        mask.view(-1)[picks] = True
    return mask


def birdcage_maps(shape: Sequence[int], num_coils: int = 8, radius: float = 1.5,
                  dtype: torch.dtype = torch.complex64) -> Tensor:
    """Smooth synthetic birdcage coil sensitivities of shape ``(num_coils, H, W)``.

    Coil c sits at angle ``theta_c = 2 pi c / num_coils`` on a circle of ``radius`` (in units of
    the half field of view, > sqrt(2) so every coil is outside the image); its raw sensitivity is
    ``exp(i (phi - theta_c)) / d`` with d the distance to the coil and phi the angle seen from it.
    The maps are divided by their root-sum-of-squares, so ``sum_c |S_c|^2 = 1`` at every pixel.
    """
    h, w = _check_2d(shape)
    if isinstance(num_coils, bool) or not isinstance(num_coils, int) or num_coils < 1:
        raise ValueError(f"num_coils must be a positive integer, got {num_coils!r}")
    if not radius > math.sqrt(2.0):
        raise ValueError(f"radius must exceed sqrt(2) (coils outside the image), got {radius}")
    theta = 2 * math.pi * torch.arange(num_coils, dtype=torch.float64) / num_coils
    y = (torch.arange(h, dtype=torch.float64) - h / 2) / (h / 2)
    x = (torch.arange(w, dtype=torch.float64) - w / 2) / (w / 2)
    dx = x[None, None, :] - radius * torch.cos(theta)[:, None, None]
    dy = y[None, :, None] - radius * torch.sin(theta)[:, None, None]
    phase = torch.atan2(dx, -dy) - theta[:, None, None]
    maps = torch.polar(1.0 / torch.sqrt(dx**2 + dy**2), phase)
    maps = maps / torch.sqrt((maps.abs() ** 2).sum(0, keepdim=True))
    return maps.to(dtype)


class UndersampledFourier(Operator):
    r"""Undersampled (multi-coil) MRI: ``y_c = M ⊙ F(S_c x)`` with F = ``fft2c``.

    - ``A x``: for each coil c, ``M ⊙ fft2c(S_c ⊙ x)``; without coil maps, ``M ⊙ fft2c(x)``.
    - ``A^H y = sum_c conj(S_c) ⊙ ifft2c(M ⊙ y_c)``; without coil maps, ``ifft2c(M ⊙ y)``.
    - ``pseudo_inverse(y) = A^H y``: the zero-filled, coil-combined image. It is the exact
      Moore-Penrose pseudo-inverse for a single coil (``A A^H = diag(M)``) and the exact inverse
      for a full mask with maps normalised so that ``sum_c |S_c|^2 = 1`` (then ``A^H A = I``).

    Shapes: ``mask`` is ``(H, W)`` or ``(*M, H, W)`` (e.g. one mask per slice ``(D, H, W)``) and
    must equal x's trailing dims; ``coil_maps`` is ``(C_coils, H, W)``. An image
    ``(*lead, H, W)`` (``(B, C, H, W)``, or ``(B, C, D, H, W)`` slice by slice) gives complex
    k-space ``(*lead, H, W)``, or ``(*lead, C_coils, H, W)`` with coil maps.

    Real or complex images: ``real_output=False`` (default) treats images as complex; real
    inputs are promoted to complex and ``adjoint`` / ``pseudo_inverse`` return complex images,
    of which users take ``.abs()`` (the usual magnitude image) for display and metrics.
    ``real_output=True`` declares the image domain real (e.g. real-valued magnitude volumes and a
    real diffusion prior): ``forward`` requires real x and ``adjoint`` / ``pseudo_inverse``
    return ``.real``, which is the exact adjoint of ``x -> A x`` on real images for the inner
    product ``Re <a, b>`` (``Re <A x, y> = <x, Re A^H y>`` for real x), and the exact inverse
    when the mask is full. (For real x the zero-filled image is generally not real: an
    undersampling mask is not conjugate-symmetric.)

    ``measure`` adds complex noise (real and imaginary parts each ``N(0, sigma_y^2 / 2)``) to
    sampled k-space only.
    """

    complex_measurements = True

    def __init__(self, mask: Tensor, coil_maps: Tensor | None = None, sigma_y: float = 0.0,
                 real_output: bool = False):
        super().__init__(sigma_y)
        self.register_buffer("mask", binary_mask(mask))
        if coil_maps is not None:
            coil_maps = torch.as_tensor(coil_maps)
            if coil_maps.ndim != 3:
                raise ValueError(f"coil_maps must have shape (C_coils, H, W), got "
                                 f"{tuple(coil_maps.shape)}")
            expected = tuple(self.mask.shape[-2:])
            if tuple(coil_maps.shape[-2:]) != expected:
                raise ValueError(f"coil maps do not match the mask: expected image shape (H, W) = "
                                 f"{expected}, got {tuple(coil_maps.shape[-2:])}")
            if not coil_maps.is_complex():
                coil_maps = coil_maps.to(complex_dtype(coil_maps.dtype))
            # stored as a real view so that .to(torch.float64) keeps the imaginary part
            coil_maps = torch.view_as_real(coil_maps.resolve_conj()).clone()
        self.register_buffer("coil_maps_real", coil_maps)
        self.real_output = bool(real_output)

    @property
    def coil_maps(self) -> Tensor | None:
        """Complex coil maps ``(C_coils, H, W)``, or None for single-coil."""
        return None if self.coil_maps_real is None else torch.view_as_complex(self.coil_maps_real)

    @property
    def num_coils(self) -> int | None:
        return None if self.coil_maps_real is None else self.coil_maps_real.shape[0]

    @property
    def support(self) -> Tensor | None:
        """Where at least one coil map is non-zero (None: single coil, or maps non-zero
        everywhere). ESPIRiT maps are zero outside the object; the image is zero there."""
        if self.coil_maps_real is None:
            return None
        seen = (self.coil_maps_real != 0).any(dim=-1).any(dim=-3)
        return None if bool(seen.all()) else seen

    @property
    def acceleration(self) -> float:
        """Nominal acceleration ``numel(mask) / sum(mask)``."""
        return self.mask.numel() / max(int(self.mask.sum()), 1)

    def extra_repr(self) -> str:
        return (f"shape={tuple(self.mask.shape)}, acceleration={self.acceleration:.2f}, "
                f"num_coils={self.num_coils}, real_output={self.real_output}, "
                f"{super().extra_repr()}")

    def _kspace_mask(self) -> Tensor:
        return self.mask if self.coil_maps_real is None else self.mask.unsqueeze(-3)

    def _noise_support(self) -> Tensor:
        return self._kspace_mask()

    def _y_trailing(self) -> tuple[int, ...]:
        shape = tuple(self.mask.shape)
        return shape if self.num_coils is None else (*shape[:-2], self.num_coils, *shape[-2:])

    def _check_y_shape(self, y: Tensor) -> None:
        what = "the k-space of this operator" + ("" if self.num_coils is None else
                                                  f" ({self.num_coils} coils)")
        check_trailing_shape(y, self._y_trailing(), "y", what)

    def measurement_shape(self, x_shape: Sequence[int]) -> torch.Size:
        x_shape = _shape(x_shape)
        if self.num_coils is None:
            return torch.Size(x_shape)
        return torch.Size((*x_shape[:-2], self.num_coils, *x_shape[-2:]))

    def forward(self, x: Tensor) -> Tensor:
        self._check_x_dtype(x)
        if self.real_output and x.is_complex():
            raise ValueError("x must be real for UndersampledFourier(real_output=True), got dtype "
                             f"{x.dtype}")
        check_trailing_shape(x, self.mask.shape, "x", f"a mask of shape {tuple(self.mask.shape)}")
        x = x.to(complex_dtype(x.dtype))
        if self.coil_maps_real is not None:
            x = x.unsqueeze(-3) * self.coil_maps.to(x.dtype)
        return fft2c(x) * self._kspace_mask()

    def adjoint(self, y: Tensor) -> Tensor:
        self._check_y_dtype(y)
        self._check_y_shape(y)
        x = ifft2c(y * self._kspace_mask())
        if self.coil_maps_real is not None:
            x = (self.coil_maps.to(x.dtype).conj() * x).sum(-3)
        return x.real if self.real_output else x

    def pseudo_inverse(self, y: Tensor) -> Tensor:
        self.check_measurement(y)
        return self.adjoint(y)

    def spectral_dims(self) -> tuple[int, ...]:
        """The image axes ``F^H M F`` has to transform: ``(-1,)`` when every sampled line runs
        along dim -2 (the mask is constant down each column: Cartesian phase-encode lines), so
        ``F = F_0 (x) F_1`` and ``F^H (1 (x) m) F = I (x) F_1^H m F_1``; ``(-2,)`` for rows;
        both for a 2-D pattern."""
        m = self.mask
        if bool((m == m[..., :1, :]).all()):
            return (-1,)
        if bool((m == m[..., :1]).all()):
            return (-2,)
        return _DIMS

    def _spectral_mask(self, mask: Tensor, dims: tuple[int, ...]) -> Tensor:
        """``mask`` on the uncentred grid, reduced to the ``dims`` it varies along."""
        for d in set(_DIMS) - set(dims):
            mask = mask.narrow(d, 0, 1)
        return torch.fft.ifftshift(mask, dim=_DIMS)

    def normal(self, x: Tensor) -> Tensor:
        """``A^H A x = sum_c conj(S_c) F^H M F (S_c x)``: ``F^H M F`` is a circular convolution,
        which commutes with ``fft2c``'s centring shifts, so it runs on the uncentred grid with
        the mask shifted once, and only along the axes the mask varies on (``spectral_dims``):
        what conjugate gradient applies at every iteration."""
        check_trailing_shape(x, self.mask.shape, "x", f"a mask of shape {tuple(self.mask.shape)}")
        z = x.to(complex_dtype(x.dtype))
        if self.coil_maps_real is not None:
            z = z.unsqueeze(-3) * self.coil_maps.to(z.dtype)
        dims = self.spectral_dims()
        mask = self._spectral_mask(self._kspace_mask(), dims)
        z = torch.fft.ifftn(torch.fft.fftn(z, dim=dims) * mask, dim=dims)
        if self.coil_maps_real is not None:
            z = (self.coil_maps.to(z.dtype).conj() * z).sum(-3)
        return z.real if self.real_output else z

    def rss_with_data(self, x: Tensor, y: Tensor) -> Tensor:
        r"""``sqrt(sum_c |F^H(M ⊙ y_c + (1 - M) ⊙ F(S_c x))|^2)``: the root-sum-of-squares of
        x's coil images with the acquired samples ``y`` put back in their k-space; the fully
        sampled scan's root-sum-of-squares (the usual reference, noise floor included) when x
        is exact. Multi-coil: x ``(*lead, H, W)``, y ``(*lead, C_coils, H, W)``, broadcast."""
        if self.coil_maps_real is None:
            raise ValueError("rss_with_data needs coil maps (multi-coil k-space)")
        self._check_y_shape(y)
        k = fft2c(x.to(complex_dtype(x.dtype)).unsqueeze(-3) * self.coil_maps.to(y.dtype))
        return ifft2c(torch.where(self._kspace_mask(), y, k)).abs().square().sum(-3).sqrt()

    def mirrored_mask(self) -> Tensor:
        """``M(-k)``: the mask at the mirrored frequency. On the centred grid the frequency of
        index ``i`` is ``i - n // 2``, so ``-k`` sits at index ``(2 (n // 2) - i) mod n`` (a
        flip, then a roll by one for even ``n``, whose ``-n/2`` line is its own mirror)."""
        h, w = self.mask.shape[-2:]
        return torch.roll(torch.flip(self.mask, _DIMS), (1 - h % 2, 1 - w % 2), _DIMS)

    def prox(self, x0: Tensor, y: Tensor, lam: float, steps: int = 10, tol: float = 0.0) -> Tensor:
        r"""``argmin_x ||y - A x||^2 + lam ||x - x0||^2``.

        Single coil, closed form in k-space. Complex x0: ``(y + lam F x0) / (1 + lam)`` on
        sampled locations, ``F x0`` elsewhere, then ``F^H``. Real x0 (``real_output``, or a real
        image): the minimiser over *real* images. For real x, ``X(-k) = conj(X(k))``, so the
        normal operator ``Re(A^H A) = F^H diag(m) F`` with ``m(k) = (M(k) + M(-k)) / 2``: a
        line whose mirror is not sampled is measured at half weight. Hence

            X = (F Re(A^H y) + lam F x0) / (m + lam),     x = Re(F^H X)

        (``X = F x0`` where ``m + lam = 0``). Taking the real part of the complex solution
        instead moves such a line only half way to the data.

        Multi-coil: ``steps`` CG iterations at most, to ``tol`` (``Operator.prox``), over real images with
        ``real_output`` (the exact real prox), else over complex images; a real ``x0`` (a
        magnitude image, e.g. from a real-valued prior, whose phase the coil maps carry) then
        gets the *magnitude* of the complex solution back. That is the robust choice on measured
        data: the phase a low-resolution estimate misses (fat-water shift, vessels) stays in the
        data fit instead of aliasing into the image (measured on real 13-coil brain k-space:
        27.8 dB against 26.5 dB for the real part, the same on simulated data)."""
        if self.coil_maps_real is not None:
            if self.real_output or x0.is_complex():
                return super().prox(x0, y, lam, steps, tol)
            return super().prox(x0.to(complex_dtype(x0.dtype)), y, lam, steps, tol).abs()
        return self.proximal(y)(x0, lam)

    def proximal(self, y: Tensor) -> Callable[[Tensor, float], Tensor]:
        """``prox`` at this ``y``, single coil, with ``F Re(A^H y)`` and ``m`` computed once. For
        real images on the real FFT's half spectrum, without the centring shifts and along the
        axes the mask varies on only (``spectral_dims``): ``x = Re F^H (W F x0)`` with ``W``
        diagonal is a circular convolution, which commutes with the circular shifts of
        ``fft2c``, so it is ``irfftn(ifftshift(W) rfftn(x0))`` (``m`` is symmetric under
        ``k -> -k``, so the product is Hermitian)."""
        if self.coil_maps_real is not None:
            return super().proximal(y)
        dims = self.spectral_dims()
        sizes = [self.mask.shape[d] for d in dims]
        dtype = real_dtype(y.dtype)
        weight = 0.5 * (self.mask.to(dtype) + self.mirrored_mask().to(dtype))
        weight = self._spectral_mask(weight, dims).narrow(dims[-1], 0, sizes[-1] // 2 + 1)
        # where neither k nor -k is sampled the data term is zero: keep F x0 exactly (the FFTs'
        # round-off there, divided by a tiny lam, would otherwise flood the image)
        seen = weight > 0
        data = torch.fft.rfftn(ifft2c(y * self.mask).real, dim=dims)  # F Re(A^H y)

        def prox(x0: Tensor, lam: float) -> Tensor:
            if x0.is_complex():
                k0 = fft2c(x0)
                return ifft2c(torch.where(self.mask, (y + lam * k0) / (1.0 + lam), k0))
            k0 = torch.fft.rfftn(x0, dim=dims)
            denom = torch.where(seen, weight + lam, torch.ones((), dtype=weight.dtype,
                                                                 device=weight.device))
            return torch.fft.irfftn(torch.where(seen, (data + lam * k0) / denom, k0), s=sizes,
                                    dim=dims)

        return prox


def build_fourier(shape: Sequence[int], acceleration: float = 4.0, center_fraction: float = 0.08,
                  kind: str = "random", coils: int | None = None, *, sigma_y: float = 0.0,
                  seed: int = 0) -> UndersampledFourier:
    """Undersampled k-space: Cartesian lines (``kind="random"`` / ``"equispaced"``) or a 2-D
    ``"variable_density"`` mask at ``acceleration`` with a fully sampled centre; ``coils``:
    number of synthetic birdcage coil maps (None: single coil). Images are real
    (``real_output=True``), so the naive baseline is the real part of the zero-filled image."""
    gen = torch.Generator().manual_seed(seed)
    if kind in ("random", "equispaced"):
        m = cartesian_mask(shape, acceleration, center_fraction, kind=kind, generator=gen)
    elif kind == "variable_density":
        m = variable_density_mask(shape, acceleration, center_fraction, generator=gen)
    else:
        raise ValueError(f"unknown k-space mask kind {kind!r}; valid kinds: equispaced, random, "
                         "variable_density")
    maps = None
    if coils is not None:
        if isinstance(coils, bool) or not isinstance(coils, int) or not 1 <= coils <= MAX_COILS:
            raise ValueError(f"coils must be an integer in [1, {MAX_COILS}] or null, got {coils!r}")
        maps = birdcage_maps(shape, coils)  # normalised: sum_c |S_c|^2 = 1
    return UndersampledFourier(m, coil_maps=maps, sigma_y=sigma_y, real_output=True)


def build_acquired(shape: Sequence[int], *, sigma_y: float = 0.0, seed: int = 0) -> UndersampledFourier:
    """The sampling of raw k-space as it was acquired (``recon.reconstruct.raw``): it comes from the
    data, so there is nothing to build for an image volume."""
    raise ValueError("operator 'acquired' reconstructs raw k-space as it was measured: it "
                     "applies to manifest entries of kind: kspace only (use fourier to simulate "
                     "undersampled k-space from images)")
