"""The MONAI transforms that turn a NIfTI file into normalised slices: load and check, orient to
RAS, scale intensities (percentiles or the head's median), cut to the slice grid; each file's
preprocessing cached (``PersistentDataset``)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    Orientationd,
    ScaleIntensityRange,
    ScaleIntensityRangePercentilesd,
)
from monai.transforms.utils_pytorch_numpy_unification import percentile
from torch.utils.data import Dataset

from recon.data.manifest import DataError
from recon.data.nifti import affine_problem
from recon.data.slicing import (
    FOREGROUND_CLIP,
    FOREGROUND_MEDIAN,
    SliceConfig,
    SliceGeometry,
    resize_to,
    to_view,
)

log = logging.getLogger(__name__)


def _label(d: Mapping[Hashable, Any]) -> str:
    return str(d.get("id") or d.get("path") or "volume")


class _CheckVolumed(MapTransform):
    """One channel (a 4-D file: 4th dimension 1) and finite voxels, else ``DataError``."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.ndim != 4 or img.shape[0] != 1:
                raise DataError(f"{_label(d)}: expected one 3-D volume, got an image of shape "
                                f"{tuple(img.shape[1:])} with {img.shape[0]} channel(s)/frame(s)")
            bad = int((~torch.isfinite(torch.as_tensor(img))).sum())
            if bad:
                raise DataError(f"{_label(d)}: {bad} non-finite (NaN/Inf) voxels")
        return d


class _RecordPercentilesd(MapTransform):
    """Store the percentile values that ``ScaleIntensityRangePercentilesd`` maps to [0, 1]
    (same function, same input) under ``"intensity"``."""

    def __init__(self, keys: str, lower: float, upper: float) -> None:
        super().__init__(keys)
        self.lower, self.upper = lower, upper

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            lo, hi = percentile(img, self.lower), percentile(img, self.upper)
            d["intensity"] = (float(lo), float(hi))
        return d


class _ForegroundScaled(MapTransform):
    """``normalise="foreground"``: ``lo`` = the volume's ``lower`` percentile (background),
    the head = voxels above ``lo + 0.1 (p99 - lo)`` (everything brighter than background),
    ``med`` = the head's median (mostly brain tissue, with or without the skull: scalp and
    marrow are a thin shell, bone is dark in T1), then ``x' = (x - lo) / (hi - lo)`` with
    ``hi = lo + (med - lo) / FOREGROUND_MEDIAN`` (MONAI ``ScaleIntensityRange``), clipped to
    ``[0, FOREGROUND_CLIP]``; ``(lo, hi)`` is recorded under ``"intensity"`` to map results back
    to the input's units."""

    def __init__(self, keys: str, lower: float) -> None:
        super().__init__(keys)
        self.lower = lower

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            v = torch.as_tensor(img).flatten().float()
            lo, p99 = float(percentile(v, self.lower)), float(percentile(v, 99.0))
            head = v[v > lo + 0.1 * (p99 - lo)]
            med = float(head.median()) if head.numel() else float(v.max())
            hi = lo + max(med - lo, 1e-6) / FOREGROUND_MEDIAN
            scaled = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0)(img)
            d[key] = scaled.clamp(0.0, FOREGROUND_CLIP)
            d["intensity"] = (lo, hi)
        return d


