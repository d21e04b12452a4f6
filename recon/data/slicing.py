"""How slices are cut from a volume: ``SliceConfig`` (axis, size, intensity scaling) and
``SliceGeometry`` (the map between a volume's voxels and its slices, both ways)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.transforms import (
    Resize,
)
from torch import Tensor

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
"""Slicing axis names -> axis of the RAS-oriented volume."""
CACHE_VERSION = 2
"""Bumped when the preprocessing changes, so old cache entries are not reused."""
NORMALISATIONS = ("percentile", "foreground")
FOREGROUND_MEDIAN = 0.5
"""``normalise="foreground"``: where the head's median intensity lands."""
FOREGROUND_CLIP = 1.5
"""``normalise="foreground"``: the upper clip (bright fat and vessels stay above 1)."""


@dataclass(frozen=True)
class SliceConfig:
    """How slices are cut. ``axis``: 0/1/2 of the RAS volume or sagittal/coronal/axial."""

    size: int | None = 64
    """Slices resized (aspect kept) and padded to ``size x size``; ``None``: the native
    in-plane grid, untouched (what the reconstruction uses)."""
    axis: int | str = 2
    lower: float = 0.5
    upper: float = 99.5
    min_foreground: float = 0.05
    foreground_level: float = 0.1
    normalise: str = "percentile"
    """``percentile``: the volume's ``lower``/``upper`` percentiles -> [0, 1] (clipped);
    ``foreground``: ``lower`` percentile -> 0 and the median of the head (voxels brighter than
    background) -> 0.5, clipped to [0, 1.5]: the scale follows the tissue, not the brightest
    voxels (scalp fat, vessels) nor the amount of background."""

    def __post_init__(self) -> None:
        axis = AXES.get(self.axis, self.axis) if isinstance(self.axis, str) else self.axis
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1, 2 or one of {list(AXES)}, got {self.axis!r}")
        object.__setattr__(self, "axis", int(axis))
        if self.size is not None and not 2 <= int(self.size) <= 4096:
            raise ValueError(f"size must be in [2, 4096] or None (native), got {self.size}")
        if self.normalise not in NORMALISATIONS:
            raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {self.normalise!r}")
        if not 0.0 <= self.lower < self.upper <= 100.0:
            raise ValueError(f"need 0 <= lower < upper <= 100, got {self.lower}, {self.upper}")
        if not 0.0 <= self.min_foreground <= 1.0:
            raise ValueError(f"min_foreground must be in [0, 1], got {self.min_foreground}")

    def key(self) -> dict[str, Any]:
        """What the cached preprocessing depends on (``min_foreground`` is applied later)."""
        key = {"v": CACHE_VERSION, "size": None if self.size is None else int(self.size),
               "axis": int(self.axis), "lower": float(self.lower), "upper": float(self.upper),
               "foreground_level": float(self.foreground_level)}
        if self.normalise != "percentile":  # keys of the default stay as they were
            key["normalise"] = self.normalise
        return key


