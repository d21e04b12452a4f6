"""Volumes to 2-D slices for the prior, and reconstructed slices back onto the volume's grid.

    train = slice_dataset("data_manifests/public_brain.yaml", "data/public", "train",
                          size=64, axis=2, cache_dir="work/cache")
    train[0]    # {"image": (1, 64, 64) float32 in [0, 1], "volume_id": ..., "slice_index": ...}
    x = load_slices(manifest, root, "train", size=64)          # (N, 1, 64, 64) float32

    vol = load_volume("data/public/antspyx/ch2.nii.gz", size=64)
    for idx, batch in vol.batches(16, vol.indices(max_slices=16)):   # (B, 1, 64, 64)
        recon[idx] = reconstruct(batch)
    vol.save(recon, "out/ch2_recon.nii.gz", indices=...)   # same shape + affine as the input

Preprocessing, composed in one place (``volume_transforms``), MONAI dictionary transforms:

1. ``LoadImaged`` (nibabel reader, float32), ``EnsureChannelFirstd`` (a 4-D file must have a
   4th dimension of 1), a check for one channel and finite voxels;
2. ``Orientationd(axcodes="RAS")``: axis 0 = x (sagittal), 1 = y (coronal), 2 = z (axial);
3. ``ScaleIntensityRangePercentilesd(0.5, 99.5 -> [0, 1], clip)`` (the percentile values are
   also recorded, to map a reconstruction back to the input's units);
4. ``ToSliceGridd``: cut along ``axis``, lay each slice out as seen in a viewer (``np.rot90`` of
   the RAS slice: anterior/superior up, patient's left on the left), resize the in-plane size
   so that the *physical* aspect ratio is kept (the longer physical side becomes ``size``
   pixels; anisotropic voxels are handled) with bilinear interpolation (anti-aliased when
   shrinking), then pad symmetrically with zeros to ``size x size``.

The result per volume, ``(Z, 1, size, size)`` plus a per-slice foreground fraction (share of
the in-image pixels above ``foreground_level``) and a ``SliceGeometry``, is cached with MONAI's
``PersistentDataset`` (keyed on the file, its size, mtime and manifest checksum, and the
preprocessing settings), so a second run only reads small ``.pt`` files. Slices whose
foreground fraction is below ``min_foreground`` are skipped.

Back to the input grid (``SliceGeometry.to_native``, ``Volume.save``): we reconstruct in the
preprocessed grid (the resolution the prior was trained at) and invert our own geometry
exactly rather than with MONAI ``Invertd``: slicing and re-stacking are not MONAI-tracked
operations, and the inverse here is short and exact where it can be. Remove the padding,
resize back to the native in-plane size, undo the viewer layout, re-stack along the slicing
axis (no resampling across slices: output slice k *is* input slice k, which keeps missing-slice
operators and per-slice metrics aligned), undo the RAS reorientation (a permutation/flip:
exact), optionally undo the intensity scaling. Written with ``write_nifti(like=input)``, the
output has the input's shape, affine and header and overlays it in a viewer.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import Dataset as MonaiDataset
from monai.data import PersistentDataset
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    Orientationd,
    Resize,
    ScaleIntensityRange,
    ScaleIntensityRangePercentilesd,
)
from monai.transforms.utils_pytorch_numpy_unification import percentile
from torch import Tensor
from torch.utils.data import Dataset

from recon.data.manifest import DataError, Manifest, load_manifest, resolve
from recon.data.nifti import affine_problem, write_nifti

__all__ = [
    "AXES",
    "SliceConfig",
    "SliceDataset",
    "SliceGeometry",
    "ToSliceGridd",
    "Volume",
    "load_slices",
    "load_volume",
    "slice_dataset",
    "volume_transforms",
]

log = logging.getLogger(__name__)

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
                chunk = _resize(chunk, self.native_hw)
            out[idx[i:i + 32]] = chunk * (hi - lo) + lo if rescale else chunk
        # the view layout undone and RAS turned back to the file's axes: numpy views, one copy
        ras = np.moveaxis(np.flip(out.numpy(), 1).swapaxes(1, 2), 0, self.axis)
        back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                               np.asarray(self.ornt, dtype=float))
        native = nib.orientations.apply_orientation(ras, back)
        return np.ascontiguousarray(native, dtype=np.float32)


def _to_view(vol: Tensor) -> Tensor:
    """(Z, n1, n2) RAS in-plane -> (Z, n2, n1) viewer layout: ``rot90`` (anterior/superior up)."""
    return vol.transpose(1, 2).flip(1)


def _resize(x: Tensor, hw: Sequence[int]) -> Tensor:
    """Bilinear resize of (Z, H, W) to (Z, *hw), anti-aliased when shrinking (MONAI Resize)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "anti-aliasing ... upsampling" notes
        out = Resize(spatial_size=tuple(int(s) for s in hw), mode="bilinear",
                     align_corners=False, anti_aliasing=True)(x)
    return torch.as_tensor(out, dtype=torch.float32)


