"""Conversions of what packages ship into the files a manifest lists, as deterministic bytes:
JPEG slices, NRRD and DICOM series to NIfTI; simulated and PyQMRI k-space to HDF5."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from recon.data.manifest import DataError


def jpg_to_nifti_bytes(jpg: bytes, description: str = "") -> bytes:
    """A JPEG brain slice as an uncompressed single-slice NIfTI-1 (``uint8``, shape
    ``(W, H, 1)``), with deterministic bytes.

    Geometry: 1 mm isotropic voxels, identity affine (RAS+, qform and sform code 1, units mm).
    Image columns (left to right) become +x and image rows bottom to top become +y, so the top
    of the picture (anterior for the antspyx slices) points to +y (A) and the slice is axial
    (+z, S). The picture's left/right convention is not recorded in the JPEG, so x = R is an
    assumption.
    """
    from PIL import Image

    with Image.open(io.BytesIO(jpg)) as im:
        pixels = np.asarray(im.convert("L"), dtype=np.uint8)
    data = np.ascontiguousarray(pixels[::-1, :].T[:, :, None])  # (x=cols, y=rows flipped, 1)
    img = nib.Nifti1Image(data, np.eye(4))
    img.set_qform(np.eye(4), code=1)
    img.set_sform(np.eye(4), code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = description.encode("ascii", "replace")[:79]
    img.set_data_dtype(np.uint8)
    return img.to_bytes()


def nifti_bytes(data: np.ndarray, affine_lps: np.ndarray, description: str) -> bytes:
    """An uncompressed NIfTI-1 (deterministic bytes) of ``data`` whose voxel -> world map is
    ``affine_lps`` in DICOM/NRRD patient coordinates (LPS), stored as RAS+."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps  # LPS -> RAS
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = description.encode("ascii", "replace")[:79]
    img.set_data_dtype(data.dtype)
    return img.to_bytes()


def nrrd_to_nifti_bytes(raw: bytes, description: str = "") -> bytes:
    """A 3-D scalar NRRD file (``space: left-posterior-superior``, ``space directions``,
    ``space origin``; read with ``pynrrd``) as an uncompressed NIfTI-1 in its own dtype."""
    import tempfile

    import nrrd

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image.nrrd"
        path.write_bytes(raw)
        try:
            data, header = nrrd.read(str(path))
        except Exception as err:  # pynrrd raises its own NRRDError and ValueErrors
            raise DataError(f"not a readable NRRD file: {err}") from None
    if data.ndim != 3 or header.get("space") not in ("left-posterior-superior", "LPS"):
        raise DataError(f"expected a 3-D NRRD in LPS space, got shape {data.shape} and space "
                        f"{header.get('space')!r}")
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(header["space directions"], dtype=np.float64).T
    affine[:3, 3] = np.asarray(header["space origin"], dtype=np.float64)
    return nifti_bytes(data, affine, description)


def dicom_series_to_nifti_bytes(files: Sequence[bytes], description: str = "") -> bytes:
    """One DICOM series (single-frame slices of one orientation; read with ``pydicom``) as an
    uncompressed NIfTI-1: slices sorted along the slice normal, rescale slope/intercept
    applied (int16 when that keeps the values exact, else float32), voxel ``(column, row,
    slice)`` placed by ``ImagePositionPatient``, ``ImageOrientationPatient`` and
    ``PixelSpacing`` (the slice step from the first and last positions)."""
    import pydicom

    slices = []
    for raw in files:
        try:
            ds = pydicom.dcmread(io.BytesIO(raw))
            pixels = ds.pixel_array.astype(np.float64)
            orient = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
            position = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
            spacing = np.asarray(ds.PixelSpacing, dtype=np.float64)
        except Exception as err:  # pydicom's errors are many kinds
            raise DataError(f"not a readable DICOM image slice: {err}") from None
        pixels = pixels * float(getattr(ds, "RescaleSlope", 1) or 1) + \
            float(getattr(ds, "RescaleIntercept", 0) or 0)
        slices.append((orient, position, spacing, pixels))
    if len(slices) < 2:
        raise DataError(f"a DICOM series needs at least 2 slices, got {len(slices)}")
    orient, _, spacing, first = slices[0]
    if any(not np.allclose(o, orient, atol=1e-4) or not np.allclose(s, spacing) or
           p.shape != first.shape for o, _, s, p in slices):
        raise DataError("the DICOM slices differ in orientation, pixel spacing or size")
    row_dir, col_dir = orient[:3], orient[3:]
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda s: float(s[1] @ normal))
    positions = np.stack([s[1] for s in slices])
    step = (positions[-1] - positions[0]) / (len(slices) - 1)
    data = np.stack([s[3].T for s in slices], axis=-1)  # (columns, rows, slices)
    if np.array_equal(data, np.round(data)) and data.min() >= -32768 and data.max() <= 32767:
        data = data.astype(np.int16)
    else:
        data = data.astype(np.float32)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * spacing[1]  # along a row: the column index grows
    affine[:3, 1] = col_dir * spacing[0]
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    return nifti_bytes(data, affine, description)


