r"""Volume I/O of the reconstruction: prepared slices in, streaming buffers, NIfTI out.

- ``prepare_volume``: one NIfTI volume -> a ``PreparedVolume`` on disk (the prior's slices,
  memory-mapped, plus the ``SliceGeometry`` that maps them back onto the source's grid);
- ``VolumeBuffer``: disk-backed ``(S, H, W)`` arrays filled batch by batch (memory ~ one batch);
- ``write_outputs``: a finished reconstruction as NIfTI on the source's grid (its shape, affine
  and header) and a ``slices.npz`` of the prior-grid stacks, each file written atomically, one
  output at a time (memory: that stack and its native-grid copy, not all four stacks).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from recon.config.prior import SliceSource
from recon.data.loading import load_volume
from recon.data.manifest import DataError
from recon.data.nifti import atomic_dir, atomic_path, write_nifti
from recon.data.slicing import SliceConfig, SliceGeometry

STACKS = ("truth", "naive", "recon", "std")
"""The per-slice arrays of a reconstruction, in ``VolumeBuffer`` and ``slices.npz``."""


@dataclass
class VolumeBuffer:
    """Disk-backed ``(S, H, W)`` float32 arrays (``.npy`` memory maps) filled batch by batch.

    ``names`` e.g. ``("truth", "naive", "recon", "std")``; positions are given by the slice's
    rank in ``indices``. ``close()`` removes the scratch directory.
    """

    directory: Path
    indices: Sequence[int]
    shape: tuple[int, int]
    names: Sequence[str] = STACKS
    arrays: dict[str, np.memmap] = field(init=False)

    def __post_init__(self):
        self.directory = Path(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._scratch = Path(tempfile.mkdtemp(dir=self.directory, prefix=".stream-"))
        self._rank = {int(i): r for r, i in enumerate(self.indices)}
        n = len(self.indices)
        self.arrays = {name: np.lib.format.open_memmap(self._scratch / f"{name}.npy", mode="w+",
                                                       dtype=np.float32, shape=(n, *self.shape))
                       for name in self.names}

    def write(self, indices: Sequence[int], arrays: Mapping[str, np.ndarray]) -> None:
        """Store ``arrays[name]`` ``(B, H, W)`` at the rows of slice ``indices``."""
        rows = [self._rank[int(i)] for i in indices]
        for name in self.names:
            self.arrays[name][rows] = arrays[name]

    def close(self) -> None:
        for a in self.arrays.values():
            a.flush()
        self.arrays = {}
        shutil.rmtree(self._scratch, ignore_errors=True)


@dataclass
class PreparedVolume:
    """Preprocessed slices of one volume on disk (``prepare_volume``): ``slices.npy``
    ``(S, 1, H, W)`` float32 in the prior's units [0, 1], memory-mapped so that reading a batch
    reads only that batch, and ``meta.json``: the volume id, the source file, the kept slice
    ``indices`` (along the RAS slicing axis) and the ``SliceGeometry`` that maps slices back
    onto the source's grid (``recon.data.loading``)."""

    directory: Path
    name: str
    source: str
    indices: list[int]
    geometry: dict

    @property
    def slices(self) -> np.ndarray:
        return np.load(self.directory / "slices.npy", mmap_mode="r")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(n) for n in self.slices.shape[-2:])

    def read(self, ranks: Sequence[int]) -> Tensor:
        """Slices at positions ``ranks`` (0..S-1) as ``(B, 1, H, W)`` float32."""
        return torch.from_numpy(np.ascontiguousarray(self.slices[list(ranks)]))

    @classmethod
    def open(cls, directory: str | Path) -> PreparedVolume:
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file() or not (directory / "slices.npy").is_file():
            raise FileNotFoundError(f"{directory} is not a prepared volume (meta.json/slices.npy)")
        meta = json.loads(meta_path.read_text())
        return cls(directory, meta["name"], meta["source"], [int(i) for i in meta["indices"]],
                   meta["geometry"])

    def to_native(self, stack: np.ndarray, rescale: bool = True) -> np.ndarray:
        """Slices ``(S, H, W)`` back onto the source's grid (other slices 0)."""
        return SliceGeometry.from_dict(self.geometry).to_native(np.asarray(stack), self.indices,
                                                                rescale=rescale)


