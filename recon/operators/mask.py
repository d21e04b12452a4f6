r"""Inpainting and missing data: keep some pixels, lose the rest.

Mask generators return boolean tensors (True = measured) of the requested shape; they take a
``torch.Generator`` or an int seed and are reproducible given it. For a 3-D volume pass a
``(D, H, W)`` shape; a ``(H, W)`` mask broadcasts over slices (the same mask for every slice).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
)


def _check_mask_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = _shape(shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"a mask shape needs at least 2 positive dims (H, W), got {shape}")
    return shape


def random_pixel_mask(shape: Sequence[int], keep: float, generator: Seed = None) -> Tensor:
    """Exactly ``round(keep * numel)`` pixels (voxels) kept, chosen uniformly at random."""
    shape, keep = _check_mask_shape(shape), _check_fraction(keep, "keep")
    n = math.prod(shape)
    order = torch.randperm(n, generator=as_generator(generator))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:round(keep * n)]] = True
    return mask.reshape(shape)


def box_mask(shape: Sequence[int], fraction: float, centred: bool = True,
             generator: Seed = None) -> Tensor:
    """Everything kept except one box (inpainting a hole) covering ``fraction`` of the mask.

    The box has the mask's aspect ratio: side ``round(n_i * fraction ** (1/ndim))`` along each
    dim (a rectangle for ``(H, W)``, a cuboid for ``(D, H, W)``). ``centred=False`` places it
    uniformly at random (seedable).
    """
    shape, fraction = _check_mask_shape(shape), _check_fraction(fraction, "fraction")
    sides = [round(n * fraction ** (1.0 / len(shape))) for n in shape]
    gen = as_generator(generator)
    mask = torch.ones(shape, dtype=torch.bool)
    box = []
    for n, side in zip(shape, sides, strict=True):
        if centred:
            start = (n - side) // 2
        else:
            start = int(torch.randint(0, n - side + 1, (1,), generator=gen))
        box.append(slice(start, start + side))
    mask[tuple(box)] = False
    return mask


def missing_slices_mask(shape: Sequence[int], drop: float, axis: int = -2,
                        generator: Seed = None) -> Tensor:
    """Whole hyperplanes dropped: ``round(drop * shape[axis])`` random indices along ``axis``.

    For ``(H, W)`` and ``axis=-2`` these are rows; for a volume ``(D, H, W)`` and ``axis=0`` (or
    ``-3``) they are whole slices.
    """
    shape, drop = _check_mask_shape(shape), _check_fraction(drop, "drop")
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"axis={axis} is out of range for a mask of shape {shape}")
    n = shape[axis]
    dropped = torch.randperm(n, generator=as_generator(generator))[:round(drop * n)]
    line = torch.ones(n, dtype=torch.bool)
    line[dropped] = False
    view = [1] * len(shape)
    view[axis] = n
    return line.reshape(view).expand(shape).clone()


class Mask(Operator):
    r"""Masking (inpainting, missing pixels or slices): ``y = m ⊙ x`` with a binary mask ``m``.

    - ``A x = m ⊙ x``: the mask has shape ``(*M)`` (at least ``(H, W)``) and must equal the
      trailing dims of x, broadcasting over leading dims ``(B, C[, D])``.
    - ``A^H y = m ⊙ y``: A is a real diagonal projection, so it is self-adjoint.
    - ``pseudo_inverse(y) = m ⊙ y``: the masked image with zeros in the holes (this is the exact
      Moore-Penrose pseudo-inverse, since ``A^+ = A`` for a projection).

    Works on real or complex images; y has x's dtype. ``measure`` adds noise on kept entries only.
    """

    def __init__(self, mask: Tensor, sigma_y: float = 0.0):
        super().__init__(sigma_y)
        self.register_buffer("mask", binary_mask(mask))

    def extra_repr(self) -> str:
        kept = self.mask.float().mean().item()
        return f"shape={tuple(self.mask.shape)}, kept={kept:.3f}, {super().extra_repr()}"

    def _check_x(self, x: Tensor) -> None:
        self._check_x_dtype(x)
        check_trailing_shape(x, self.mask.shape, "x", f"a mask of shape {tuple(self.mask.shape)}")

    def _check_y_shape(self, y: Tensor) -> None:
        check_trailing_shape(y, self.mask.shape, "y", f"a mask of shape {tuple(self.mask.shape)}")

    def measurement_shape(self, x_shape: Sequence[int]) -> torch.Size:
        return torch.Size(x_shape)

    def _noise_support(self) -> Tensor:
        return self.mask

    def forward(self, x: Tensor) -> Tensor:
        self._check_x(x)
        return x * self.mask

    def adjoint(self, y: Tensor) -> Tensor:
        self._check_y_dtype(y)
        self._check_y_shape(y)
        return y * self.mask

    def pseudo_inverse(self, y: Tensor) -> Tensor:
        self.check_measurement(y)
        return y * self.mask

    def prox(self, x0: Tensor, y: Tensor, lam: float, steps: int = 0, tol: float = 0.0) -> Tensor:
        """Closed form: ``(y + lam x0) / (1 + lam)`` on measured pixels, ``x0`` elsewhere."""
        return torch.where(self.mask, (y + lam * x0) / (1.0 + lam), x0)


def build_mask(shape: Sequence[int], kind: str = "random", keep: float = 0.3, fraction: float = 0.25,
               drop: float = 0.5, *, sigma_y: float = 0.0, seed: int = 0) -> Mask:
    """``kind="random"``: ``keep`` of the pixels kept; ``"box"``: a centred hole covering
    ``fraction`` of the image; ``"lines"``: ``drop`` of the rows missing."""
    for value, name in ((keep, "keep"), (fraction, "fraction"), (drop, "drop")):
        _check_fraction(value, name)  # each, whichever kind uses it: a typo is never ignored
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        m = random_pixel_mask(shape, keep, gen)
    elif kind == "box":
        m = box_mask(shape, fraction, centred=True, generator=gen)
    elif kind == "lines":
        m = missing_slices_mask(shape, drop, axis=-2, generator=gen)
    else:
        raise ValueError(f"unknown mask kind {kind!r}; valid kinds: box, lines, random")
    return Mask(m, sigma_y=sigma_y)
