r"""Measurements of volumes: 3-D k-space undersampled in (kz, ky), and dropped slices.

A volume is ``x`` of shape ``(*lead, S, H, W)``: ``S`` slices along the through-plane axis z,
each ``(H, W)`` in the viewer layout of the 2-D prior (axial: H anterior-posterior, W
left-right). Leading dims ``(N, C)`` broadcast, so a slab sampled as one image ``(N, S, H, W)``
is measured as a whole.

Centred orthonormal 3-D DFT over the last three dims (DC at ``(S // 2, H // 2, W // 2)``):

    fft3c(x)  = fftshift(fftn(ifftshift(x), norm="ortho")),    ifft3c = fft3c^H = fft3c^{-1}

``KyKzFourier`` (3-D acquisition, e.g. MPRAGE): the readout (W, kx) is fully sampled and the
phase-encode plane (kz, ky) = (S, H) undersampled by a mask ``M (S, H)`` broadcast along W:

    A x = M ⊙ F3 x,    A^H y = F3^H (M ⊙ y),    pseudo_inverse(y) = A^H y (zero-filled).

Over real images (``real_output=True``) the adjoint is ``Re(A^H y)`` and the normal operator
``Re(A^H A) = F3^H diag(m) F3`` with ``m(k) = (M(k) + M(-k)) / 2``, ``-k`` mirrored in all three
dims (``M`` does not depend on kx, so only the (kz, ky) mirror matters).

``kykz_mask``: a fully sampled central rectangle of ``round(S c) x round(H c)`` points
(``c = center_fraction`` of each side, not of the area), the rest variable-density random
(``"random"``) or variable-density Poisson-disc (``"poisson"``); exactly
``round(S H / acceleration)`` points in all.

``SliceDrop`` (through-plane super-resolution): slice s is kept when
``indices[s] % factor == offset``, ``indices`` the slices' global positions in the volume, so a
slab drops the same slices as its volume; ``A x = m ⊙ x`` as ``Mask``, and the naive baseline
interpolates linearly along z between kept slices (the nearest kept slice beyond the ends).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from recon.operators.base import (
    Operator,
    Seed,
    _shape,
    as_generator,
    binary_mask,
    complex_dtype,
)
from recon.operators.kspace_patterns import _centre, _check_acceleration, variable_density_mask
from recon.operators.mask import Mask

_DIMS3 = (-3, -2, -1)


def fft3c(x: Tensor) -> Tensor:
    """Centred orthonormal 3-D DFT over the last three dims."""
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=_DIMS3), dim=_DIMS3,
                                             norm="ortho"), dim=_DIMS3)


def ifft3c(k: Tensor) -> Tensor:
    """Inverse (= adjoint) of ``fft3c``."""
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(k, dim=_DIMS3), dim=_DIMS3,
                                              norm="ortho"), dim=_DIMS3)


def _volume_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = _shape(shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"a volume shape must be (S, H, W) with positive sizes, got {shape}")
    return shape


def _radius(shape: tuple[int, int]) -> np.ndarray:
    """Normalised radius ``|(kz / (S/2), ky / (H/2))|`` on the centred (S, H) grid."""
    s, h = shape
    kz = (np.arange(s) - s // 2) / (s / 2)
    ky = (np.arange(h) - h // 2) / (h / 2)
    return np.sqrt(kz[:, None] ** 2 + ky[None, :] ** 2)


def _dart_throw(centre: np.ndarray, radius: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Greedy Poisson-disc sampling: points visited in ``order`` (flat indices) are kept unless
    within ``radius`` (at the kept point) of a point kept before; the centre is kept first."""
    s, h = centre.shape
    blocked = np.zeros_like(centre)
    mask = np.zeros_like(centre)

    def keep(i: int, j: int) -> None:
        mask[i, j] = True
        r = radius[i, j]
        n = math.ceil(r)
        i0, i1, j0, j1 = max(i - n, 0), min(i + n + 1, s), max(j - n, 0), min(j + n + 1, h)
        dz, dy = np.arange(i0, i1) - i, np.arange(j0, j1) - j
        blocked[i0:i1, j0:j1] |= dz[:, None] ** 2 + dy[None, :] ** 2 < r * r

    for i, j in zip(*np.nonzero(centre), strict=True):
        keep(int(i), int(j))
    for flat in order:
        i, j = divmod(int(flat), h)
        if not blocked[i, j]:
            keep(i, j)
    return mask


