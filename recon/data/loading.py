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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import Dataset as MonaiDataset
from monai.data import PersistentDataset
from torch import Tensor
from torch.utils.data import Dataset

from recon.data.manifest import DataError, Manifest, load_manifest, resolve
from recon.data.nifti import write_nifti
from recon.data.slicing import SliceConfig, SliceGeometry
from recon.data.transforms import preprocess, volume_transforms

__all__ = ["SliceDataset", "Volume", "load_slices", "load_volume", "slice_dataset"]

log = logging.getLogger(__name__)


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
    out = preprocess(ds, 0, label, path)
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
            out = preprocess(ds, i, v.id, Path(item["image"]))
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
