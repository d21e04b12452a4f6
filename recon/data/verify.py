"""Checking the files a manifest lists: sha256 (and, for a NIfTI, its shape, spacing,
orientation and a finite, non-constant content) or, for raw k-space, a readable scan; the
decoded content's hash, so that a copy of a train volume under another name is caught."""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from recon.data.errors import DataError
from recon.data.manifest import Manifest, VolumeEntry, resolve
from recon.data.nifti import affine_problem


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class VolumeCheck:
    """What ``verify`` found for one volume; ``status`` is ``ok`` or ``missing (optional)``."""

    id: str
    split: str
    path: Path
    status: str
    shape: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    orientation: str | None = None
    nbytes: int | None = None
    content: str | None = None
    """sha256 of the decoded voxels (shape and values, ``content_digest``): the same scan in
    another file (re-compressed, another header, another dtype) has the same content."""


def content_digest(data: np.ndarray) -> str:
    """sha256 of an array's shape and values, whatever its dtype: each value as a float64
    (complex128 for complex data; exact for integer and float32 voxels; -0.0 as 0.0), C order,
    one slice of the first axis at a time (memory: one slice)."""
    arr = np.atleast_1d(np.asarray(data))
    wide = np.complex128 if np.iscomplexobj(arr) else np.float64
    h = hashlib.sha256(f"{arr.shape}".encode())
    for plane in arr:  # a view: a Fortran-ordered volume (NIfTI's) is not copied whole
        h.update(np.ascontiguousarray(plane, dtype=wide) + 0.0)
    return h.hexdigest()


def verify_volume(volume: VolumeEntry, data_root: str | Path, *, checksum: bool = True,
                  read: bool = True) -> VolumeCheck:
    """Check one volume; ``DataError`` naming the id and the problem when something is wrong.

    Checks, in order: path inside the root, file present (an ``optional`` volume may be
    missing), sha256, readable NIfTI (header and all voxels), a 3-D volume (a 4-D one only
    with a 4th dimension of size 1), finite voxels, and ``shape``/``spacing``/``orientation``
    when the manifest gives them. A ``kspace`` entry is read as raw k-space instead
    (``recon.data.kspace``: header, acquisitions, shapes, finite samples).
    """
    path = resolve(volume, data_root)
    if not path.is_file():
        if volume.optional:
            return VolumeCheck(volume.id, volume.split, path, "missing (optional)")
        raise DataError(f"volume {volume.id!r}: missing file {path}"
                        + (" (run `recon materialise`?)"
                           if volume.provenance.source else ""))
    if checksum:
        got = sha256_file(path)
        if got != volume.sha256:
            raise DataError(f"volume {volume.id!r}: checksum mismatch for {path}: expected "
                            f"sha256 {volume.sha256}, got {got}")
    if not read:
        return VolumeCheck(volume.id, volume.split, path, "ok", nbytes=path.stat().st_size)
    if volume.kind == "kspace":
        return _verify_kspace(volume, path)
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for corrupt/truncated files
        raise DataError(f"volume {volume.id!r}: unreadable NIfTI {path}: "
                        f"{type(err).__name__}: {err}") from None
    shape = tuple(int(s) for s in data.shape)
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise DataError(f"volume {volume.id!r}: expected a 3-D volume (or 4-D with a 4th "
                        f"dimension of size 1), got shape {shape}")
    if np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.complexfloating):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise DataError(f"volume {volume.id!r}: {bad} non-finite (NaN/Inf) voxels in {path}")
    zooms = tuple(round(float(z), 4) for z in img.header.get_zooms()[:3])
    problem = affine_problem(img.affine)
    if problem:
        raise DataError(f"volume {volume.id!r}: {problem} in {path}")
    axcodes = "".join(nib.aff2axcodes(img.affine))
    if volume.shape is not None and tuple(volume.shape) != shape:
        raise DataError(f"volume {volume.id!r}: shape {shape} differs from the manifest's "
                        f"{tuple(volume.shape)}")
    if volume.spacing is not None and not np.allclose(volume.spacing, zooms[:len(volume.spacing)],
                                                      rtol=1e-3, atol=1e-3):
        raise DataError(f"volume {volume.id!r}: spacing {zooms} differs from the manifest's "
                        f"{tuple(volume.spacing)}")
    if volume.orientation is not None and volume.orientation != axcodes:
        raise DataError(f"volume {volume.id!r}: orientation {axcodes} differs from the "
                        f"manifest's {volume.orientation}")
    return VolumeCheck(volume.id, volume.split, path, "ok", shape, zooms, axcodes,
                       path.stat().st_size, content_digest(data))


def _verify_kspace(volume: VolumeEntry, path: Path) -> VolumeCheck:
    """A raw k-space file: readable as a Cartesian 2-D multi-slice acquisition
    (``recon.data.kspace.read_kspace``: header, shapes, finite samples), its k-space shape
    ``(slices, coils, readout, phase)`` as the manifest says when it says."""
    from recon.data.kspace import read_kspace

    try:
        scan = read_kspace(path)
    except DataError as err:
        raise DataError(f"volume {volume.id!r}: {err}") from None
    if scan.noise is None:  # the noise level then comes from the k-space corners
        from recon.classical.coils import corner_noise_variance

        try:
            corner_noise_variance(scan.kspace, scan.mask)
        except ValueError as err:
            raise DataError(f"volume {volume.id!r}: {path}: {err}, and the file has no noise "
                            "scans to measure it from") from None
    if volume.shape is not None and tuple(volume.shape) != scan.shape:
        raise DataError(f"volume {volume.id!r}: k-space shape {scan.shape} differs from the "
                        f"manifest's {tuple(volume.shape)}")
    return VolumeCheck(volume.id, volume.split, path, "ok", scan.shape,
                       tuple(round(v, 4) for v in scan.voxel_mm), None, path.stat().st_size)


def verify(manifest: Manifest, data_root: str | Path, *, split: str | None = None,
           ids: Iterable[str] | None = None, checksum: bool = True,
           read: bool = True) -> list[VolumeCheck]:
    """``verify_volume`` for every volume (of ``split`` / ``ids``); one ``DataError`` listing
    every problem (one line per volume) if any volume fails."""
    wanted = None if ids is None else set(ids)
    checks, problems = [], []
    for v in manifest.volumes(split):
        if wanted is not None and v.id not in wanted:
            continue
        try:
            checks.append(verify_volume(v, data_root, checksum=checksum, read=read))
        except DataError as err:
            problems.append(str(err))
    same: dict[str, list[VolumeCheck]] = defaultdict(list)
    for c in checks:
        if c.content is not None:
            same[c.content].append(c)
    for copies in same.values():
        if len({c.split for c in copies}) > 1:
            problems.append("the same scan (identical voxels) is listed in more than one split, "
                            "a leak between splits: "
                            + ", ".join(f"{c.id} ({c.split}, {c.path.name})" for c in copies))
    if problems:
        head = f"{len(problems)} problem(s) in {manifest.name!r} under {os.fspath(data_root)}:"
        raise DataError("\n".join([head, *problems]) if len(problems) > 1 else problems[0])
    return checks
