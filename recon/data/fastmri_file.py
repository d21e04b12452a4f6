"""fastMRI HDF5 (``h5py``): ``/kspace`` ``(slices, coils, readout, phase)``, the ISMRMRD XML
header, the sampling mask and ``reconstruction_rss``, read into a ``KSpaceScan`` and written
from one."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from recon.data.ismrmrd_file import ismrmrd_header
from recon.data.kspace_scan import (
    KSpaceError,
    KSpaceScan,
    KSpaceWarning,
    check_finite,
    check_geometry,
    check_signal,
    check_size,
    header_geometry,
    open_h5,
    parse_header,
)


def read_fastmri(path: str | Path) -> KSpaceScan:
    """Read a fastMRI HDF5 file: ``kspace`` ``(S, C, R_enc, P_enc)`` (single-coil
    ``(S, R_enc, P_enc)``: one coil), ``ismrmrd_header`` (XML) for the matrix and field of view,
    the acquired lines from ``mask`` when given (fastMRI's test files) else from the non-zero
    columns, and ``reconstruction_rss`` as the reference when present."""
    import h5py

    path = Path(path)
    with open_h5(path) as f:
        if "kspace" not in f:
            raise KSpaceError(f"{path}: no /kspace dataset: not a fastMRI file")
        if "ismrmrd_header" not in f:
            raise KSpaceError(f"{path}: no /ismrmrd_header: the matrix and field of view are "
                              "unknown")
        for name in ("kspace", "ismrmrd_header", "mask", "reconstruction_rss"):
            if name in f and not isinstance(f[name], h5py.Dataset):
                raise KSpaceError(f"{path}: /{name} is a {type(f[name]).__name__.lower()}, not "
                                  "a dataset")
        shape, dtype = f["kspace"].shape, f["kspace"].dtype
        if dtype.kind != "c":
            raise KSpaceError(f"{path}: kspace must be complex, got {dtype}")
        if len(shape) not in (3, 4):
            raise KSpaceError(f"{path}: kspace must be (slices, coils, readout, phase), got shape "
                              f"{shape}")
        try:
            xml = f["ismrmrd_header"][()]
        except (OSError, ValueError) as err:
            raise KSpaceError(f"{path}: cannot read the ISMRMRD header: {err}") from None
        _, enc = parse_header(np.asarray(xml).reshape(-1)[0] if np.ndim(xml) else xml, path)
        (r, p), fov, (r_enc, p_enc) = header_geometry(enc)
        check_geometry(path, (r, p), fov, (r_enc, p_enc))
        if shape[-1] == p_enc and shape[-2] != r_enc and shape[-2] == r:
            # the header describes the oversampled readout, the file holds it already removed
            warnings.warn(f"{path}: the header's encoded readout is {r_enc} but the k-space "
                          f"holds {shape[-2]} samples (oversampling already removed): "
                          f"reconstructing on the stored {shape[-2]} x {shape[-1]} matrix",
                          KSpaceWarning, stacklevel=2)
            r_enc = shape[-2]
        if tuple(shape[-2:]) != (r_enc, p_enc):
            raise KSpaceError(f"{path}: kspace is {shape[-2]} x {shape[-1]} but the header's "
                              f"encoded matrix is {r_enc} x {p_enc}")
        check_size(path, shape[0], 1 if len(shape) == 3 else shape[1], (r_enc, p_enc),
                    stored_bytes=path.stat().st_size)
        try:
            k = np.asarray(f["kspace"][()])
            mask = np.asarray(f["mask"][()]) if "mask" in f else None
            ref = np.asarray(f["reconstruction_rss"][()], np.float32) \
                if "reconstruction_rss" in f else None
        except (OSError, KeyError, ValueError) as err:
            raise KSpaceError(f"{path}: cannot read the fastMRI datasets (truncated or corrupt?): "
                              f"{err}") from None
    if k.ndim == 3:
        k = k[:, None]
    k = k.astype(np.complex64, copy=False)
    check_finite(k, path)
    check_signal(k, path)
    if mask is not None:
        if np.size(mask) != p_enc:
            raise KSpaceError(f"{path}: the mask has {np.size(mask)} entries, not one per "
                              f"phase-encode line ({p_enc})")
        mask = np.broadcast_to(np.asarray(mask).reshape(-1).astype(bool), (k.shape[0], p_enc))
    else:
        mask = np.abs(k).sum(axis=(1, 2)) > 0
    if ref is not None and ref.shape != (k.shape[0], r, p):
        raise KSpaceError(f"{path}: reconstruction_rss has shape {ref.shape}, expected "
                          f"{(k.shape[0], r, p)} (slices, recon matrix)")
    return KSpaceScan(kspace=k, mask=np.array(mask), recon_matrix=(r, p), fov_mm=fov,
                      reference=ref, source=str(path), format="fastmri",
                      header_xml=xml.decode() if isinstance(xml, bytes) else str(xml),
                      **AS_DISPLAYED)


AS_DISPLAYED = {"read_dir": (0.0, 1.0, 0.0), "phase_dir": (1.0, 0.0, 0.0),
                "slice_dir": (0.0, 0.0, 1.0)}
"""The directions of a fastMRI file, which states none: an axial slice as fastMRI displays it
(radiological), rows from anterior to posterior (LPS +y), columns from the patient's right to
left (LPS +x). (ISMRMRD's defaults, rows along +x, had the prior see these brains turned by
90 degrees, an orientation its training, rotated by at most 15 degrees, never showed.)"""


def write_fastmri(scan: KSpaceScan, path: str | Path, acquisition: str = "AXT1") -> Path:
    """Write ``scan`` in fastMRI's layout: ``kspace`` (unacquired lines zero), ``ismrmrd_header``,
    ``mask`` (one flag per phase-encode line, when undersampled: fastMRI's test files),
    ``reconstruction_rss`` (``scan.reference``, when given) and the attributes fastMRI sets
    (``acquisition``, ``max``, ``norm``, ``patient_id``)."""
    import h5py
    from ismrmrd.xsd import ToXML

    from recon.data.nifti import atomic_path

    path = Path(path)
    k = np.where(scan.mask[:, None, None, :], scan.kspace, 0).astype(np.complex64)
    xml = ToXML(ismrmrd_header(scan, scan.shape[1]))
    with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("kspace", data=k)
        f.create_dataset("ismrmrd_header", data=np.bytes_(xml))
        if not scan.fully_sampled:
            if not (scan.mask == scan.mask[:1]).all():
                raise ValueError("fastMRI files hold one mask for all slices")
            f.create_dataset("mask", data=scan.mask[0])
        if scan.reference is not None:
            ref = np.asarray(scan.reference, np.float32)
            f.create_dataset("reconstruction_rss", data=ref)
            f.attrs["max"] = float(ref.max())
            f.attrs["norm"] = float(np.linalg.norm(ref))
        f.attrs["acquisition"] = acquisition
        f.attrs["patient_id"] = Path(scan.source).stem or path.stem
    return path