def _poisson_mask(shape: tuple[int, int], centre: np.ndarray, target: int,
                  gen: torch.Generator | None) -> Tensor:
    """Variable-density Poisson disc: radius ``1 + slope * rho`` (grid units; 1 = every point
    at the centre), ``slope`` bisected until the count is within 2 % of ``target``; then
    random non-centre points are dropped, or points drawn with density ``1 / radius^2`` added,
    to reach ``target`` exactly."""
    rho = _radius(shape)
    order = torch.randperm(centre.size, generator=gen).numpy()
    lo, hi = 0.0, float(max(shape))
    best = None
    for _ in range(40):
        slope = 0.5 * (lo + hi)
        mask = _dart_throw(centre, 1.0 + slope * rho, order)
        count = int(mask.sum())
        if best is None or abs(count - target) < abs(int(best[0].sum()) - target):
            best = (mask, slope)
        if abs(count - target) <= max(1, 0.02 * target):
            break
        lo, hi = (slope, hi) if count > target else (lo, slope)
    mask, slope = torch.from_numpy(best[0]), best[1]
    extra = int(mask.sum()) - target
    if extra > 0:
        free = torch.nonzero((mask & ~torch.from_numpy(centre)).flatten()).flatten()
        mask.view(-1)[free[torch.randperm(free.numel(), generator=gen)[:extra]]] = False
    elif extra < 0:
        weight = torch.from_numpy((1.0 + slope * rho) ** -2.0).masked_fill(mask, 0.0).flatten()
        mask.view(-1)[torch.multinomial(weight, -extra, replacement=False, generator=gen)] = True
    return mask


def kykz_mask(shape: Sequence[int], acceleration: float = 4, center_fraction: float = 0.08,
              kind: str = "random", generator: Seed = None) -> Tensor:
    """Boolean (kz, ky) mask of shape ``(S, H)`` (centred layout) with exactly
    ``round(S H / acceleration)`` sampled points, including a fully sampled central rectangle
    of ``round(S c) x round(H c)`` points (``c = center_fraction`` of each side).

    - ``kind="random"``: the rest drawn without replacement with Gaussian variable density
      (``variable_density_mask`` on the (kz, ky) plane, ``std = 0.3`` of the half side);
    - ``kind="poisson"``: variable-density Poisson disc by dart throwing in a random order,
      exclusion radius ``1 + slope * rho`` grid points (``rho``: normalised radius, 1 at the
      middle of each edge), ``slope`` bisected to the target count (``_poisson_mask``).
    """
    shape = _shape(shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"a (kz, ky) mask shape must be (S, H) with positive sizes, got {shape}")
    acceleration, center_fraction = _check_acceleration(acceleration, center_fraction)
    if kind == "random":
        return variable_density_mask(shape, acceleration, center_fraction, generator=generator)
    if kind != "poisson":
        raise ValueError(f"kind must be 'random' or 'poisson', got {kind!r}")
    s, h = shape
    centre = np.zeros(shape, dtype=bool)
    centre[_centre(s, round(s * center_fraction)), _centre(h, round(h * center_fraction))] = True
    target = round(s * h / acceleration)
    if int(centre.sum()) > target:
        raise ValueError(f"the fully sampled centre (center_fraction={center_fraction}) has "
                         f"{int(centre.sum())} points, more than the {target} allowed by "
                         f"acceleration={acceleration}")
    return _poisson_mask(shape, centre, target, as_generator(generator))


