"""NIfTI volume I/O that keeps the geometry: a reconstruction written with ``like=input``
carries the input's affine, sform/qform (with their codes), voxel sizes and units, so it
overlays the input in any viewer.

    data, affine, header = read_nifti("sub-01_T1w.nii.gz")      # float32 array
    write_nifti(recon, "out/sub-01_recon.nii.gz", like="sub-01_T1w.nii.gz")

Writes are atomic: the file is written next to its destination under a temporary name,
flushed to disk, then renamed over the destination (``os.replace``), so a crash or error never
leaves a half-written file behind. ``atomic_path`` and ``atomic_write_bytes`` are the helpers.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["atomic_dir", "atomic_path", "atomic_write_bytes", "nifti_suffix", "read_nifti", "write_nifti"]


def nifti_suffix(path: str | Path) -> str:
    """``.nii.gz`` or ``.nii`` (ValueError for anything else)."""
    name = Path(path).name.lower()
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    raise ValueError(f"{path}: expected a .nii or .nii.gz file name")


def _new_temp_file(folder: Path, prefix: str, suffix: str) -> Path:
    """Create a new empty file ``folder/prefix<random>suffix``, like ``tempfile.mkstemp`` but with
    the permissions ``open()`` gives (``0o666`` less the umask) rather than ``0o600``, so the file
    renamed into place looks like one written directly."""
    for _ in range(tempfile.TMP_MAX):
        tmp = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary file name {prefix}*{suffix} in {folder}")


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder (ending in ``suffix``, e.g. ``.nii.gz`` for
    writers that look at the name); on success fsync it and ``os.replace`` it onto ``path``; on
    any exception remove it and leave ``path`` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_file(path.parent, f".{path.name}.", f".tmp{suffix or ''}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a new temporary folder beside ``path``; on success it replaces ``path`` (an older
    folder there is removed first); on any exception it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see ``atomic_path``)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return path


def affine_problem(affine) -> str | None:
    """Why a voxel-to-world affine cannot place a volume (``None`` if it can): not a finite
    4x4 matrix, a last row other than ``[0, 0, 0, 1]``, or a singular 3x3 part (zero or
    collinear voxel axes: no orientation, and outputs written with it would not overlay)."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        return f"the affine has shape {a.shape}, not 4x4"
    if not np.isfinite(a).all():
        return "the affine holds NaN/Inf values"
    if not np.allclose(a[3], [0.0, 0.0, 0.0, 1.0]):
        return f"the affine's last row is {a[3].tolist()}, not [0, 0, 0, 1]"
    m = a[:3, :3]
    scale = max(float(np.abs(m).max()), 1e-300)
    if abs(float(np.linalg.det(m / scale))) < 1e-9:
        return "the affine's 3x3 part is singular (zero or collinear voxel axes)"
    return None


def read_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """``(data, affine, header)``: voxels as float32 (scl_slope/inter applied), the 4x4 affine
    nibabel chooses (sform if set, else qform), and a copy of the header."""
    img = nib.load(Path(path))
    data = np.asarray(img.get_fdata(dtype=np.float32))
    return data, np.array(img.affine, dtype=np.float64), img.header.copy()


def write_nifti(array: np.ndarray, path: str | Path, *, like: str | Path | nib.Nifti1Image |
                None = None, affine: np.ndarray | None = None,
                header: nib.Nifti1Header | None = None) -> Path:
    """Write ``array`` as float32 NIfTI to ``path`` (``.nii`` or ``.nii.gz``), atomically.

    ``like`` (a path or a nibabel image) gives the geometry: its header (sform and qform with
    their codes, zooms, units, description) and affine are kept, with the data type set to
    float32 and no intensity scaling. ``array`` must have the shape of ``like``; a 3-D array is
    accepted for a 4-D ``like`` whose 4th dimension is 1. Without ``like``, ``affine`` (default
    identity) and optionally ``header`` are used.
    """
    path = Path(path)
    suffix = nifti_suffix(path)
    data = np.asarray(array, dtype=np.float32)
    if like is not None:
        if affine is not None or header is not None:
            raise ValueError("give either like= or affine=/header=, not both")
        ref = nib.load(like) if isinstance(like, str | os.PathLike) else like
        ref_shape = tuple(ref.shape)
        if data.shape != ref_shape:
            if ref_shape[3:] == (1,) and data.shape == ref_shape[:3]:
                data = data.reshape(ref_shape)
            else:
                raise ValueError(f"array shape {data.shape} differs from the reference shape "
                                 f"{ref_shape}: the output would not overlay the input")
        hdr = ref.header.copy()
        sform, scode = ref.header.get_sform(coded=True)
        qform, qcode = ref.header.get_qform(coded=True)
        img = nib.Nifti1Image(data, ref.affine, hdr)
        img.set_sform(sform, code=int(scode))
        img.set_qform(qform, code=int(qcode))
    else:
        aff = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
        img = nib.Nifti1Image(data, aff, None if header is None else header.copy())
        if header is None:
            img.set_qform(aff, code=1)
            img.set_sform(aff, code=1)
    img.set_data_dtype(np.float32)
    img.header.set_slope_inter(np.nan, np.nan)
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, tmp)
    return path