# -- transforms --------------------------------------------------------------------------------
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
            view = _to_view(vol.movedim(self.axis, 0).float())  # (Z, nh, nw)
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
                small = view if (mh, mw) == (nh, nw) else _resize(view, (mh, mw))
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


def _nifti_loader() -> LoadImaged:
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
        _nifti_loader(),
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


def _root_cause(err: BaseException) -> BaseException:
    seen = set()
    while err.__cause__ is not None and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__
    return err


def _preprocess(ds: Dataset, i: int, label: str, path: Path) -> dict[str, Any]:
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
        cause = _root_cause(err)
        if isinstance(cause, DataError):
            raise DataError(f"volume {label!r}: {cause}") from err
        raise DataError(f"volume {label!r}: cannot load/preprocess {path}: "
                        f"{type(cause).__name__}: {cause}") from err


# -- whole volumes -------------------------------------------------------------------------------
@dataclass
class Volume:
    """One preprocessed volume: ``slices`` ``(Z, 1, S, S)`` in [0, 1], ``foreground`` ``(Z,)``,
    and the ``geometry`` to write a reconstruction back onto the input's grid."""

    path: Path
    slices: Tensor
    foreground: Tensor
    geometry: SliceGeometry
    config: SliceConfig = field(default_factory=SliceConfig)
    id: str | None = None

    def __len__(self) -> int:
        return int(self.slices.shape[0])

    def indices(self, min_foreground: float | None = None,
                max_slices: int | None = None) -> list[int]:
        """Slices with enough foreground (``config.min_foreground`` by default); with
        ``max_slices``, the central ones of those."""
        thr = self.config.min_foreground if min_foreground is None else min_foreground
        keep = [int(i) for i in torch.nonzero(self.foreground >= thr).flatten()]
        if max_slices is not None and len(keep) > max_slices:
            start = (len(keep) - max_slices) // 2
            keep = keep[start:start + max_slices]
        return keep

    def batches(self, batch_size: int,
                indices: Sequence[int] | None = None) -> Iterator[tuple[list[int], Tensor]]:
        """``(indices, slices (B, 1, S, S))`` chunks, for streaming through a volume."""
        idx = list(range(len(self))) if indices is None else list(indices)
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            yield chunk, self.slices[chunk]

    def to_native(self, slices: Tensor | np.ndarray, indices: Sequence[int] | None = None, *,
                  rescale: bool = True, fill: float = 0.0) -> np.ndarray:
        """``SliceGeometry.to_native``: the file's grid, float32."""
        return self.geometry.to_native(slices, indices, rescale=rescale, fill=fill)

    def save(self, slices: Tensor | np.ndarray, path: str | Path,
             indices: Sequence[int] | None = None, *, rescale: bool = True,
             fill: float = 0.0) -> Path:
        """Write reconstructed slices as NIfTI with the input's shape, affine and header."""
        return write_nifti(self.to_native(slices, indices, rescale=rescale, fill=fill), path,
                           like=self.path)


def load_volume(path: str | Path, size: int = 64, axis: int | str = 2, *,
                config: SliceConfig | None = None, volume_id: str | None = None) -> Volume:
    """Preprocess one NIfTI volume for reconstruction (``volume_transforms``, no caching)."""
    cfg = config or SliceConfig(size=size, axis=axis)
    path = Path(path)
    label = volume_id or path.name
    ds = MonaiDataset([{"image": str(path), "id": label}], transform=volume_transforms(cfg))
    out = _preprocess(ds, 0, label, path)
    return Volume(path=path, slices=out["image"], foreground=out["foreground"],
                  geometry=SliceGeometry.from_dict(out["geometry"]), config=cfg, id=volume_id)