class KyKzFourier(Operator):
    r"""3-D Cartesian MRI undersampled in the phase-encode plane: ``A x = M ⊙ fft3c(x)``.

    - ``mask`` ``M``: ``(S, H)`` over (kz, ky), broadcast along the readout W (fully sampled);
      x is ``(*lead, S, H, W)`` with any W, y complex of x's shape (zero where unsampled).
    - ``A^H y = ifft3c(M ⊙ y)``; ``pseudo_inverse(y) = A^H y``, the zero-filled volume.

    ``real_output`` as in ``UndersampledFourier``: True declares the image domain real, so
    ``forward`` requires real x and ``adjoint`` / ``pseudo_inverse`` return ``.real`` (the exact
    adjoint for ``Re <a, b>``); False treats images as complex. ``measure`` adds circular
    complex noise on sampled k-space only.
    """

    complex_measurements = True

    def __init__(self, mask: Tensor, sigma_y: float = 0.0, real_output: bool = False):
        super().__init__(sigma_y)
        mask = binary_mask(mask)
        if mask.ndim != 2:
            raise ValueError(f"a (kz, ky) mask must have shape (S, H), got {tuple(mask.shape)}")
        self.register_buffer("mask", mask)
        self.real_output = bool(real_output)

    @property
    def acceleration(self) -> float:
        """Nominal acceleration ``numel(mask) / sum(mask)``."""
        return self.mask.numel() / max(int(self.mask.sum()), 1)

    def extra_repr(self) -> str:
        return (f"shape={tuple(self.mask.shape)}, acceleration={self.acceleration:.2f}, "
                f"real_output={self.real_output}, {super().extra_repr()}")

    def _kspace_mask(self) -> Tensor:
        return self.mask.unsqueeze(-1)  # (S, H, 1): broadcast along the readout

    def _noise_support(self) -> Tensor:
        return self._kspace_mask()

    def _check_trailing(self, t: Tensor, name: str) -> None:
        expected = tuple(self.mask.shape)
        if t.ndim < 3 or tuple(t.shape[-3:-1]) != expected:
            raise ValueError(f"{name} of shape {tuple(t.shape)} does not fit a (kz, ky) mask of "
                             f"shape {expected}: expected dims (S, H) = {expected} before the "
                             f"readout W, got {tuple(t.shape[-3:-1]) if t.ndim >= 3 else None}")

    def _check_y_shape(self, y: Tensor) -> None:
        self._check_trailing(y, "y")

    def measurement_shape(self, x_shape: Sequence[int]) -> torch.Size:
        return torch.Size(_shape(x_shape))

    def forward(self, x: Tensor) -> Tensor:
        self._check_x_dtype(x)
        if self.real_output and x.is_complex():
            raise ValueError(f"x must be real for KyKzFourier(real_output=True), got dtype "
                             f"{x.dtype}")
        self._check_trailing(x, "x")
        return fft3c(x.to(complex_dtype(x.dtype))) * self._kspace_mask()

    def adjoint(self, y: Tensor) -> Tensor:
        self._check_y_dtype(y)
        self._check_y_shape(y)
        x = ifft3c(y * self._kspace_mask())
        return x.real if self.real_output else x

    def pseudo_inverse(self, y: Tensor) -> Tensor:
        self.check_measurement(y)
        return self.adjoint(y)

    def mirrored_mask(self) -> Tensor:
        """``M(-k)`` on the centred (S, H) grid: index i holds frequency ``i - n // 2``, whose
        mirror sits at ``(2 (n // 2) - i) mod n`` (a flip, then a roll by one for even n)."""
        s, h = self.mask.shape
        return torch.roll(torch.flip(self.mask, (-2, -1)), (1 - s % 2, 1 - h % 2), (-2, -1))

    def prox(self, x0: Tensor, y: Tensor, lam: float, steps: int = 0, tol: float = 0.0) -> Tensor:
        r"""``argmin_x ||y - A x||^2 + lam ||x - x0||^2`` in closed form.

        Complex x0: ``F3^H`` of ``(y + lam F3 x0) / (1 + lam)`` where sampled, ``F3 x0``
        elsewhere. Real x0: the minimiser over *real* volumes,

            X = (F3 Re(A^H y) + lam F3 x0) / (m + lam),    x = Re(F3^H X),

        with ``m = (M(k) + M(-k)) / 2`` (``X = F3 x0`` where ``m = 0``), as
        ``UndersampledFourier.prox`` does in 2-D."""
        k0 = fft3c(x0.to(complex_dtype(x0.dtype)))
        m = self._kspace_mask()
        if x0.is_complex():
            return ifft3c(torch.where(m, (y + lam * k0) / (1.0 + lam), k0))
        data = fft3c(ifft3c(y * m).real.to(k0.dtype))  # F3 Re(A^H y)
        weight = 0.5 * (self.mask.to(x0.dtype) + self.mirrored_mask().to(x0.dtype)).unsqueeze(-1)
        seen = weight > 0  # elsewhere keep F3 x0 exactly (no round-off divided by a tiny lam)
        denom = torch.where(seen, weight + lam, torch.ones((), dtype=weight.dtype,
                                                             device=weight.device))
        return ifft3c(torch.where(seen, (data + lam * k0) / denom, k0)).real


