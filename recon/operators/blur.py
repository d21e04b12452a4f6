r"""Deblurring: circular 2-D convolution computed with the FFT.

Boundary: periodic (circular). The image is treated as one period of a periodic signal, so pixels
near one edge are blurred with pixels from the opposite edge. This makes A exactly diagonal in
the Fourier basis, ``A = F^{-1} diag(K) F``, and its adjoint exact and cheap,
``A^H = F^{-1} diag(conj K) F`` (circular correlation with the same kernel). For a Gaussian blur
it equals ``scipy.ndimage.gaussian_filter(x, sigma, mode="wrap")`` on images at least as large
as the kernel. Kernels larger than the image are wrapped (folded) onto it, which is still the
exact circular convolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from recon.operators.base import Operator, real_dtype


def gaussian_kernel(sigma: float, truncate: float = 4.0,
                    dtype: torch.dtype = torch.float64) -> Tensor:
    """Normalised 2-D Gaussian ``exp(-(i^2 + j^2) / (2 sigma^2))`` on integer offsets.

    Size ``2 r + 1`` with radius ``r = int(truncate * sigma + 0.5)``, as in
    ``scipy.ndimage.gaussian_filter``; sums to 1.
    """
    sigma, truncate = float(sigma), float(truncate)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive finite number of pixels, got {sigma}")
    if not (math.isfinite(truncate) and truncate > 0):
        raise ValueError(f"truncate must be a positive finite number of sigmas, got {truncate}")
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (offsets / sigma) ** 2)
    g = g / g.sum()
    return torch.outer(g, g).to(dtype)


class Blur(Operator):
    r"""Blur with a real 2-D kernel ``k``, circular boundary: ``y = k ⊛ x`` on the last two dims.

    - ``A x = F^{-1}(K ⊙ F x)`` with ``K = F(k)``, ``k`` zero-padded to the image size and
      rolled so that its centre ``(kh // 2, kw // 2)`` sits at pixel (0, 0) (no shift).
    - ``A^H y = F^{-1}(conj(K) ⊙ F y)``: circular correlation with the same kernel.
    - ``pseudo_inverse(y) = y``: the naive baseline is the blurred image itself (nothing is
      deconvolved).

    ``F`` is the plain 2-D DFT over the last two dims; images ``(..., H, W)`` of any size,
    batched over leading dims (``(B, C, H, W)`` or slice by slice for ``(B, C, D, H, W)``).
    Real images give real measurements; complex images work too.

    Build it with ``Blur(sigma=2.0)`` (Gaussian from ``gaussian_kernel``, stored in float64) or
    ``Blur(kernel)`` with a user kernel of shape ``(kh, kw)`` (used as given, not normalised).
    The kernel is cast to the input's precision on the fly.
    """

    def __init__(self, kernel: Tensor | None = None, *, sigma: float | None = None,
                 sigma_y: float = 0.0):
        super().__init__(sigma_y)
        if (kernel is None) == (sigma is None):
            raise ValueError("give exactly one of kernel (a 2-D tensor) or sigma (Gaussian)")
        if kernel is None:
            kernel = gaussian_kernel(sigma)
        kernel = torch.as_tensor(kernel)
        if kernel.ndim != 2 or min(kernel.shape) < 1:
            raise ValueError(f"kernel must be a 2-D tensor (kh, kw), got {tuple(kernel.shape)}")
        if not kernel.dtype.is_floating_point:
            raise ValueError(f"kernel must be real floating-point, got dtype {kernel.dtype}")
        if not bool(torch.isfinite(kernel).all()):
            raise ValueError("kernel contains NaN/Inf values")
        self.register_buffer("kernel", kernel.clone())
        self.sigma = None if sigma is None else float(sigma)

    def extra_repr(self) -> str:
        what = f"sigma={self.sigma:g}, " if self.sigma is not None else ""
        return f"{what}kernel_shape={tuple(self.kernel.shape)}, {super().extra_repr()}"

    def transfer_function(self, shape: Sequence[int], dtype: torch.dtype = torch.float32,
                          device: torch.device | str | None = None) -> Tensor:
        """``K = F(k)`` for images of trailing shape ``(H, W)``: complex of shape ``(H, W)``."""
        h, w = (int(s) for s in shape[-2:])
        k = self.kernel.to(dtype=real_dtype(dtype), device=device or self.kernel.device)
        kh, kw = k.shape
        rows = (torch.arange(kh, device=k.device) - kh // 2) % h
        cols = (torch.arange(kw, device=k.device) - kw // 2) % w
        padded = torch.zeros(h, w, dtype=k.dtype, device=k.device)
        padded.index_put_((rows[:, None].expand(kh, kw), cols[None, :].expand(kh, kw)), k,
                          accumulate=True)
        return torch.fft.fft2(padded)

    def _check_image(self, t: Tensor, name: str) -> None:
        if t.ndim < 2:
            raise ValueError(f"{name} must have at least 2 dims (H, W), got shape {tuple(t.shape)}")

    def _check_y_shape(self, y: Tensor) -> None:
        self._check_image(y, "y")

    def measurement_shape(self, x_shape: Sequence[int]) -> torch.Size:
        return torch.Size(x_shape)

    def _filter(self, t: Tensor, conj: bool) -> Tensor:
        k = self.transfer_function(t.shape, t.dtype, t.device)
        if conj:
            k = k.conj()
        out = torch.fft.ifft2(k * torch.fft.fft2(t))
        return out if t.is_complex() else out.real

    def forward(self, x: Tensor) -> Tensor:
        self._check_x_dtype(x)
        self._check_image(x, "x")
        return self._filter(x, conj=False)

    def adjoint(self, y: Tensor) -> Tensor:
        self._check_y_dtype(y)
        self._check_y_shape(y)
        return self._filter(y, conj=True)

    def pseudo_inverse(self, y: Tensor) -> Tensor:
        self.check_measurement(y)
        return y.clone()

    def prox(self, x0: Tensor, y: Tensor, lam: float, steps: int = 0, tol: float = 0.0) -> Tensor:
        """Closed form in the Fourier basis (``A`` is diagonal there):
        ``X = (conj(K) Y + lam X0) / (|K|^2 + lam)`` (``lam`` floored at 1e-8: the plain
        inverse filter is unstable where ``K`` vanishes)."""
        return self.proximal(y)(x0, lam)

    def proximal(self, y: Tensor) -> Callable[[Tensor, float], Tensor]:
        """``prox`` at this ``y`` with ``conj(K) Y`` and ``|K|^2`` computed once, on the real FFT's
        half spectrum for real images and a real ``y`` (``K`` of a real kernel is Hermitian)."""
        shape = tuple(y.shape[-2:])
        if y.is_complex():
            return lambda x0, lam: self._prox_complex(x0, y, lam)
        k = self.transfer_function(shape, y.dtype, y.device)[..., : shape[-1] // 2 + 1]
        data, power = k.conj() * torch.fft.rfft2(y), k.abs().square()

        def prox(x0: Tensor, lam: float) -> Tensor:
            if x0.is_complex():
                return self._prox_complex(x0, y, lam)
            lam = max(float(lam), 1e-8)
            return torch.fft.irfft2((data + lam * torch.fft.rfft2(x0)) / (power + lam), s=shape)

        return prox

    def _prox_complex(self, x0: Tensor, y: Tensor, lam: float) -> Tensor:
        """``prox`` on the full spectrum: a complex image or measurement."""
        k = self.transfer_function(x0.shape, x0.dtype, x0.device)
        lam = max(float(lam), 1e-8)
        out = torch.fft.ifft2((k.conj() * torch.fft.fft2(y) + lam * torch.fft.fft2(x0))
                              / (k.abs().square() + lam))
        return out if x0.is_complex() else out.real


def build_blur(shape: Sequence[int], sigma: float = 1.5, truncate: float = 4.0, *,
               sigma_y: float = 0.0, seed: int = 0) -> Blur:
    """Gaussian blur of std ``sigma`` pixels (circular boundary)."""
    kernel = gaussian_kernel(sigma, truncate)
    if min(kernel.shape) > min(shape):
        raise ValueError(f"blur kernel {tuple(kernel.shape)} (sigma={sigma}, truncate={truncate}) "
                         f"is larger than the image {tuple(shape)}")
    op = Blur(kernel, sigma_y=sigma_y)  # Blur(sigma=...) has no truncate; keep sigma for repr
    op.sigma = float(sigma)
    return op