# -- slice datasets ----------------------------------------------------------------------------
class SliceDataset(Dataset):
    """The foreground slices of every volume of one split, as a torch ``Dataset``.

    Items: ``{"image": (1, S, S) float32 in [0, 1], "volume_id": str, "slice_index": int,
    "subject": str}`` (``slice_index`` along ``axis`` of the RAS volume). ``tensor()`` stacks
    them all. Missing ``optional`` volumes are skipped with a warning; a missing required one
    raises ``DataError``. With ``cache_dir`` the preprocessing is cached (``PersistentDataset``).
    """

    def __init__(self, manifest: Manifest | str | Path, data_root: str | Path,
                 split: str | None, config: SliceConfig | None = None,
                 cache_dir: str | Path | None = None, *, ids: Sequence[str] | None = None) -> None:
        self.manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        self.data_root = Path(data_root)
        self.split = split
        self.config = config or SliceConfig()
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        entries = [v for v in self.manifest.volumes(split) if ids is None or v.id in set(ids)]
        items, self.entries = [], []
        for v in entries:
            path = resolve(v, self.data_root)
            if not path.is_file():
                if v.optional:
                    log.warning("skipping optional volume %s: %s is missing", v.id, path)
                    continue
                raise DataError(f"volume {v.id!r}: missing file {path} (run "
                                "`recon materialise` for the public set)")
            st = path.stat()
            items.append({"image": str(path), "id": v.id, "sha256": v.sha256,
                          "bytes": int(st.st_size), "mtime_ns": int(st.st_mtime_ns),
                          "prep": self.config.key()})
            self.entries.append(v)
        transform = volume_transforms(self.config)
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            ds: Dataset = PersistentDataset(items, transform=transform, cache_dir=self.cache_dir)
        else:
            ds = MonaiDataset(items, transform=transform)
        self.volumes: dict[str, Tensor] = {}
        self.geometry: dict[str, SliceGeometry] = {}
        self.foreground: dict[str, Tensor] = {}
        self.index: list[tuple[str, int]] = []
        self._subject: dict[str, str] = {}
        for i, (v, item) in enumerate(zip(self.entries, items, strict=True)):
            out = _preprocess(ds, i, v.id, Path(item["image"]))
            geom = SliceGeometry.from_dict(out["geometry"])
            if min(geom.native_hw) < 2:
                log.warning("skipping %s: it is %s in the plane of axis %d (a slice of another "
                            "orientation?)", v.id, "x".join(map(str, geom.native_hw)),
                            self.config.axis)
                continue
            fg = torch.as_tensor(out["foreground"])
            keep = torch.nonzero(fg >= self.config.min_foreground).flatten().tolist()
            self.volumes[v.id] = torch.as_tensor(out["image"])
            self.geometry[v.id] = geom
            self.foreground[v.id] = fg
            self._subject[v.id] = v.subject
            self.index += [(v.id, int(z)) for z in keep]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        vid, z = self.index[i]
        return {"image": self.volumes[vid][z], "volume_id": vid, "slice_index": z,
                "subject": self._subject[vid]}

    def tensor(self) -> Tensor:
        """All kept slices stacked: ``(N, 1, S, S)`` float32 (same order as the items)."""
        size = self.config.size
        if not self.index:
            return torch.zeros((0, 1, size, size), dtype=torch.float32)
        parts = []
        for vid in self.volumes:
            zs = [z for v, z in self.index if v == vid]
            if zs:
                parts.append(self.volumes[vid][zs])
        return torch.cat(parts).contiguous()

    def counts(self) -> dict[str, int]:
        """Kept slices per volume id."""
        out: dict[str, int] = {vid: 0 for vid in self.volumes}
        for vid, _ in self.index:
            out[vid] += 1
        return out


def slice_dataset(manifest: Manifest | str | Path, data_root: str | Path, split: str | None,
                  size: int = 64, axis: int | str = 2, cache_dir: str | Path | None = None,
                  **config: Any) -> SliceDataset:
    """``SliceDataset`` of ``split``; extra keywords go to ``SliceConfig`` (``lower``,
    ``upper``, ``min_foreground``, ``foreground_level``)."""
    return SliceDataset(manifest, data_root, split, SliceConfig(size=size, axis=axis, **config),
                        cache_dir)


def load_slices(manifest: Manifest | str | Path, data_root: str | Path, split: str | None,
                size: int = 64, axis: int | str = 2, cache_dir: str | Path | None = None,
                **config: Any) -> Tensor:
    """All foreground slices of ``split`` as one float32 tensor ``(N, 1, size, size)``."""
    return slice_dataset(manifest, data_root, split, size, axis, cache_dir, **config).tensor()
