r"""Undersampled MRI: the orthonormal centred 2-D Fourier transform and ``UndersampledFourier``.

Centred orthonormal DFT on the last two dims (DC at index ``(H // 2, W // 2)``):

    fft2c(x)  = fftshift(fft2(ifftshift(x), norm="ortho"))
    ifft2c(k) = fftshift(ifft2(ifftshift(k), norm="ortho")) = fft2c^H(k) = fft2c^{-1}(k)

The masks and coil maps it takes are drawn by ``recon.operators.kspace_patterns``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from recon.operators.base import (
    Operator,
    _shape,
    binary_mask,
    check_trailing_shape,
    complex_dtype,
    real_dtype,
)
from recon.operators.kspace_patterns import (
    MAX_COILS,
    birdcage_maps,
    cartesian_mask,
    variable_density_mask,
)

_DIMS = (-2, -1)


def fft2c(x: Tensor) -> Tensor:
    """Centred orthonormal 2-D DFT over the last two dims."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=_DIMS), norm="ortho"),
                              dim=_DIMS)


def ifft2c(k: Tensor) -> Tensor:
    """Inverse (= adjoint) of ``fft2c``."""
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=_DIMS), norm="ortho"),
                              dim=_DIMS)


def spectral_dims(mask: Tensor) -> tuple[int, ...]:
    """The image axes ``F^H M F`` has to transform for the k-space ``mask``: ``(-1,)`` when every
    sampled line runs along dim -2 (the mask is constant down each column: Cartesian
    phase-encode lines), so ``F = F_0 (x) F_1`` and ``F^H (1 (x) m) F = I (x) F_1^H m F_1``;
    ``(-2,)`` for rows; both for a 2-D pattern."""
    if bool((mask == mask[..., :1, :]).all()):
        return (-1,)
    if bool((mask == mask[..., :1]).all()):
        return (-2,)
    return _DIMS


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
        self.spectral_dims = spectral_dims(self.mask)
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
        dims = self.spectral_dims
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
        dims = self.spectral_dims
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
