"""One raw multi-coil acquisition, ``KSpaceScan``, whatever file it came from, and the checks
every reader makes before it allocates anything: the header's geometry, the declared size, finite
and non-zero samples (``KSpaceError`` naming the file and the problem)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from recon.data.errors import DataError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
"""Patient coordinates: DICOM/ISMRMRD use LPS (x to the patient's left, y posterior), NIfTI RAS."""


class KSpaceError(DataError):
    """A raw k-space file that cannot be read as a Cartesian 2-D multi-slice acquisition."""


class KSpaceWarning(UserWarning):
    """A raw k-space file read with an assumption the user should know about."""


@dataclass
class KSpaceScan:
    """One 2-D multi-slice Cartesian acquisition (see the module docstring for the layout)."""

    kspace: np.ndarray
    mask: np.ndarray
    recon_matrix: tuple[int, int]
    fov_mm: tuple[float, float, float]
    """Reconstructed field of view (readout, phase, slice thickness) in mm."""
    positions: np.ndarray | None = None
    """``(S, 3)`` slice centres, LPS mm (None: unknown, fastMRI)."""
    read_dir: tuple[float, float, float] = (1.0, 0.0, 0.0)
    phase_dir: tuple[float, float, float] = (0.0, 1.0, 0.0)
    slice_dir: tuple[float, float, float] = (0.0, 0.0, 1.0)
    noise: np.ndarray | None = None
    reference: np.ndarray | None = None
    source: str = ""
    format: str = ""
    header_xml: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        k = self.kspace
        if k.ndim != 4:
            raise ValueError(f"kspace must be (slices, coils, readout, phase), got {k.shape}")
        if self.mask.shape != (k.shape[0], k.shape[3]):
            raise ValueError(f"mask must be (slices, phase) = {(k.shape[0], k.shape[3])}, "
                             f"got {self.mask.shape}")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.kspace.shape)

    @property
    def encoded_matrix(self) -> tuple[int, int]:
        return tuple(self.kspace.shape[-2:])

    @property
    def readout_oversampling(self) -> float:
        return self.kspace.shape[-2] / self.recon_matrix[0]

    @property
    def fully_sampled(self) -> bool:
        return bool(self.mask.all())

    @property
    def acceleration(self) -> float:
        return float(self.mask.size / max(int(self.mask.sum()), 1))

    @property
    def voxel_mm(self) -> tuple[float, float, float]:
        """Pixel size in the reconstructed image (readout, phase) and the slice thickness."""
        r, p = self.recon_matrix
        return (self.fov_mm[0] / r, self.fov_mm[1] / p, self.fov_mm[2])

    def affine(self) -> np.ndarray:
        """Voxel ``(r, p, s)`` of the reconstructed ``(R, P, S)`` volume -> RAS mm.

        Pixel ``(R // 2, P // 2)`` of slice s is at ``positions[s]``; columns of the affine are
        ``read_dir * dr``, ``phase_dir * dp`` and the step between consecutive slice centres
        (``slice_dir`` times the thickness for a single slice). Raises ``KSpaceError`` when the
        slices are not evenly spaced along one line (no affine can place them)."""
        dr, dp, thickness = self.voxel_mm
        read = LPS_TO_RAS @ np.asarray(self.read_dir, float)
        phase = LPS_TO_RAS @ np.asarray(self.phase_dir, float)
        normal = LPS_TO_RAS @ np.asarray(self.slice_dir, float)
        if self.positions is None:
            centres = np.outer(np.arange(self.shape[0]) - (self.shape[0] - 1) / 2, normal * thickness)
        else:
            centres = np.asarray(self.positions, float) @ LPS_TO_RAS.T
        step = normal * thickness if len(centres) == 1 else centres[1] - centres[0]
        if len(centres) > 1:
            expected = centres[0] + np.outer(np.arange(len(centres)), step)
            if not np.allclose(centres, expected, atol=1e-3 * max(1.0, float(np.abs(step).max()))):
                raise KSpaceError(f"{self.source}: the slices are not evenly spaced along one line "
                                  "(reorder or split the acquisition): no affine places them")
        r, p = self.recon_matrix
        a = np.eye(4)
        a[:3, 0], a[:3, 1], a[:3, 2] = read * dr, phase * dp, step
        a[:3, 3] = centres[0] - (r // 2) * dr * read - (p // 2) * dp * phase
        return a

    def select(self, slices: list[int]) -> KSpaceScan:
        """The scan restricted to ``slices`` (in that order)."""
        pick = list(slices)
        return replace(self, kspace=self.kspace[pick], mask=self.mask[pick],
                       positions=None if self.positions is None else self.positions[pick],
                       reference=None if self.reference is None else self.reference[pick])


def open_h5(path: Path):
    import h5py

    if not path.is_file():
        raise KSpaceError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise KSpaceError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {err}") from None


# -- header -------------------------------------------------------------------------------------
def parse_header(xml, path: Path):
    from ismrmrd.xsd import CreateFromDocument

    if isinstance(xml, bytes):
        xml = xml.decode("utf-8", errors="replace")
    try:
        hdr = CreateFromDocument(xml)
    except Exception as err:  # noqa: BLE001 - xsdata raises several types
        raise KSpaceError(f"{path}: invalid ISMRMRD XML header: {type(err).__name__}: "
                          f"{str(err)[:300]}") from None
    if not hdr.encoding:
        raise KSpaceError(f"{path}: the ISMRMRD header has no <encoding>")
    enc = hdr.encoding[0]
    traj = getattr(enc.trajectory, "value", enc.trajectory)
    if traj != "cartesian":
        raise KSpaceError(f"{path}: {traj} trajectory: only Cartesian k-space is supported")
    for name in ("encodedSpace", "reconSpace"):
        space = getattr(enc, name, None)
        if space is None or space.matrixSize is None or space.fieldOfView_mm is None:
            raise KSpaceError(f"{path}: the ISMRMRD header lacks {name} (matrixSize and "
                              "fieldOfView_mm)")
    if enc.encodedSpace.matrixSize.z > 1:
        raise KSpaceError(f"{path}: 3-D encoding (encodedSpace z = {enc.encodedSpace.matrixSize.z}"
                          "): only 2-D multi-slice acquisitions are supported")
    return hdr, enc


def header_geometry(enc) -> tuple[tuple[int, int], tuple[float, float, float], tuple[int, int]]:
    """``(recon matrix (R, P), recon FOV (mm), encoded matrix (R_enc, P_enc))``."""
    rs, es = enc.reconSpace, enc.encodedSpace
    return ((int(rs.matrixSize.x), int(rs.matrixSize.y)),
            (float(rs.fieldOfView_mm.x), float(rs.fieldOfView_mm.y), float(rs.fieldOfView_mm.z)),
            (int(es.matrixSize.x), int(es.matrixSize.y)))


MAX_MATRIX = 2048
"""The largest side of an encoded or reconstructed matrix that is accepted (clinical matrices
are at most 1024, twice that with readout oversampling)."""

MAX_KSPACE_BYTES = 4 << 30
"""The most k-space (complex64) a file may ask to hold, checked before anything is allocated."""


def check_geometry(path: Path, recon: tuple[int, int], fov: tuple[float, float, float],
                    encoded: tuple[int, int]) -> None:
    """Matrices in ``[1, MAX_MATRIX]``; a field of view of positive, finite mm (a negative one
    would silently mirror the image in world space; zero or NaN has no affine)."""
    for what, (a, b) in (("reconSpace matrixSize", recon), ("encodedSpace matrixSize", encoded)):
        if not (1 <= a <= MAX_MATRIX and 1 <= b <= MAX_MATRIX):
            raise KSpaceError(f"{path}: the header's {what} is {a} x {b}; each side must lie in "
                              f"[1, {MAX_MATRIX}]")
    if not all(np.isfinite(v) and v > 0 for v in fov):
        mirror = (" (a negative field of view would mirror the image in world space)"
                  if any(v < 0 for v in fov) else "")
        raise KSpaceError(f"{path}: the header's reconSpace fieldOfView_mm is "
                          f"{tuple(float(v) for v in fov)}; each must be a positive number of "
                          f"mm{mirror}")


def check_size(path: Path, slices: int, coils: int, encoded: tuple[int, int],
                stored_bytes: int | None = None) -> None:
    """At least one coil, and a k-space array of at most ``MAX_KSPACE_BYTES``; with
    ``stored_bytes`` (the file's size) at most 64 times what the file holds, so that a dataset
    declared huge but never written (unallocated HDF5 chunks) is refused before it is read."""
    if coils < 1:
        raise KSpaceError(f"{path}: the k-space has {coils} coils (receive channels)")
    nbytes = slices * coils * encoded[0] * encoded[1] * 8
    what = f"{slices} slice(s) x {coils} coil(s) x {encoded[0]} x {encoded[1]}"
    if nbytes > MAX_KSPACE_BYTES:
        raise KSpaceError(f"{path}: the k-space would take {nbytes / 2**30:.1f} GiB ({what}), more "
                          f"than the {MAX_KSPACE_BYTES >> 30} GiB accepted")
    if stored_bytes is not None and nbytes > 64 * stored_bytes + (64 << 20):
        raise KSpaceError(f"{path}: the file declares {nbytes / 2**30:.2f} GiB of k-space ({what}) "
                          f"but holds {stored_bytes / 2**20:.1f} MiB: most of it was never written")


def check_signal(k: np.ndarray, path: Path) -> None:
    if not np.any(k):
        raise KSpaceError(f"{path}: every k-space sample is zero: there is no signal to "
                          "reconstruct")


def check_sampling(mask: np.ndarray, path: Path) -> None:
    """Every slice acquires at least one phase-encode line (``mask (S, P)``)."""
    empty = np.flatnonzero(~np.asarray(mask, bool).any(axis=1))
    if empty.size:
        raise KSpaceError(f"{path}: slice(s) {empty.tolist()[:8]}{'...' if empty.size > 8 else ''} "
                          f"of {len(mask)} acquire no phase-encode line: the sampling mask is all "
                          "False there, nothing to reconstruct")


def check_finite(k: np.ndarray, path: Path) -> None:
    if not np.isfinite(k).all():
        raise KSpaceError(f"{path}: {int(np.size(k) - np.isfinite(k).sum())} non-finite (NaN/Inf) "
                          "k-space samples")