def prepare_volume(path: str | Path, data: SliceSource, out_dir: str | Path, max_slices: int | None,
                   name: str | None = None) -> Path:
    """Preprocess one NIfTI volume with the prior's transforms (``recon.data.loading``: RAS,
    percentile scaling to [0, 1], slices resized to ``data.image_size``), keep the
    ``max_slices`` central foreground slices and store them as a ``PreparedVolume`` in
    ``out_dir/<name>-<key>`` (written to a temporary folder, then renamed)."""
    path = Path(path)
    name = name or volume_name(path)
    cfg = SliceConfig(size=data.image_size, axis=data.axis, normalise=data.normalise)
    st = path.stat()
    key = hashlib.sha256(json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, cfg.key(),
                                     max_slices]).encode()).hexdigest()[:12]
    final = Path(out_dir) / f"{name}-{key}"
    if (final / "meta.json").is_file():
        return final
    vol = load_volume(path, config=cfg, volume_id=name)
    indices = vol.indices(max_slices=max_slices)
    if not indices:
        raise DataError(f"volume {name!r}: no slice has enough foreground to reconstruct "
                        f"({path})")
    with atomic_dir(final) as tmp:
        np.save(tmp / "slices.npy", vol.slices[indices].numpy().astype(np.float32))
        (tmp / "meta.json").write_text(json.dumps({
            "name": name, "source": str(path.resolve()), "indices": indices,
            "geometry": vol.geometry.to_dict(), "slice_config": cfg.key()}, indent=1))
    return final


def volume_name(path: str | Path) -> str:
    """``sub-01_T1w`` for ``.../sub-01_T1w.nii.gz``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".mgz", ".npy"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def write_outputs(stack: Callable[[str], np.ndarray], prepared: PreparedVolume,
                  out_dir: str | Path) -> dict[str, str]:
    """Write a finished reconstruction, each file atomically (temporary name, then rename) and
    one output at a time: ``stack(name)`` gives the ``(S, H, W)`` array of a ``STACKS`` name
    (e.g. read from slab files) when that output is written, so memory holds one stack and its
    native-grid copy, not all four stacks at once:

    - ``recon.nii.gz``, ``naive.nii.gz``, ``std.nii.gz``: on the *source's* grid with its
      shape, affine and header (``write_nifti(like=source)``), in the source's intensity units
      (std scaled by the same factor); slices that were not reconstructed are 0;
    - ``slices.npz``: ``truth``, ``naive``, ``recon``, ``std`` ``(S, H, W)`` on the prior's grid
      in [0, 1], the slice ``indices`` and ``slice_aspect``, the slice spacing over the pixel
      size (what the metrics and figures use).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lo, hi = prepared.geometry["intensity"]
    paths = {}
    npz = out_dir / "slices.npz"
    with atomic_path(npz, suffix=".npz") as tmp, \
            zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        # each stack is read once: into slices.npz (np.savez's layout) and, but for the truth,
        # onto the source's grid as NIfTI
        geometry = SliceGeometry.from_dict(prepared.geometry)
        with zf.open("slice_aspect.npy", "w") as member:
            np.lib.format.write_array(member, np.float64(geometry.slice_mm / geometry.pixel_mm))
        for name in ("indices", *STACKS):
            array = np.asarray(prepared.indices) if name == "indices" else stack(name)
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
            if name in ("recon", "naive", "std"):
                native = prepared.to_native(array, rescale=name != "std")
                if name == "std":
                    native *= float(hi - lo)
                paths[name] = str(write_nifti(native, out_dir / f"{name}.nii.gz",
                                              like=prepared.source))
            del array
    paths["stacks"] = str(npz)
    return paths


def read_stacks(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a ``slices.npz`` written by ``write_outputs``."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
