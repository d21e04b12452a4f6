r"""The measurement model shared by every operator: ``y = A x + sigma_y n``.

An :class:`Operator` is a ``torch.nn.Module`` so that masks, kernels and coil maps are buffers
that follow ``.to(device)`` / ``.to(torch.float64)``. Computation always runs in the precision
of the input: buffers are cast to the input's dtype on the fly, so a float32 operator applied
to a float64 image computes in float64.

Noise convention (``measure``): ``n`` is standard Gaussian on the entries the operator measures
and zero on the entries it structurally drops (missing pixels, unsampled k-space), so y stays
exactly zero there, as zero-filled k-space is. For complex measurements ``n`` is circular complex
Gaussian with ``E|n|^2 = 1``: real and imaginary parts are each ``N(0, 1/2)``, so each measured
entry carries noise of total variance ``sigma_y^2``. The likelihood on measured entries is
``p(y | x) = N(A x, sigma_y^2 I)`` either way.

Inner products: ``<a, b> = sum(conj(a) b)``; where the image domain is real (a real image into a
real operator, or ``UndersampledFourier(real_output=True)``) the adjoint is taken for the real
inner product ``Re <a, b>``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from recon.classical.linalg import conjugate_gradient

Seed = torch.Generator | int | None


def as_generator(seed: Seed, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A ``torch.Generator`` from an int seed (on ``device``); a generator or None pass through."""
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be a torch.Generator, an int or None, "
                        f"got {type(seed).__name__}")
    return torch.Generator(device=device).manual_seed(seed)


