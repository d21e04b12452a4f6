r"""Raw multi-coil k-space files: ISMRMRD HDF5 and fastMRI HDF5, read into one ``KSpaceScan``.

    scan = read_kspace("meas.h5")            # the format is recognised from the file's layout
    scan.kspace      # (S, C, R, P) complex64: slices, coils, readout samples, phase-encode lines
    scan.mask        # (S, P) bool: the phase-encode lines that were acquired
    scan.affine()    # 4x4 voxel -> RAS mm of the reconstructed (R_recon, P_recon, S) volume

Layout and conventions (the same for both formats):

- k-space is stored as acquired, on the *encoded* grid ``(R_enc, P_enc)`` = the header's
  ``encodedSpace.matrixSize`` ``(x, y)``: the readout (x, frequency encoding, usually
  oversampled 2x) along rows, the phase-encode lines along columns, centred so that the
  k-space centre sits at ``(R_enc // 2, P_enc // 2)`` (``recon.operators.fft2c``). Lines that
  were not acquired are zero and ``mask`` is False there.
- The reconstructed image has the header's ``reconSpace.matrixSize`` ``(R, P)``: the readout
  oversampling is removed (``recon.classical.coils.remove_readout_oversampling``), a larger encoded
  phase field of view is cropped in the image after reconstruction.
- Geometry (ISMRMRD acquisition headers): ``position`` is the centre of the slice, which is
  where pixel ``(R // 2, P // 2)`` of the image lies (the DFT's centre), ``read_dir``,
  ``phase_dir``, ``slice_dir`` the unit vectors of rows, columns and slices, all in the
  scanner's patient coordinates (LPS, as DICOM). ``affine`` turns them into a NIfTI (RAS)
  affine for the ``(R, P, S)`` array, so the reconstruction overlays a DICOM-derived NIfTI of
  the same scan. fastMRI files carry no positions: they are taken as fastMRI displays them
  (axial, radiological: rows anterior to posterior, columns right to left), centred at the
  origin, with the header's voxel size.
- Noise: ISMRMRD noise-scan acquisitions (``ACQ_IS_NOISE_MEASUREMENT``) are kept as
  ``noise (C, N)``; fastMRI files have none.
- ``reference``: fastMRI's ``reconstruction_rss`` ``(S, R, P)`` when present.

Refused with a ``KSpaceError`` naming the file and the problem: unreadable or truncated
HDF5, a layout that is neither format, a missing or invalid header, non-Cartesian
trajectories, 3-D encoding, asymmetric echoes, several contrasts/repetitions/sets/phases,
k-space whose shape disagrees with the header, non-finite samples.

This module is the front door (``read_kspace``, and the names below re-exported); the parts:
``recon.data.kspace_scan`` (``KSpaceScan`` and the checks), ``recon.data.ismrmrd_file`` and
``recon.data.fastmri_file`` (each format's reader and writer).
"""

from __future__ import annotations

from pathlib import Path

from recon.data.fastmri_file import read_fastmri, write_fastmri
from recon.data.ismrmrd_file import read_ismrmrd, write_ismrmrd
from recon.data.kspace_scan import (
    LPS_TO_RAS,
    MAX_KSPACE_BYTES,
    MAX_MATRIX,
    KSpaceError,
    KSpaceScan,
    KSpaceWarning,
    check_sampling,
    open_h5,
)

__all__ = ["LPS_TO_RAS", "MAX_KSPACE_BYTES", "MAX_MATRIX", "KSpaceError", "KSpaceScan",
           "KSpaceWarning", "kspace_format", "read_fastmri", "read_ismrmrd", "read_kspace",
           "write_fastmri", "write_ismrmrd"]


def kspace_format(path: str | Path) -> str:
    """``"ismrmrd"`` (``/dataset/xml`` and ``/dataset/data``) or ``"fastmri"`` (``/kspace``)."""
    path = Path(path)
    with open_h5(path) as f:
        if "kspace" in f:
            return "fastmri"
        if "dataset" in f:
            return "ismrmrd"
    raise KSpaceError(f"{path}: neither an ISMRMRD file (/dataset/xml + /dataset/data) nor a "
                      "fastMRI file (/kspace)")


def read_kspace(path: str | Path) -> KSpaceScan:
    """Read an ISMRMRD or fastMRI file (recognised from its layout); every slice must have
    acquired lines (``check_sampling``)."""
    scan = (read_fastmri if kspace_format(path) == "fastmri" else read_ismrmrd)(path)
    check_sampling(scan.mask, Path(path))
    return scan
