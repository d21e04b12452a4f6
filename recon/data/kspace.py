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
  oversampling is removed (``recon.coils.remove_readout_oversampling``), a larger encoded
  phase field of view is cropped in the image after reconstruction.
- Geometry (ISMRMRD acquisition headers): ``position`` is the centre of the slice, which is
  where pixel ``(R // 2, P // 2)`` of the image lies (the DFT's centre), ``read_dir``,
  ``phase_dir``, ``slice_dir`` the unit vectors of rows, columns and slices, all in the
  scanner's patient coordinates (LPS, as DICOM). ``affine`` turns them into a NIfTI (RAS)
  affine for the ``(R, P, S)`` array, so the reconstruction overlays a DICOM-derived NIfTI of
  the same scan. fastMRI files carry no positions: their affine is axial, centred at the
  origin, with the header's voxel size.
- Noise: ISMRMRD noise-scan acquisitions (``ACQ_IS_NOISE_MEASUREMENT``) are kept as
  ``noise (C, N)``; fastMRI files have none.
- ``reference``: fastMRI's ``reconstruction_rss`` ``(S, R, P)`` when present.

Refused with a ``KSpaceError`` naming the file and the problem: unreadable or truncated
HDF5, a layout that is neither format, a missing or invalid header, non-Cartesian
trajectories, 3-D encoding, asymmetric echoes, several contrasts/repetitions/sets/phases,
k-space whose shape disagrees with the header, non-finite samples.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from recon.data.errors import DataError

__all__ = ["KSpaceError", "KSpaceScan", "KSpaceWarning", "kspace_format", "read_fastmri", "read_ismrmrd",
           "read_kspace", "write_fastmri", "write_ismrmrd"]

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


# -- format detection ---------------------------------------------------------------------------
def _open_h5(path: Path):
    import h5py

    if not path.is_file():
        raise KSpaceError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise KSpaceError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {err}") from None


def kspace_format(path: str | Path) -> str:
    """``"ismrmrd"`` (``/dataset/xml`` and ``/dataset/data``) or ``"fastmri"`` (``/kspace``)."""
    path = Path(path)
    with _open_h5(path) as f:
        if "kspace" in f:
            return "fastmri"
        if "dataset" in f:
            return "ismrmrd"
    raise KSpaceError(f"{path}: neither an ISMRMRD file (/dataset/xml + /dataset/data) nor a "
                      "fastMRI file (/kspace)")


def read_kspace(path: str | Path) -> KSpaceScan:
    """Read an ISMRMRD or fastMRI file (recognised from its layout)."""
    return (read_fastmri if kspace_format(path) == "fastmri" else read_ismrmrd)(path)


# -- header -------------------------------------------------------------------------------------
def _parse_header(xml, path: Path):
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


def _geometry(enc) -> tuple[tuple[int, int], tuple[float, float, float], tuple[int, int]]:
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


def _check_geometry(path: Path, recon: tuple[int, int], fov: tuple[float, float, float],
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


def _check_size(path: Path, slices: int, coils: int, encoded: tuple[int, int],
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


def _check_signal(k: np.ndarray, path: Path) -> None:
    if not np.any(k):
        raise KSpaceError(f"{path}: every k-space sample is zero: there is no signal to "
                          "reconstruct")


def _check_finite(k: np.ndarray, path: Path) -> None:
    if not np.isfinite(k).all():
        raise KSpaceError(f"{path}: {int(np.size(k) - np.isfinite(k).sum())} non-finite (NaN/Inf) "
                          "k-space samples")


# -- ISMRMRD ------------------------------------------------------------------------------------
_SKIPPED_FLAGS = ("ACQ_IS_NAVIGATION_DATA", "ACQ_IS_PHASECORR_DATA", "ACQ_IS_HPFEEDBACK_DATA",
                  "ACQ_IS_DUMMYSCAN_DATA", "ACQ_IS_RTFEEDBACK_DATA",
                  "ACQ_IS_SURFACECOILCORRECTIONSCAN_DATA", "ACQ_IS_PHASE_STABILIZATION_REFERENCE",
                  "ACQ_IS_PHASE_STABILIZATION")
"""Acquisitions that are not image k-space lines (navigators, phase correction, ...)."""


def read_ismrmrd(path: str | Path) -> KSpaceScan:
    """Read a 2-D multi-slice Cartesian ISMRMRD file (the ``ismrmrd`` package): the header's
    encoded and reconstructed matrix and field of view; every image acquisition placed at
    ``(slice, kspace_encode_step_1)``, its readout centred on ``center_sample``; averages of
    the same line averaged; lines flagged as calibration-only kept out of the mask; noise
    scans gathered as ``noise``; slice positions and directions from the acquisition
    headers."""
    import ismrmrd

    path = Path(path)
    with _open_h5(path):
        pass
    try:
        with ismrmrd.File(str(path), "r") as f:
            if "dataset" not in f:
                raise KSpaceError(f"{path}: no /dataset group: not an ISMRMRD file")
            ds = f["dataset"]
            if not ds.has_header():
                raise KSpaceError(f"{path}: no ISMRMRD XML header (/dataset/xml)")
            xml = ds._contents["xml"][0]
            _, enc = _parse_header(xml, path)
            (r, p), fov, (r_enc, p_enc) = _geometry(enc)
            _check_geometry(path, (r, p), fov, (r_enc, p_enc))
            if not ds.has_acquisitions():
                raise KSpaceError(f"{path}: no acquisitions (/dataset/data)")
            acqs = ds.acquisitions[:]  # as large as the file: the header's sizes are checked
    except KSpaceError:
        raise
    except Exception as err:  # noqa: BLE001 - h5py/ctypes errors on damaged files
        raise KSpaceError(f"{path}: cannot read the ISMRMRD acquisitions (truncated or corrupt?): "
                          f"{type(err).__name__}: {err}") from None
    limits = enc.encodingLimits
    lim1 = None if limits is None else limits.kspace_encoding_step_1
    centre_line = p_enc // 2 if lim1 is None else int(lim1.center)
    flags = {name: getattr(ismrmrd, name) for name in _SKIPPED_FLAGS}

    noise, lines = [], []
    for i, acq in enumerate(acqs):
        if acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            noise.append(np.asarray(acq.data))
            continue
        if any(acq.is_flag_set(v) for v in flags.values()):
            continue
        if acq.trajectory_dimensions > 0:
            raise KSpaceError(f"{path}: acquisition {i} carries a trajectory: only Cartesian "
                              "k-space is supported")
        idx = acq.idx
        for dim in ("contrast", "phase", "repetition", "set"):
            if getattr(idx, dim) != 0:
                raise KSpaceError(f"{path}: acquisition {i} has {dim} {getattr(idx, dim)}: only "
                                  f"one {dim} is supported (split the file)")
        if acq.number_of_samples != r_enc:
            raise KSpaceError(f"{path}: acquisition {i} has {acq.number_of_samples} samples but "
                              f"the encoded readout matrix is {r_enc}")
        if acq.center_sample != r_enc // 2:
            raise KSpaceError(f"{path}: acquisition {i} has an asymmetric echo (center_sample "
                              f"{acq.center_sample} of {r_enc}): not supported")
        line = p_enc // 2 + int(idx.kspace_encode_step_1) - centre_line
        if not 0 <= line < p_enc:
            raise KSpaceError(f"{path}: acquisition {i}: phase-encode step "
                              f"{idx.kspace_encode_step_1} lies outside the encoded matrix ({p_enc})")
        calibration_only = (acq.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
                            and not acq.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING))
        lines.append((int(idx.slice), line, np.asarray(acq.data), calibration_only,
                      tuple(acq.position), tuple(acq.read_dir), tuple(acq.phase_dir),
                      tuple(acq.slice_dir)))
    if not lines:
        raise KSpaceError(f"{path}: no image acquisitions (only noise or navigator data)")
    coils = {d.shape[0] for _, _, d, *_ in lines}
    if len(coils) != 1:
        raise KSpaceError(f"{path}: acquisitions have different numbers of active channels "
                          f"{sorted(coils)}")
    n_coils = coils.pop()
    slice_ids = sorted({s for s, *_ in lines})
    _check_size(path, len(slice_ids), n_coils, (r_enc, p_enc))
    rank = {s: i for i, s in enumerate(slice_ids)}
    kspace = np.zeros((len(slice_ids), n_coils, r_enc, p_enc), np.complex64)
    counts = np.zeros((len(slice_ids), p_enc), np.int32)
    mask = np.zeros((len(slice_ids), p_enc), bool)
    positions = np.zeros((len(slice_ids), 3))
    dirs = {}
    for s, line, data, calibration_only, pos, rd, pd, sd in lines:
        i = rank[s]
        kspace[i, :, :, line] += data
        counts[i, line] += 1
        mask[i, line] |= not calibration_only
        positions[i] = pos
        dirs.setdefault("read", rd)
        dirs.setdefault("phase", pd)
        dirs.setdefault("slice", sd)
        if not (np.allclose(rd, dirs["read"], atol=1e-4) and np.allclose(pd, dirs["phase"], atol=1e-4)):
            raise KSpaceError(f"{path}: slices with different orientations: not supported")
    kspace /= np.maximum(counts, 1)[:, None, None, :]
    _check_finite(kspace, path)
    _check_signal(kspace, path)
    noise_arr = None
    if noise:
        if {n.shape[0] for n in noise} != {n_coils}:
            raise KSpaceError(f"{path}: noise scans have a different number of channels than the "
                              "image data")
        noise_arr = np.concatenate(noise, axis=1).astype(np.complex64)
        if not np.isfinite(noise_arr).all():
            raise KSpaceError(f"{path}: {int(np.size(noise_arr) - np.isfinite(noise_arr).sum())} "
                              "non-finite (NaN/Inf) samples in the noise scans")
    return KSpaceScan(kspace=kspace, mask=mask, recon_matrix=(r, p), fov_mm=fov,
                      positions=positions, read_dir=dirs["read"], phase_dir=dirs["phase"],
                      slice_dir=dirs["slice"], noise=noise_arr, source=str(path),
                      format="ismrmrd", header_xml=xml.decode() if isinstance(xml, bytes) else xml)


def _header(scan: KSpaceScan, coils: int):
    """An ISMRMRD XML header for ``scan``."""
    from ismrmrd import xsd

    (r_enc, p_enc), (r, p) = scan.encoded_matrix, scan.recon_matrix
    fov = scan.fov_mm
    enc_fov = (fov[0] * r_enc / r, fov[1] * p_enc / p, fov[2])
    hdr = xsd.ismrmrdHeader(
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=127_740_000),
        acquisitionSystemInformation=xsd.acquisitionSystemInformationType(receiverChannels=coils))
    enc = xsd.encodingType(
        trajectory=xsd.trajectoryType.CARTESIAN,
        encodedSpace=xsd.encodingSpaceType(
            matrixSize=xsd.matrixSizeType(x=r_enc, y=p_enc, z=1),
            fieldOfView_mm=xsd.fieldOfViewMm(x=enc_fov[0], y=enc_fov[1], z=enc_fov[2])),
        reconSpace=xsd.encodingSpaceType(
            matrixSize=xsd.matrixSizeType(x=r, y=p, z=1),
            fieldOfView_mm=xsd.fieldOfViewMm(x=fov[0], y=fov[1], z=fov[2])),
        encodingLimits=xsd.encodingLimitsType(
            kspace_encoding_step_1=xsd.limitType(minimum=0, maximum=p_enc - 1, center=p_enc // 2),
            slice=xsd.limitType(minimum=0, maximum=scan.shape[0] - 1, center=0)))
    hdr.encoding.append(enc)
    return hdr


def write_ismrmrd(scan: KSpaceScan, path: str | Path, noise_readouts: int = 8) -> Path:
    """Write ``scan`` as an ISMRMRD file: the header, ``noise`` as noise-scan acquisitions of
    ``R_enc`` samples each (when present), then one acquisition per acquired line with its
    slice, phase-encode step, position and directions (lines of the fully sampled centre also
    flagged ``ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING``)."""
    import ismrmrd

    from recon.coils import acs_lines

    path = Path(path)
    s_n, c, r_enc, p_enc = scan.shape
    acqs = []
    if scan.noise is not None:
        for chunk in np.array_split(scan.noise, max(1, scan.noise.shape[1] // r_enc), axis=1):
            a = ismrmrd.Acquisition.from_array(np.ascontiguousarray(chunk, np.complex64),
                                               center_sample=chunk.shape[1] // 2)
            a.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
            acqs.append(a)
    positions = scan.positions if scan.positions is not None else np.zeros((s_n, 3))
    for s in range(s_n):
        acs = acs_lines(scan.mask[s])
        acs_range = range(p_enc // 2 - acs // 2, p_enc // 2 - acs // 2 + acs)
        lines = np.flatnonzero(scan.mask[s])
        for j, line in enumerate(lines):
            a = ismrmrd.Acquisition.from_array(np.ascontiguousarray(scan.kspace[s, :, :, line]),
                                               center_sample=r_enc // 2)
            a.idx.kspace_encode_step_1 = int(line)
            a.idx.slice = s
            a.position[:] = [float(v) for v in positions[s]]
            a.read_dir[:] = [float(v) for v in scan.read_dir]
            a.phase_dir[:] = [float(v) for v in scan.phase_dir]
            a.slice_dir[:] = [float(v) for v in scan.slice_dir]
            if line in acs_range:
                a.set_flag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
            if j == 0:
                a.set_flag(ismrmrd.ACQ_FIRST_IN_SLICE)
            if j == len(lines) - 1:
                a.set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
            acqs.append(a)
    from recon.data.nifti import atomic_path

    with atomic_path(path, suffix=".h5") as tmp:
        with ismrmrd.File(str(tmp), "w") as f:
            ds = f["dataset"]
            ds.header = _header(scan, c)
            ds.acquisitions = acqs
    return path


# -- fastMRI ------------------------------------------------------------------------------------
def read_fastmri(path: str | Path) -> KSpaceScan:
    """Read a fastMRI HDF5 file: ``kspace`` ``(S, C, R_enc, P_enc)`` (single-coil
    ``(S, R_enc, P_enc)``: one coil), ``ismrmrd_header`` (XML) for the matrix and field of view,
    the acquired lines from ``mask`` when given (fastMRI's test files) else from the non-zero
    columns, and ``reconstruction_rss`` as the reference when present."""
    import h5py

    path = Path(path)
    with _open_h5(path) as f:
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
        _, enc = _parse_header(np.asarray(xml).reshape(-1)[0] if np.ndim(xml) else xml, path)
        (r, p), fov, (r_enc, p_enc) = _geometry(enc)
        _check_geometry(path, (r, p), fov, (r_enc, p_enc))
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
        _check_size(path, shape[0], 1 if len(shape) == 3 else shape[1], (r_enc, p_enc),
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
    _check_finite(k, path)
    _check_signal(k, path)
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
                      header_xml=xml.decode() if isinstance(xml, bytes) else str(xml))


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
    xml = ToXML(_header(scan, scan.shape[1]))
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