def complex_dtype(dtype: torch.dtype) -> torch.dtype:
    """complex128 for float64, complex64 for other real dtypes; complex dtypes map to themselves."""
    if dtype.is_complex:
        return dtype
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype of the same precision (real dtypes map to themselves)."""
    return torch.empty((), dtype=dtype).real.dtype if dtype.is_complex else dtype


def _shape(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(s) for s in shape)


def _check_fraction(value: float, name: str) -> float:
    """``float(value)``, or ValueError unless it lies in [0, 1]."""
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


class Operator(nn.Module, ABC):
    r"""A linear measurement operator ``A`` with noise level ``sigma_y``: ``y = A x + sigma_y n``.

    Subclasses implement ``forward`` (``A x``), ``adjoint`` (``A^H y``), ``pseudo_inverse`` (the
    naive baseline reconstruction), ``measurement_shape`` and ``_check_y_shape``.
    ``complex_measurements`` says whether y is complex whatever x is (k-space).
    """

    complex_measurements: bool = False

    def __init__(self, sigma_y: float = 0.0):
        super().__init__()
        self.sigma_y = sigma_y

    @property
    def sigma_y(self) -> float:
        """Standard deviation of the measurement noise (total, per entry), ``>= 0``."""
        return self._sigma_y

    @sigma_y.setter
    def sigma_y(self, value: float) -> None:
        try:
            value = float(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"sigma_y must be a finite float >= 0, got {value!r}") from err
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"sigma_y must be a finite float >= 0, got {value}")
        self._sigma_y = value

    # --- the operator ---------------------------------------------------------------------
    @abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """``A x``."""

    @abstractmethod
    def adjoint(self, y: Tensor) -> Tensor:
        """``A^H y``. Checks y's shape and dtype (cheap), not its values (``check_measurement``)."""

    @abstractmethod
    def pseudo_inverse(self, y: Tensor) -> Tensor:
        """The naive baseline reconstruction from y (see each class for its formula)."""

    @abstractmethod
    def measurement_shape(self, x_shape: Sequence[int]) -> torch.Size:
        """Shape of ``A x`` for an image of shape ``x_shape``."""

    @abstractmethod
    def _check_y_shape(self, y: Tensor) -> None:
        """Raise ValueError if y's (trailing) shape cannot be a measurement of this operator."""

    @property
    def support(self) -> Tensor | None:
        """Boolean image-domain mask (broadcastable to x) of the pixels the measurement model
        can hold signal in, or None for every pixel. Pixels outside are zero by the model
        itself (e.g. outside the coil maps of a multi-coil acquisition, which no coil sees),
        so samplers keep them at zero rather than leave them to the prior."""
        return None

    def normal(self, x: Tensor) -> Tensor:
        """``A^H A x``."""
        return self.adjoint(self.forward(x))

    def proximal(self, y: Tensor) -> Callable[[Tensor, float], Tensor]:
        """``(x0, lam) -> prox(x0, y, lam)`` for the one measurement ``y``, with what depends on
        ``y`` alone computed once: for loops that take the prox many times on the same ``y``
        (TV's PDHG inside a data-consistency step). Here the plain ``prox``; subclasses with a
        closed form precompute their data term."""
        return lambda x0, lam: self.prox(x0, y, lam)

    def prox(self, x0: Tensor, y: Tensor, lam: float, steps: int = 10, tol: float = 0.0) -> Tensor:
        r"""``argmin_x ||y - A x||^2 + lam ||x - x0||^2 = (A^H A + lam I)^{-1} (A^H y + lam x0)``.

        Here: at most ``steps`` conjugate-gradient iterations from ``x0`` (batched, per-sample
        step sizes), a chain stopping once its residual is ``tol`` of its first; subclasses give
        the closed form where ``A^H A`` is diagonal (masks, Cartesian k-space, circular blur;
        ``steps`` and ``tol`` unused). ``lam = 0`` is the least-squares data fit nearest ``x0``.
        For real images and complex ``y`` the real part of ``A^H`` is used, as everywhere.
        """
        def real(t: Tensor) -> Tensor:
            return t.real if t.is_complex() and not x0.is_complex() else t

        def matvec(v: Tensor) -> Tensor:
            return real(self.normal(v)) + lam * v

        # x = x0 + d with (A^H A + lam) d = A^H y - A^H A x0 (CG from x0)
        return x0 + conjugate_gradient(matvec, real(self.adjoint(y)) - real(self.normal(x0)),
                                       steps, tol)

    # --- measurements ---------------------------------------------------------------------
    def _noise_support(self) -> Tensor | None:
        """Boolean tensor (broadcastable to y) of measured entries; None means all entries."""
        return None

    def measure(self, x: Tensor, generator: Seed = None) -> Tensor:
        """A noisy measurement ``y = A x + sigma_y n`` (see the module docstring for ``n``).

        ``generator`` (a ``torch.Generator`` on x's device, or an int seed) makes it reproducible.
        """
        y = self.forward(x)
        if self.sigma_y == 0.0:
            return y
        gen = as_generator(generator, device=y.device)
        return self.add_noise(y, torch.randn(y.shape, generator=gen, dtype=y.dtype,
                                             device=y.device))

    def add_noise(self, y: Tensor, noise: Tensor) -> Tensor:
        """``y + sigma_y n`` for a standard draw ``noise`` of y's shape and dtype (e.g. drawn
        slice by slice from per-slice seeds), zero on the entries the operator drops."""
        if noise.shape != y.shape or noise.dtype != y.dtype:
            raise ValueError(f"noise of shape {tuple(noise.shape)} ({noise.dtype}) does not match "
                             f"y of shape {tuple(y.shape)} ({y.dtype})")
        support = self._noise_support()
        if support is not None:
            noise = noise * support
        return y + self.sigma_y * noise

    def _check_y_dtype(self, y: Tensor) -> None:
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
        if not (y.dtype.is_floating_point or y.dtype.is_complex):
            raise ValueError(f"y must be a floating-point or complex tensor, got dtype {y.dtype}")
        if self.complex_measurements and not y.dtype.is_complex:
            raise ValueError(f"y must be complex for {type(self).__name__} (its measurements are "
                             f"complex k-space), got real dtype {y.dtype}")

    def check_measurement(self, y: Tensor, x_shape: Sequence[int] | None = None) -> None:
        """Validate a measurement: dtype (real vs complex), shape, and finite values.

        With ``x_shape`` the full shape must equal ``measurement_shape(x_shape)``; without it only
        the dims the operator fixes are checked. Raises ValueError naming the problem. This
        synchronises with the device (the finiteness check), so samplers call it once per y,
        not per step; ``adjoint`` only does the cheap shape/dtype part.
        """
        self._check_y_dtype(y)
        self._check_y_shape(y)
        if x_shape is not None:
            expected = self.measurement_shape(x_shape)
            if tuple(y.shape) != tuple(expected):
                raise ValueError(f"y has shape {tuple(y.shape)} but an image of shape "
                                 f"{_shape(x_shape)} is measured with shape {tuple(expected)}")
        if not bool(torch.isfinite(y).all()):
            raise ValueError("y contains NaN/Inf values")

    def _check_x_dtype(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not (x.dtype.is_floating_point or x.dtype.is_complex):
            raise ValueError(f"x must be a floating-point or complex tensor, got dtype {x.dtype}")

    def extra_repr(self) -> str:
        return f"sigma_y={self.sigma_y:g}"


def binary_mask(mask: Tensor) -> Tensor:
    """A bool copy of a mask given as bool or real 0/1 values, with at least 2 dims (H, W)."""
    mask = torch.as_tensor(mask)
    if mask.ndim < 2:
        raise ValueError(f"mask must have at least 2 dims (H, W), got shape {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask.clone()
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must be binary: a bool tensor or real values in {0, 1}")
    return mask != 0


def check_trailing_shape(t: Tensor, expected: Sequence[int], name: str, what: str) -> None:
    """Raise ValueError unless ``t.shape`` ends with ``expected``."""
    expected = _shape(expected)
    got = tuple(t.shape[-len(expected):]) if t.ndim >= len(expected) else tuple(t.shape)
    if t.ndim < len(expected) or got != expected:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not fit {what}: expected "
                         f"trailing dims {expected}, got {got}")
