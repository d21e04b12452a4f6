r"""Where k-space is sampled and how coils see: mask generators and synthetic coil maps.

Mask generators return boolean tensors (True = sampled) in the centred layout of
``recon.operators.fourier.fft2c`` (DC at index ``(H // 2, W // 2)``) and take a
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
from collections.abc import Sequence

import torch
from torch import Tensor

from recon.operators.base import Seed, _check_fraction, _shape, as_generator

MAX_COILS = 64
"""The most simulated coils (receive arrays have up to 64 channels; 64 maps of a 512 x 512 slice
in complex64 are 128 MiB)."""


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