class SliceDrop(Mask):
    r"""Through-plane super-resolution: every ``factor``-th slice measured, the others missing.

    Slice s of a volume ``(*lead, S, H, W)`` is kept when ``indices[s] % factor == offset``,
    ``indices`` the slices' global positions (default ``0 .. S-1``), so a slab of a volume
    keeps the same slices as the whole volume. As ``Mask``: ``A x = m ⊙ x = A^H x``, noise on
    kept slices only, closed-form prox; the mask is ``(S, H, W)``.

    ``pseudo_inverse(y)``: linear interpolation along z (in global positions) between the
    neighbouring kept slices, the nearest kept slice beyond the first or last (zeros if the
    slab keeps none), the naive baseline of slice interpolation.
    """

    def __init__(self, shape: Sequence[int], factor: int = 2, offset: int = 0,
                 indices: Sequence[int] | None = None, sigma_y: float = 0.0):
        s, h, w = _volume_shape(shape)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be a positive integer, got {factor!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < factor:
            raise ValueError(f"offset must be an integer in [0, factor={factor}), got {offset!r}")
        indices = tuple(range(s)) if indices is None else tuple(int(i) for i in indices)
        if len(indices) != s:
            raise ValueError(f"indices must give the global position of each of the {s} "
                             f"slices, got {len(indices)}")
        if any(b <= a for a, b in zip(indices, indices[1:], strict=False)) or min(indices) < 0:
            raise ValueError("indices must be non-negative and strictly increasing")
        keep = torch.tensor([i % factor == offset for i in indices], dtype=torch.bool)
        super().__init__(keep[:, None, None].expand(s, h, w).contiguous(), sigma_y)
        self.factor, self.offset, self.indices = factor, offset, indices

    @property
    def kept(self) -> Tensor:
        """Bool ``(S,)``: which slices are measured."""
        return self.mask[:, 0, 0]

    def extra_repr(self) -> str:
        return (f"shape={tuple(self.mask.shape)}, factor={self.factor}, offset={self.offset}, "
                f"indices={self.indices[0]}..{self.indices[-1]}, kept={int(self.kept.sum())}, "
                f"sigma_y={self.sigma_y:g}")

    def pseudo_inverse(self, y: Tensor) -> Tensor:
        self.check_measurement(y)
        y = y * self.mask
        kept = torch.nonzero(self.kept).flatten().to(y.device)
        if kept.numel() == 0:
            return y
        pos = torch.tensor(self.indices, dtype=torch.float64, device=y.device)
        known = pos[kept]
        hi = torch.searchsorted(known, pos).clamp(max=kept.numel() - 1)
        lo = (hi - 1).clamp(min=0)
        gap = known[hi] - known[lo]
        w = torch.where(gap > 0, (pos - known[lo]) / gap.clamp(min=1.0), torch.ones_like(pos))
        w = w.clamp(0.0, 1.0).to(y.real.dtype).reshape(-1, 1, 1)
        return (1.0 - w) * y.index_select(-3, kept[lo]) + w * y.index_select(-3, kept[hi])


def build_kykz_fourier(shape: Sequence[int], acceleration: float = 4.0,
                       center_fraction: float = 0.08, kind: str = "random", *,
                       sigma_y: float = 0.0, seed: int = 0) -> KyKzFourier:
    """3-D k-space of a volume ``shape = (S, H, W)`` undersampled in (kz, ky) by a
    ``kykz_mask`` (``kind="random"`` or ``"poisson"``) at ``acceleration``, readout W fully
    sampled. Images are real (``real_output=True``): the naive baseline is the real part of
    the zero-filled volume."""
    s, h, _ = _volume_shape(shape)
    mask = kykz_mask((s, h), acceleration, center_fraction, kind=kind,
                     generator=torch.Generator().manual_seed(seed))
    return KyKzFourier(mask, sigma_y=sigma_y, real_output=True)


def build_slice_drop(shape: Sequence[int], factor: int = 2, offset: int = 0,
                     indices: Sequence[int] | None = None, *, sigma_y: float = 0.0,
                     seed: int = 0) -> SliceDrop:
    """Every ``factor``-th slice of a volume ``shape = (S, H, W)`` kept (global positions
    ``indices``, default ``0 .. S-1``, at ``% factor == offset``); ``seed`` is unused (nothing
    random), accepted as every builder's."""
    del seed
    return SliceDrop(shape, factor, offset, indices, sigma_y=sigma_y)
