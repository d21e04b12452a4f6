"""ISMRMRD HDF5 (the ``ismrmrd`` package): 2-D multi-slice Cartesian acquisitions read into a
``KSpaceScan`` and written from one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recon.data.kspace_scan import (
    KSpaceError,
    KSpaceScan,
    check_finite,
    check_geometry,
    check_signal,
    check_size,
    header_geometry,
    open_h5,
    parse_header,
)

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
    with open_h5(path):
        pass
    try:
        with ismrmrd.File(str(path), "r") as f:
            if "dataset" not in f:
                raise KSpaceError(f"{path}: no /dataset group: not an ISMRMRD file")
            ds = f["dataset"]
            if not ds.has_header():
                raise KSpaceError(f"{path}: no ISMRMRD XML header (/dataset/xml)")
            xml = ds._contents["xml"][0]
            _, enc = parse_header(xml, path)
            (r, p), fov, (r_enc, p_enc) = header_geometry(enc)
            check_geometry(path, (r, p), fov, (r_enc, p_enc))
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
    check_size(path, len(slice_ids), n_coils, (r_enc, p_enc))
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
    check_finite(kspace, path)
    check_signal(kspace, path)
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


def ismrmrd_header(scan: KSpaceScan, coils: int):
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

    from recon.classical.coils import acs_lines

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
            ds.header = ismrmrd_header(scan, c)
            ds.acquisitions = acqs
    return path