def h5_bytes(write: Callable[[Path], object]) -> bytes:
    """The bytes of an HDF5 file written by ``write(path)`` into a temporary folder."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scan.h5"
        write(path)
        return path.read_bytes()


def simulated_kspace_bytes(nifti: Path, fmt: str = "ismrmrd", **params) -> bytes:
    """An ISMRMRD (or fastMRI, ``fmt``) file of the multi-coil acquisition simulated from the
    NIfTI volume ``nifti`` (``recon.data.simulate.simulate_scan(**params)``): deterministic
    bytes for a given numpy/h5py."""
    from recon.data.kspace import write_fastmri, write_ismrmrd
    from recon.data.simulate import simulate_scan

    scan = simulate_scan(nifti, **params)
    writer = {"ismrmrd": write_ismrmrd, "fastmri": write_fastmri}[fmt]
    return h5_bytes(lambda path: writer(scan, path))


def pyqmri_to_fastmri_bytes(raw: bytes, flip: int = 4, fov_mm: float = 224.0,
                            thickness_mm: float = 1.0) -> bytes:
    """PyQMRI's in-vivo test acquisition (``VFA_cart_smalltest.h5``: Cartesian, fully sampled,
    ``real_dat``/``imag_dat`` ``(flip angles, coils, 1, 224, 224)`` with the k-space centre at
    index 0) as a fastMRI file: the ``flip``-th flip angle's k-space centred for ``fft2c``
    (``fft2c(ifft2(k))``: the same image, DC moved to the middle), the root-sum-of-squares of
    the fully sampled coil images as ``reconstruction_rss``. The file states no geometry:
    ``fov_mm`` and ``thickness_mm`` are assumptions (1 mm pixels)."""
    import tempfile

    import h5py

    from recon.classical.coils import centered_fft, centered_ifft, rss
    from recon.data.kspace import KSpaceScan, write_fastmri

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "pyqmri.h5"
        src.write_bytes(raw)
        with h5py.File(src, "r") as f:
            k = f["real_dat"][flip, :, 0] + 1j * f["imag_dat"][flip, :, 0]
    k = centered_fft(np.fft.ifft2(k.astype(np.complex64), norm="ortho")).astype(np.complex64)
    _, r, p = k.shape
    scan = KSpaceScan(kspace=k[None], mask=np.ones((1, p), bool), recon_matrix=(r, p),
                      fov_mm=(fov_mm, fov_mm * p / r, thickness_mm),
                      reference=rss(centered_ifft(k))[None].astype(np.float32),
                      source="pyqmri_vfa_brain", format="fastmri")
    return h5_bytes(lambda path: write_fastmri(scan, path, acquisition="AXFLASH"))


def mirtorch_to_fastmri_bytes(raw: bytes, fov_mm: float = 220.0, thickness_mm: float = 5.0) -> bytes:
    """The fastMRI brain slice inside MIRTorch 0.1's sdist (``AXT2_210_6001736_layer11.npz``:
    slice 11 of fastMRI's ``file_brain_AXT2_210_6001736``, an axial T2 of 16 coils, fully
    sampled Cartesian, ``k_r``/``k_i`` int16 ``(16, 768, 396)`` with the readout oversampled
    twice and the k-space centre in the middle, as ``fft2c`` has it) as a fastMRI file: the
    k-space divided by 32767 (MIRTorch's own demo does so; the scanner's units are lost),
    reconstructed matrix 384 x 396 (the readout oversampling removed), the root-sum-of-squares
    of the fully sampled coil images as ``reconstruction_rss``. The npz states no geometry:
    ``fov_mm`` (readout) and ``thickness_mm`` are assumptions (square pixels)."""
    import io

    from recon.classical.coils import centered_ifft, remove_readout_oversampling, rss
    from recon.data.kspace import KSpaceScan, write_fastmri

    with np.load(io.BytesIO(raw)) as z:
        k = ((z["k_r"].astype(np.float32) + 1j * z["k_i"].astype(np.float32)) / 32767.0)
    k = k.astype(np.complex64)[None]
    _, _, r_enc, p = k.shape
    r = r_enc // 2
    reference = rss(centered_ifft(remove_readout_oversampling(k, r)))
    scan = KSpaceScan(kspace=k, mask=np.ones((1, p), bool), recon_matrix=(r, p),
                      fov_mm=(fov_mm, fov_mm * p / r, thickness_mm),
                      reference=reference.astype(np.float32), source="mirtorch_fastmri_axt2",
                      format="fastmri")
    return h5_bytes(lambda path: write_fastmri(scan, path, acquisition="AXT2"))