# -- geometry ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SliceGeometry:
    """How a volume became ``(Z, 1, size, size)`` slices, and the way back.

    ``spatial_shape``/``affine``: the file's grid; ``ornt``: nibabel orientation from the file's
    axes to RAS; ``axis``: slicing axis in RAS; ``native_hw``: slice size before resizing (viewer
    layout); ``resized_hw`` and ``pad`` (top, left): where the image sits in the padded slice;
    ``intensity``: the (lo, hi) percentile values mapped to (0, 1); ``pixel_mm``: output pixel
    size in mm.
    """

    spatial_shape: tuple[int, int, int]
    affine: tuple[tuple[float, ...], ...]
    ornt: tuple[tuple[float, float], ...]
    axis: int
    size: int | None
    native_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    pad: tuple[int, int]
    intensity: tuple[float, float]
    pixel_mm: float

    @property
    def n_slices(self) -> int:
        return int(self.ras_shape[self.axis])

    @property
    def ras_shape(self) -> tuple[int, int, int]:
        order = [int(a) for a, _ in self.ornt]  # RAS axis of each file axis
        shape = [0, 0, 0]
        for file_axis, ras_axis in enumerate(order):
            shape[ras_axis] = self.spatial_shape[file_axis]
        return tuple(shape)  # type: ignore[return-value]

    @property
    def slice_mm(self) -> float:
        """Spacing of the slices (mm): the voxel size along the slicing axis."""
        file_axis = next(i for i, (a, _) in enumerate(self.ornt) if int(a) == self.axis)
        return float(np.linalg.norm(np.asarray(self.affine, float)[:3, file_axis]))

    @property
    def grid_hw(self) -> tuple[int, int]:
        """The processed slices' size: ``(size, size)``, or the native one."""
        return tuple(self.native_hw) if self.size is None else (self.size, self.size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SliceGeometry:
        def tup(x: Any) -> Any:
            return tuple(tup(v) for v in x) if isinstance(x, list | tuple) else x

        def num(x: Any) -> Any:
            return x.item() if isinstance(x, torch.Tensor | np.ndarray) and x.ndim == 0 else x

        return cls(**{k: tup(num(v)) if not isinstance(v, torch.Tensor)
                      else tup(v.tolist()) for k, v in d.items()})

    def to_native(self, slices: Tensor | np.ndarray, indices: Sequence[int] | None = None, *,
                  rescale: bool = True, fill: float = 0.0) -> np.ndarray:
        """Map processed slices back onto the file's grid: a float32 array of
        ``spatial_shape``. ``slices``: ``(n, 1, size, size)`` or ``(n, size, size)``, the slices
        ``indices`` (default: all ``Z``, in order); other slices get ``fill`` (in output units).
        ``rescale`` maps [0, 1] back to the input's intensity units (the percentile range)."""
        x = torch.as_tensor(np.asarray(slices) if not isinstance(slices, Tensor) else slices)
        x = x.detach().to("cpu", torch.float32)
        if x.ndim == 4:
            if x.shape[1] != 1:
                raise ValueError(f"expected one channel, got shape {tuple(x.shape)}")
            x = x[:, 0]
        if x.ndim != 3 or tuple(x.shape[1:]) != self.grid_hw:
            raise ValueError(f"expected slices (n, 1, {self.grid_hw[0]}, {self.grid_hw[1]}), "
                             f"got {tuple(slices.shape)}")
        idx = list(range(self.n_slices)) if indices is None else [int(i) for i in indices]
        if len(idx) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} slices for {len(idx)} indices")
        if any(not 0 <= i < self.n_slices for i in idx):
            raise ValueError(f"slice indices must be in [0, {self.n_slices})")
        (top, left), (mh, mw) = self.pad, self.resized_hw
        out = torch.full((self.n_slices, *self.native_hw), float(fill), dtype=torch.float32)
        lo, hi = self.intensity
        for i in range(0, len(idx), 32):  # a chunk at a time: one volume-sized copy in memory
            chunk = x[i:i + 32, top:top + mh, left:left + mw]
            if (mh, mw) != tuple(self.native_hw):
                chunk = resize_to(chunk, self.native_hw)
            out[idx[i:i + 32]] = chunk * (hi - lo) + lo if rescale else chunk
        # the view layout undone and RAS turned back to the file's axes: numpy views, one copy
        ras = np.moveaxis(np.flip(out.numpy(), 1).swapaxes(1, 2), 0, self.axis)
        back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                               np.asarray(self.ornt, dtype=float))
        native = nib.orientations.apply_orientation(ras, back)
        return np.ascontiguousarray(native, dtype=np.float32)


def to_view(vol: Tensor) -> Tensor:
    """(Z, n1, n2) RAS in-plane -> (Z, n2, n1) viewer layout: ``rot90`` (anterior/superior up)."""
    return vol.transpose(1, 2).flip(1)


def resize_to(x: Tensor, hw: Sequence[int]) -> Tensor:
    """Bilinear resize of (Z, H, W) to (Z, *hw), anti-aliased when shrinking (MONAI Resize)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "anti-aliasing ... upsampling" notes
        out = Resize(spatial_size=tuple(int(s) for s in hw), mode="bilinear",
                     align_corners=False, anti_aliasing=True)(x)
    return torch.as_tensor(out, dtype=torch.float32)