class ToSliceGridd(MapTransform):
    """(1, X, Y, Z) RAS MetaTensor -> ``(Z_axis, 1, size, size)`` float32 slices (viewer
    layout, physical aspect kept, zero-padded) or, with ``size=None``, ``(Z_axis, 1, H, W)`` on
    the native in-plane grid (viewer layout only, no resampling), plus ``"foreground"``
    (per-slice fraction of in-image pixels above ``foreground_level``) and ``"geometry"``
    (``SliceGeometry`` as a dict).
    """

    def __init__(self, keys: str, size: int | None, axis: int, foreground_level: float = 0.1,
                 upper: float = 1.0) -> None:
        super().__init__(keys)
        self.size = None if size is None else int(size)
        self.axis, self.level, self.upper = int(axis), float(foreground_level), float(upper)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            meta = img.meta
            file_affine = np.asarray(meta.get("original_affine", img.affine), dtype=float)
            spatial_shape = tuple(int(s) for s in np.asarray(meta["spatial_shape"])[:3])
            ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(file_affine),
                                                   nib.orientations.axcodes2ornt("RAS"))
            spacing = [float(s) for s in np.asarray(img.pixdim)[:3]]
            vol = torch.as_tensor(img.as_tensor() if hasattr(img, "as_tensor") else img)[0]
            view = to_view(vol.movedim(self.axis, 0).float())  # (Z, nh, nw)
            p1, p2 = [spacing[a] for a in range(3) if a != self.axis]
            nh, nw = int(view.shape[1]), int(view.shape[2])
            if self.size is None:  # native grid: the slice as stored
                scale, (mh, mw), (top, left) = 1.0 / max(p1, p2), (nh, nw), (0, 0)
                small = view.clamp(0.0, self.upper)
                out = small[:, None].contiguous()
            else:
                eh, ew = nh * p2, nw * p1  # physical extents (rows: the 2nd in-plane axis)
                scale = self.size / max(eh, ew)
                mh = min(self.size, max(1, round(eh * scale)))
                mw = min(self.size, max(1, round(ew * scale)))
                small = view if (mh, mw) == (nh, nw) else resize_to(view, (mh, mw))
                small = small.clamp_(0.0, self.upper)
                top, left = (self.size - mh) // 2, (self.size - mw) // 2
                out = torch.zeros((view.shape[0], 1, self.size, self.size), dtype=torch.float32)
                out[:, 0, top:top + mh, left:left + mw] = small
            fg = (small > self.level).float().mean(dim=(1, 2))
            geom = SliceGeometry(
                spatial_shape=spatial_shape,  # type: ignore[arg-type]
                affine=tuple(tuple(float(v) for v in row) for row in file_affine),
                ornt=tuple((float(a), float(b)) for a, b in ornt),
                axis=self.axis, size=self.size, native_hw=(nh, nw), resized_hw=(mh, mw),
                pad=(top, left), intensity=tuple(d.get("intensity", (0.0, 1.0))),  # type: ignore
                pixel_mm=float(1.0 / scale))
            d[key] = out
            d["foreground"] = fg
            d["geometry"] = geom.to_dict()
        return d


def nifti_loader() -> LoadImaged:
    """MONAI's ``LoadImaged`` with nibabel. MONAI also builds its other readers, and with
    pydicom installed (the DICOM conversions of ``recon.data.public`` use it) its GPU DICOM
    reader says twice that nvImageCodec is missing: irrelevant to NIfTI, so kept quiet."""
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
        return LoadImaged(keys="image", reader="NibabelReader", image_only=True, dtype=np.float32)


def volume_transforms(config: SliceConfig | None = None) -> Compose:
    """The whole preprocessing of one volume (dict with ``"image"``: a NIfTI path), in order."""
    c = config or SliceConfig()
    return Compose([
        nifti_loader(),
        EnsureChannelFirstd(keys="image"),
        _CheckVolumed(keys="image"),
        Orientationd(keys="image", axcodes="RAS", labels=None),
        *([_RecordPercentilesd(keys="image", lower=c.lower, upper=c.upper),
           ScaleIntensityRangePercentilesd(keys="image", lower=c.lower, upper=c.upper,
                                           b_min=0.0, b_max=1.0, clip=True)]
          if c.normalise == "percentile" else [_ForegroundScaled(keys="image", lower=c.lower)]),
        ToSliceGridd(keys="image", size=c.size, axis=int(c.axis),
                     foreground_level=c.foreground_level,
                     upper=1.0 if c.normalise == "percentile" else FOREGROUND_CLIP),
    ])


def root_cause(err: BaseException) -> BaseException:
    seen = set()
    while err.__cause__ is not None and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__
    return err


def preprocess(ds: Dataset, i: int, label: str, path: Path) -> dict[str, Any]:
    try:  # the file's own affine: MONAI replaces a degenerate one by the identity, silently
        problem = affine_problem(nib.load(path).affine)
    except Exception:  # noqa: BLE001 - unreadable files are reported by the transforms below
        problem = None
    if problem:
        raise DataError(f"volume {label!r}: {problem} in {path}: the volume has no usable "
                        f"geometry (outputs would not overlay it)")
    try:
        return ds[i]
    except Exception as err:  # MONAI wraps transform errors in RuntimeError
        cause = root_cause(err)
        if isinstance(cause, DataError):
            raise DataError(f"volume {label!r}: {cause}") from err
        raise DataError(f"volume {label!r}: cannot load/preprocess {path}: "
                        f"{type(cause).__name__}: {cause}") from err
