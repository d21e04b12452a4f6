"""Raw multi-coil k-space: file formats (ISMRMRD, fastMRI), the physics of preparation (FFT
centring and scaling, readout oversampling, noise whitening and estimation, ESPIRiT maps,
phase), the geometry (affine from the header overlays the source), the operator and baselines
on coil data, and the reconstruction of a prepared scan; each against a known answer.

Scans are simulated (``recon.data.simulate``) from small synthetic NIfTI volumes written in
``tmp``; the real in-vivo acquisition that ships inside PyQMRI's sdist is fetched once (86 MB
from PyPI) by the last test.
"""

from __future__ import annotations

import hashlib
import json

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from recon.classical import coils
from recon.classical.baselines import L1Wavelet, Sense
from recon.config import BaselineConfig, OperatorConfig, ReconstructSection
from recon.data import simulate
from recon.data.kspace import (
    LPS_TO_RAS,
    KSpaceError,
    KSpaceScan,
    read_fastmri,
    read_ismrmrd,
    read_kspace,
    write_fastmri,
    write_ismrmrd,
)
from recon.data.simulate import coil_sensitivities, head_median, simulate_scan
from recon.operators import UndersampledFourier, fft2c
from recon.reconstruct.raw import calibration_width, scan_problems
from recon.reconstruct.scans import PreparedScan, ViewTransform, prepare_scan


def phantom(shape=(40, 36, 6), seed=0) -> np.ndarray:
    """A smooth 'head' with texture, zero outside an ellipsoid."""
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.linspace(-1.3, 1.3, n) for n in shape], indexing="ij")
    inside = g[0] ** 2 + g[1] ** 2 + 0.2 * g[2] ** 2 < 1.0
    img = inside * (100 + 40 * np.sin(5 * g[0]) * np.cos(4 * g[1]) + 3 * rng.standard_normal(shape))
    return np.clip(img, 0, None).astype(np.float32)


OBLIQUE = np.array([[0.0, -1.2, 0.0, 20.0],      # LPS-like voxel axes, anisotropic, off-centre
                    [0.9, 0.0, 0.0, -15.0],
                    [0.0, 0.0, 2.5, 7.5],
                    [0, 0, 0, 1.0]])


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    path = tmp_path_factory.mktemp("kspace") / "head.nii.gz"
    nib.save(nib.Nifti1Image(phantom(), OBLIQUE), path)
    return path


@pytest.fixture(scope="module")
def scan(volume):
    return simulate_scan(volume, slices=3, coils=6, noise=0.01, seed=1)


# -- Fourier conventions ------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(8, 6), (7, 9)])
def test_fft_centre_and_scaling(shape):
    """A point at pixel (R // 2, P // 2) has flat, real k-space 1/sqrt(N); the numpy and torch
    transforms agree and keep energy (orthonormal)."""
    x = np.zeros(shape, complex)
    x[shape[0] // 2, shape[1] // 2] = 1.0
    k = coils.centered_fft(x)
    np.testing.assert_allclose(k, np.full(shape, 1 / np.sqrt(np.prod(shape))), atol=1e-12)
    rng = np.random.default_rng(0)
    z = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    np.testing.assert_allclose(coils.centered_fft(z), fft2c(torch.from_numpy(z)).numpy(), atol=1e-12)
    assert np.linalg.norm(coils.centered_fft(z)) == pytest.approx(np.linalg.norm(z))
    np.testing.assert_allclose(coils.centered_ifft(coils.centered_fft(z)), z, atol=1e-12)


@pytest.mark.parametrize("r", [16, 17])
def test_readout_oversampling_removal_is_exact_and_keeps_noise(r):
    """k-space of an object in the central R pixels of a 2R field of view, cropped back to R:
    exactly the k-space of the object on the R grid (even and odd R), centre pixel kept; white
    noise keeps its variance per entry."""
    rng = np.random.default_rng(r)
    obj = rng.standard_normal((3, r, 10)) + 1j * rng.standard_normal((3, r, 10))
    wide = np.zeros((3, 2 * r, 10), complex)
    start = r - r // 2
    wide[:, start: start + r] = obj
    np.testing.assert_allclose(coils.remove_readout_oversampling(coils.centered_fft(wide), r),
                               coils.centered_fft(obj), atol=1e-10)
    noise = (rng.standard_normal((64, 2 * r, 64)) + 1j * rng.standard_normal((64, 2 * r, 64)))
    cropped = coils.remove_readout_oversampling(noise, r)
    assert np.mean(np.abs(cropped) ** 2) == pytest.approx(2.0, rel=0.03)


def test_whitening_and_noise_estimates():
    """Noise with a known coil covariance: the whitened noise-scan covariance is the identity;
    the k-space-corner estimate of a smooth object's noise is within 10 % of the truth."""
    rng = np.random.default_rng(0)
    c = 6
    a = rng.standard_normal((c, c)) + 1j * rng.standard_normal((c, c))
    psi = a @ a.conj().T / c + np.eye(c)
    chol = np.linalg.cholesky(psi)
    z = (rng.standard_normal((c, 20000)) + 1j * rng.standard_normal((c, 20000))) / np.sqrt(2)
    noise = chol @ z
    est = coils.noise_covariance(noise)
    np.testing.assert_allclose(est, psi, atol=0.05 * np.abs(psi).max())
    w = coils.whitening_matrix(est)
    white = coils.noise_covariance(coils.whiten(noise[:, None, :], w, coil_axis=0)[:, 0])
    np.testing.assert_allclose(white, np.eye(c), atol=1e-6)
    with pytest.raises(ValueError, match="positive definite"):
        coils.whitening_matrix(np.zeros((c, c)))

    from scipy.ndimage import gaussian_filter

    yy, xx = np.mgrid[-1:1:96j, -1:1:80j]  # an object with the soft edges of a blurred head
    img = gaussian_filter((xx**2 + yy**2 < 0.6) * (1 + 0.3 * np.cos(3 * xx)), 1.5)
    k = coils.centered_fft(np.stack([img] * 4)) + 0.02 * (rng.standard_normal((4, 96, 80)) + 1j *
                                                        rng.standard_normal((4, 96, 80))) / np.sqrt(2)
    mask = np.ones(80, bool)
    assert coils.corner_noise_variance(k, mask) == pytest.approx(0.02**2, rel=0.1)


def test_coil_compression_keeps_a_coil_subspace_and_white_noise():
    """k-space whose 8 coils are mixtures of 3 signals: 3 virtual coils keep all of its energy
    and fit it exactly (``M^H M k = k``); 2 keep the two largest singular values' share; the
    rows of M are orthonormal, so white noise stays white with its variance; bad counts are
    refused."""
    rng = np.random.default_rng(1)
    c, v = 8, 3
    sources = rng.standard_normal((v, 24, 20)) + 1j * rng.standard_normal((v, 24, 20))
    mixing = rng.standard_normal((c, v)) + 1j * rng.standard_normal((c, v))
    k = np.einsum("cv,vrp->crp", mixing, sources)
    m = coils.compression_matrix(k, 12, v)
    assert m.shape == (v, c)
    np.testing.assert_allclose(m @ m.conj().T, np.eye(v), atol=1e-10)
    np.testing.assert_allclose(coils.mix_coils(coils.mix_coils(k, m), m.conj().T), k, atol=1e-9)
    assert coils.retained_energy(k, m) == pytest.approx(1.0, abs=1e-12)
    calib = coils.calibration_region(k, 12)[:, 6:18, 4:16].reshape(c, -1)
    s = np.linalg.svd(calib, compute_uv=False)
    two = coils.compression_matrix(k, 12, 2)
    assert coils.retained_energy(coils.calibration_region(k, 12), two) == \
        pytest.approx(np.sum(s[:2] ** 2) / np.sum(s ** 2), rel=1e-10)
    noise = (rng.standard_normal((c, 1, 40000)) + 1j * rng.standard_normal((c, 1, 40000))) / np.sqrt(2)
    np.testing.assert_allclose(coils.noise_covariance(coils.mix_coils(noise, m, coil_axis=0)[:, 0]),
                               np.eye(v), atol=0.03)
    for bad in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match="virtual_coils must be an integer in"):
            coils.compression_matrix(k, 12, bad)


def test_espirit_recovers_the_coil_maps_and_the_phase_is_absorbed():
    """ESPIRiT on the calibration lines of an 8-coil object: the maps span the true ones up to
    one phase per pixel (|<S_est, S_true>| / |S_true| ~ 1 inside the object); absorbing the
    low-resolution phase makes the coil-combined image real and non-negative."""
    h, w = 64, 56
    yy, xx = np.mgrid[-1:1:complex(0, h), -1:1:complex(0, w)]
    obj = (xx**2 / 0.7 + yy**2 / 0.8 < 1) * (1 + 0.3 * np.sin(6 * xx) * np.cos(5 * yy))
    phase = 1.2 * xx - 0.8 * yy + 0.5
    truth = coil_sensitivities((h, w), 8)
    truth = truth / coils.rss(truth)
    k = coils.centered_fft(truth * (obj * np.exp(1j * phase)))
    maps = coils.espirit_maps(k, 20)
    inside = obj > 0.5
    overlap = np.abs(np.sum(maps.conj() * truth, 0))
    assert overlap[inside].min() > 0.98
    assert np.abs(coils.rss(maps)[inside] - 1).max() < 1e-3
    combined = np.sum(maps.conj() * coils.centered_ifft(k), 0)
    absorbed = coils.absorb_phase(maps, coils.lowres_phase(k, maps, 20))
    real = np.sum(absorbed.conj() * coils.centered_ifft(k), 0)
    assert np.abs(combined.imag[inside]).mean() > 0.3 * np.abs(combined[inside]).mean()
    assert np.abs(real.imag[inside]).mean() < 0.05 * np.abs(real[inside]).mean()
    assert (real.real[inside] > 0).all()


# -- files --------------------------------------------------------------------------------------
def test_simulated_scan_is_what_the_docstring_says(scan, volume):
    """2x readout oversampling, 6 coils, noise scans with correlated channels, the reference is
    the RSS of the fully sampled coil images on the recon grid, noise level as asked."""
    canonical = nib.as_closest_canonical(nib.load(volume))
    x, y, _ = canonical.shape
    assert scan.shape == (3, 6, 2 * x, y) and scan.recon_matrix == (x, y)
    assert scan.fully_sampled and scan.readout_oversampling == 2
    psi = coils.noise_covariance(scan.noise)
    corr = np.abs(psi) / np.sqrt(np.outer(np.diag(psi).real, np.diag(psi).real))
    assert 0.2 < corr[0, 1] < 0.4  # neighbouring channels, coil_correlation=0.3
    sigma = np.sqrt(np.mean(np.diag(psi).real))
    assert sigma == pytest.approx(0.01 * head_median(np.asarray(canonical.dataobj)[..., 2:5]),
                                  rel=0.15)
    ref = coils.rss(coils.centered_ifft(coils.remove_readout_oversampling(scan.kspace, x)))
    np.testing.assert_allclose(scan.reference, ref, rtol=1e-4, atol=1e-3)


def test_tissue_phase_changes_where_the_anatomy_does():
    """A head with a bright scalp: the scalp's fat sits at its own offset (a step at the
    boundary, not a smooth ramp), and after the low-resolution phase is taken out (what
    ``kspace_phase: lowres`` absorbs) a good share of the head's energy stays imaginary, where a
    smooth phase leaves almost none."""
    yy, xx = np.mgrid[-1:1:96j, -1:1:80j]
    r = np.hypot(yy / 0.9, xx / 0.8)
    m = np.where(r < 0.85, 100.0 + 20 * np.sin(9 * yy), 0.0) + np.where((r >= 0.85) & (r < 0.95),
                                                                         250.0, 0.0)
    scalp, brain = (r >= 0.87) & (r < 0.93), (r > 0.72) & (r < 0.8)

    def lowres_imaginary(phi):
        x = m * np.exp(1j * phi)
        k = coils.centered_fft(x)
        window = np.zeros_like(m)
        window[48 - 8: 48 + 8, 40 - 8: 40 + 8] = np.outer(np.hanning(16), np.hanning(16))
        x = x * np.exp(-1j * np.angle(coils.centered_ifft(k * window)))
        return np.sum(x.imag[m > 0] ** 2) / np.sum(m ** 2)

    steps, shares = [], []
    for seed in range(4):
        phi = simulate.tissue_phase(m, np.random.default_rng(seed), (2.0, 2.0))
        step = np.angle(np.mean(np.exp(1j * phi[scalp])) / np.mean(np.exp(1j * phi[brain])))
        steps.append(abs(step))
        shares.append(lowres_imaginary(phi))
    assert np.median(steps) > 0.5  # the fat offset, U(-pi, pi)
    assert min(shares) > 0.02
    u, v = np.mgrid[-1:1:96j, -1:1:80j]
    assert lowres_imaginary(1.0 + 0.8 * u - 0.5 * v + 0.3 * (u**2 + v**2)) < 0.005
    assert (simulate.tissue_phase(np.zeros((8, 8)), np.random.default_rng(0)) == 0).all()
    with pytest.raises(ValueError, match="'smooth' or 'tissue'"):
        simulate_scan("unused.nii.gz", phase="measured")


def test_ismrmrd_and_fastmri_files_round_trip(scan, tmp_path):
    """What is written is what is read: k-space (as acquired), acquired lines, geometry,
    noise scans (ISMRMRD), reference and mask (fastMRI), for full and undersampled scans."""
    path = write_ismrmrd(scan, tmp_path / "scan.h5")
    back = read_kspace(path)
    assert back.format == "ismrmrd"
    np.testing.assert_array_equal(back.kspace, scan.kspace)
    np.testing.assert_array_equal(back.mask, scan.mask)
    np.testing.assert_allclose(back.positions, scan.positions, atol=1e-4)
    np.testing.assert_allclose(back.read_dir, scan.read_dir, atol=1e-6)
    np.testing.assert_allclose(back.phase_dir, scan.phase_dir, atol=1e-6)
    np.testing.assert_allclose(back.noise, scan.noise)
    assert back.recon_matrix == scan.recon_matrix
    np.testing.assert_allclose(back.fov_mm, scan.fov_mm, rtol=1e-6)

    lines = np.zeros(scan.shape[-1], bool)
    lines[::3] = True
    lines[scan.shape[-1] // 2 - 3: scan.shape[-1] // 2 + 3] = True
    under = KSpaceScan(**{**scan.__dict__, "mask": np.broadcast_to(lines, scan.mask.shape).copy()})
    for writer, reader in ((write_ismrmrd, read_ismrmrd), (write_fastmri, read_fastmri)):
        back = reader(writer(under, tmp_path / f"under_{writer.__name__}.h5"))
        np.testing.assert_array_equal(back.mask, under.mask)
        np.testing.assert_array_equal(back.kspace, np.where(under.mask[:, None, None], scan.kspace, 0))
    fast = read_kspace(write_fastmri(scan, tmp_path / "fast.h5"))
    assert fast.format == "fastmri" and fast.noise is None and fast.positions is None
    # no geometry in the file: taken as fastMRI displays it, so the prior sees it upright
    view = ViewTransform.from_directions(fast.read_dir, fast.phase_dir, fast.slice_dir)
    assert view == ViewTransform(transpose=False, flip_rows=False, flip_cols=True)
    np.testing.assert_array_equal(fast.kspace, scan.kspace)
    np.testing.assert_array_equal(fast.reference, scan.reference)
    with h5py.File(tmp_path / "fast.h5") as f:
        assert f.attrs["max"] == pytest.approx(float(scan.reference.max()))


def test_manifest_describe_writes_kspace_entries_that_check(scan, tmp_path):
    """``recon manifest describe`` on ISMRMRD and fastMRI files: ``kind: kspace`` entries with
    the k-space shape and sha256 that ``manifest check`` accepts as they are (before: "Cannot
    work out file type")."""
    from typer.testing import CliRunner

    from recon import cli

    write_ismrmrd(scan, tmp_path / "a.h5")
    write_fastmri(scan, tmp_path / "b.h5")
    run = CliRunner()
    out = run.invoke(cli.app, ["manifest", "describe", str(tmp_path / "a.h5"),
                               str(tmp_path / "b.h5"), "--data-root", str(tmp_path),
                               "--split", "test"])
    assert out.exit_code == 0, out.output
    manifest = yaml.safe_load(out.output)
    assert [v["kind"] for v in manifest["volumes"]] == ["kspace", "kspace"]
    assert manifest["volumes"][0]["shape"] == list(scan.shape)
    (tmp_path / "m.yaml").write_text(out.output)
    checked = run.invoke(cli.app, ["manifest", "check", str(tmp_path / "m.yaml"), "--data-root",
                                   str(tmp_path)])
    assert checked.exit_code == 0 and "2 volume(s) ok" in checked.output, checked.output


def test_a_fastmri_file_with_its_readout_oversampling_removed_is_read_with_a_warning(scan, tmp_path):
    """The header's encoded readout is twice what the file holds (the oversampling was removed
    before saving, as in many fastMRI exports): read on the stored matrix, with one warning,
    not refused."""
    from recon.classical.coils import remove_readout_oversampling
    from recon.data.kspace import KSpaceWarning

    path = write_fastmri(scan, tmp_path / "fast.h5")
    with h5py.File(path, "r+") as f:
        k = remove_readout_oversampling(f["kspace"][()], scan.recon_matrix[0])
        del f["kspace"]
        f.create_dataset("kspace", data=k.astype(np.complex64))
    with pytest.warns(KSpaceWarning, match="oversampling already removed"):
        read = read_kspace(path)
    assert read.kspace.shape[-2] == scan.recon_matrix[0] and read.readout_oversampling == 1


def _bad_files(scan, tmp_path):
    """(file, expected message) for one kind of damage each."""
    good = write_ismrmrd(scan, tmp_path / "good.h5")
    data = good.read_bytes()
    (tmp_path / "truncated.h5").write_bytes(data[: len(data) // 3])
    (tmp_path / "text.h5").write_text("not a scan")
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.create_dataset("images", data=np.zeros(3))
    fast = write_fastmri(scan, tmp_path / "fast.h5")
    cases = {"truncated.h5": "truncated or corrupt", "text.h5": "not a readable HDF5",
             "empty.h5": "neither an ISMRMRD file"}
    for name, edit, message in (
            ("radial.h5", lambda x: x.replace("cartesian", "radial"), "radial trajectory"),
            ("3d.h5", lambda x: x.replace("<z>1</z>", "<z>8</z>", 1), "3-D encoding"),
            ("garbled.h5", lambda x: x[: len(x) // 2], "invalid ISMRMRD XML header")):
        path = tmp_path / name
        path.write_bytes(fast.read_bytes())
        with h5py.File(path, "r+") as f:
            xml = f["ismrmrd_header"][()].decode()
            del f["ismrmrd_header"]
            f.create_dataset("ismrmrd_header", data=np.bytes_(edit(xml)))
        cases[name] = message
    for name, edit, message in (
            ("shape.h5", lambda k: k[..., :-2], "but the header's encoded matrix"),
            ("nan.h5", lambda k: np.where(np.arange(k.shape[-1]) == 3, np.nan, k), "non-finite"),
            ("real.h5", lambda k: k.real, "must be complex")):
        path = tmp_path / name
        path.write_bytes(fast.read_bytes())
        with h5py.File(path, "r+") as f:
            k = edit(f["kspace"][()])
            del f["kspace"]
            f.create_dataset("kspace", data=k)
        cases[name] = message
    return cases


def _header_edit(src, dest, edit):
    dest.write_bytes(src.read_bytes())
    with h5py.File(dest, "r+") as f:
        xml = f["ismrmrd_header"][()].decode()
        del f["ismrmrd_header"]
        f.create_dataset("ismrmrd_header", data=np.bytes_(edit(xml)))
    return dest


def _ismrmrd_header_edit(scan, dest, edit):
    """An ISMRMRD file of ``scan`` whose XML header went through ``edit``."""
    import ismrmrd

    write_ismrmrd(scan, dest)
    with ismrmrd.File(str(dest), "r+") as f:
        ds = f["dataset"]
        xml = ds._contents["xml"][0]
        xml = xml.decode() if isinstance(xml, bytes) else xml
    with h5py.File(dest, "r+") as f:
        del f["dataset/xml"]
        f.create_dataset("dataset/xml", data=np.array([edit(xml)], dtype=h5py.string_dtype()))
    return dest


def _swap(xml, space, field, value):
    """``<space>...<field>x</field>`` -> ``value``: the first ``field`` inside ``space``, a tag
    or a path of tags (``reconSpace/fieldOfView_mm``)."""
    start = 0
    for tag in space.split("/"):
        start = xml.index(f"<{tag}>", start)
    i = xml.index(f"<{field}>", start) + len(field) + 2
    j = xml.index(f"</{field}>", i)
    return xml[:i] + str(value) + xml[j:]


def _peak_rss_mb(code: str) -> tuple[int, str]:
    """Run ``code`` in a fresh interpreter; (its peak RSS in MB, its stdout). The peak is the
    child's own ``VmHWM``: ``ru_maxrss`` would carry over the parent's (pytest's) high-water
    mark, since Linux keeps it across the vfork + exec that starts the child."""
    import subprocess
    import sys

    wrapped = code + ("\nprint('RSS', open('/proc/self/status').read().split('VmHWM:')[1]"
                      ".split()[0])")
    out = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, timeout=120)
    rss = int(out.stdout.rsplit("RSS", 1)[1]) // 1024
    return rss, out.stdout


def test_sizes_geometry_and_structure_are_refused_before_any_allocation(scan, tmp_path):
    """Issue 22: a header claiming a 100 000 (or 4 000 000) line phase matrix, a fastMRI
    /kspace declared as 16 GiB of unwritten chunks in a small file, a zero, NaN or negative
    field of view (a negative one would mirror the anatomy left-right in world space), a
    0 x 0 matrix, /kspace being a group, an Inf in a noise scan and all-zero k-space: each is
    one KSpaceError naming the file and the problem, and the size cases stay under 1 GB RSS."""
    fast = write_fastmri(scan, tmp_path / "fast.h5")
    cases = {}
    for name, space, field, value, message in (
            ("huge-phase.h5", "encodedSpace", "y", 100000, "each side must lie in"),
            ("huger-phase.h5", "encodedSpace", "y", 4000000, "each side must lie in"),
            ("zero-matrix.h5", "reconSpace", "x", 0, "each side must lie in"),
            ("nan-fov.h5", "reconSpace/fieldOfView_mm", "x", "NaN", "positive number of mm"),
            ("zero-fov.h5", "reconSpace/fieldOfView_mm", "y", 0, "positive number of mm"),
            ("negative-fov.h5", "reconSpace/fieldOfView_mm", "x", -220, "would mirror the image")):
        _ismrmrd_header_edit(scan, tmp_path / name,
                             lambda x, s=space, f=field, v=value: _swap(x, s, f, v))
        cases[name] = message
    _header_edit(fast, tmp_path / "fast-negative-fov.h5",
                 lambda x: _swap(x, "reconSpace/fieldOfView_mm", "y", -200))
    cases["fast-negative-fov.h5"] = "would mirror the image"
    sparse = tmp_path / "sparse.h5"
    with h5py.File(sparse, "w") as f:  # 512 MiB declared, never written: a file of kB
        f.create_dataset("kspace", shape=(1, 16, 2048, 2048), dtype=np.complex64,
                         chunks=(1, 1, 64, 64))
        xml = h5py.File(fast, "r")["ismrmrd_header"][()].decode()
        xml = _swap(_swap(xml, "encodedSpace", "x", 2048), "encodedSpace", "y", 2048)
        f.create_dataset("ismrmrd_header", data=np.bytes_(xml))
    cases["sparse.h5"] = "never written"
    huge = tmp_path / "sparse-huge.h5"  # the reported file: 1 x 4 x 32768 x 16384, 16 GiB
    with h5py.File(huge, "w") as f:
        f.create_dataset("kspace", shape=(1, 4, 32768, 16384), dtype=np.complex64,
                         chunks=(1, 1, 64, 64))
        xml = _swap(_swap(xml, "encodedSpace", "x", 32768), "encodedSpace", "y", 16384)
        f.create_dataset("ismrmrd_header", data=np.bytes_(xml))
    cases["sparse-huge.h5"] = "each side must lie in"
    group = tmp_path / "group.h5"
    with h5py.File(group, "w") as f:
        f.create_group("kspace")
        f.create_dataset("ismrmrd_header", data=h5py.File(fast, "r")["ismrmrd_header"][()])
    cases["group.h5"] = "/kspace is a group, not a dataset"
    zeros = tmp_path / "zeros.h5"
    zeros.write_bytes(fast.read_bytes())
    with h5py.File(zeros, "r+") as f:
        f["kspace"][...] = 0
    cases["zeros.h5"] = "every k-space sample is zero"
    noisy = scan.__class__(**{**scan.__dict__, "noise": np.where(
        np.arange(scan.noise.shape[1]) == 2, np.inf, scan.noise).astype(np.complex64)})
    write_ismrmrd(noisy, tmp_path / "inf-noise.h5")
    cases["inf-noise.h5"] = "non-finite .* noise scans"
    for name, message in cases.items():
        with pytest.raises(KSpaceError, match=message) as err:
            read_kspace(tmp_path / name)
        assert name in str(err.value), name
    # as a user meets them: `recon manifest check` says it in one line, exit 2
    from typer.testing import CliRunner

    from recon import cli
    from recon.data.verify import sha256_file

    for name in ("negative-fov.h5", "huge-phase.h5", "group.h5"):
        manifest = tmp_path / f"{name}.yaml"
        manifest.write_text(yaml.safe_dump({"schema_version": 1, "name": "m", "volumes": [{
            "id": "scan", "path": name, "sha256": sha256_file(tmp_path / name),
            "subject": "s", "split": "test", "modality": "T1w", "kind": "kspace"}]}))
        out = CliRunner().invoke(cli.app, ["manifest", "check", str(manifest), "--data-root",
                                           str(tmp_path)])
        lines = [line for line in out.output.splitlines() if line.strip()]
        assert out.exit_code == 2 and name in out.output and cases[name].split(" ")[0] in \
            " ".join(out.output.split()), out.output
        assert "Traceback" not in out.output and len(lines) <= 3, out.output
    for name in ("huger-phase.h5", "sparse.h5", "sparse-huge.h5"):
        rss, out = _peak_rss_mb("from recon.data.kspace import read_kspace, KSpaceError\n"
                                f"try:\n    read_kspace({str(tmp_path / name)!r})\n"
                                "except KSpaceError as e:\n    print('refused')")
        assert "refused" in out and rss < 1024, (name, rss)


def test_bad_files_get_one_clear_error_naming_file_and_problem(scan, tmp_path):
    for name, message in _bad_files(scan, tmp_path).items():
        with pytest.raises(KSpaceError, match=message) as err:
            read_kspace(tmp_path / name)
        assert name in str(err.value)


def test_affine_from_the_header_overlays_the_source(scan, volume, tmp_path):
    """Voxel (r, p, s) of the reconstructed volume is at the world position of the source
    voxel it was simulated from (canonical voxel (r, p, k_s)), through an ISMRMRD file."""
    canonical = nib.as_closest_canonical(nib.load(volume))
    back = read_kspace(write_ismrmrd(scan, tmp_path / "geo.h5"))
    picks = [2, 3, 4]  # the three central slices of six
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (*back.recon_matrix, 3)], indexing="ij"),
                    -1).reshape(-1, 3)
    ours = nib.affines.apply_affine(back.affine(), grid)
    source = grid.copy()
    source[:, 2] = np.asarray(picks)[grid[:, 2]]
    np.testing.assert_allclose(ours, nib.affines.apply_affine(canonical.affine, source), atol=1e-3)


def test_view_transform_brings_slices_to_the_training_layout():
    """Rows along RAS x, columns along RAS y (a raw RAS axial slice) -> np.rot90, the layout
    of the prior's training slices; apply and invert are inverse."""
    read, phase, normal = (LPS_TO_RAS @ v for v in np.eye(3))
    view = ViewTransform.from_directions(read, phase, normal)
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    np.testing.assert_array_equal(view.apply(x)[0, 0].numpy(), np.rot90(x[0, 0].numpy()))
    np.testing.assert_array_equal(view.invert(view.apply(x)).numpy(), x.numpy())
    fastmri = ViewTransform.from_directions((0, 1, 0), (1, 0, 0), (0, 0, 1))
    assert fastmri == ViewTransform(transpose=False, flip_rows=False, flip_cols=True)


# -- preparation, operator, baselines ------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared(scan, tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    return PreparedScan.open(prepare_scan(write_ismrmrd(scan, root / "scan.h5"), root / "cache"))


def test_prepared_scan_is_whitened_cropped_and_referenced(prepared, scan):
    k = prepared.kspace
    assert k.shape == (3, 6, *scan.recon_matrix) and prepared.sigma == 1.0
    assert prepared.meta["noise"] == "noise scans: whitened"
    np.testing.assert_allclose(prepared.reference, coils.rss(coils.centered_ifft(k)), rtol=1e-4)
    np.testing.assert_allclose(json.loads((prepared.directory / "meta.json").read_text())["affine"],
                               scan.affine(), atol=1e-6)


def test_scan_problem_operator_and_scale(prepared):
    """Retrospective 3x sampling: the operator is adjoint with the estimated maps, zero outside
    their support, the zero-filled RSS's head median is the prior's 0.5, y is what the
    operator measures of the data's own image up to noise."""
    op_cfg = OperatorConfig(name="fourier", params={"acceleration": 3, "center_fraction": 0.3})
    scale, problems = scan_problems(prepared, op_cfg, seed=0)
    first = next(problems)
    assert head_median(first.naive) == pytest.approx(0.5, rel=0.2)
    op = first.operator.double()
    assert op.support is not None and not op.support.all()
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((1, 1, *op.mask.shape)) + 1j *
                         rng.standard_normal((1, 1, *op.mask.shape)))
    v = torch.randn(op.measurement_shape(x.shape), dtype=torch.complex128)
    lhs = torch.sum(op.forward(x).conj() * v)
    assert abs(lhs - torch.sum(x.conj() * op.adjoint(v))) / abs(lhs) < 1e-10
    assert first.calibration == calibration_width(op.mask.numpy()) >= 10
    with pytest.raises(Exception, match="does not apply to raw k-space"):
        scan_problems(prepared, OperatorConfig(name="mask", params={"keep": 0.5}), seed=0)


def test_multicoil_prox_returns_the_magnitude_of_the_complex_fit(prepared):
    """A real non-negative x0 whose phase the maps carry: with data A x0 the prox keeps x0
    (its own fixed point); with real_output the exact real prox; a complex x0 gets a complex
    answer."""
    _, problems = scan_problems(prepared, OperatorConfig(name="acquired"), seed=0)
    op = next(problems).operator.double()
    x0 = torch.rand(1, 1, *op.mask.shape, dtype=torch.float64) * op.support
    y = op.forward(x0)
    np.testing.assert_allclose(op.prox(x0, y, 0.1, steps=30).numpy(), x0.numpy(), atol=1e-6)
    assert op.prox(x0.to(torch.complex128), y, 0.1).is_complex()
    real = UndersampledFourier(op.mask, op.coil_maps, real_output=True).double()
    np.testing.assert_allclose(real.prox(x0, real.forward(x0), 0.1, steps=30).numpy(),
                               x0.numpy(), atol=1e-6)


def test_mri_baselines_run_sigpy_mri_apps_on_the_coil_data(prepared):
    """Fully sampled SENSE is the coil-combined image; at 3x L1-wavelet halves the error of
    zero-filled."""
    _, problems = scan_problems(prepared, OperatorConfig(name="acquired"), seed=0)
    pr = next(problems)
    combined = (pr.operator.coil_maps.conj() * torch.from_numpy(coils.centered_ifft(
        pr.y[0, 0].numpy()))).sum(0).abs()
    np.testing.assert_allclose(Sense(pr.operator, 0.0, iterations=20).solve(pr.y)[0, 0].numpy(),
                               combined.numpy(), atol=1e-3 * float(combined.max()))
    _, problems = scan_problems(prepared, OperatorConfig(name="fourier", params={
        "acceleration": 3, "center_fraction": 0.15}), seed=0)
    pr = next(problems)
    x = L1Wavelet(pr.operator, 1e-4, iterations=60).solve(pr.y)[0, 0].numpy()

    def err(a):
        return np.linalg.norm(a - pr.reference)

    assert err(x) < 0.6 * err(pr.naive)


def test_support_keeps_unseen_pixels_at_zero(prepared):
    """A prior that fills every pixel with 1 still leaves the pixels outside the maps at 0."""
    from recon.sampling.cond_denoiser import CondDenoiser
    from recon.sampling.diffusion import VPCosine
    from recon.sampling.integrator import DDIMIntegrator
    from recon.sampling.timer import CosineTimer

    _, problems = scan_problems(prepared, OperatorConfig(name="acquired"), seed=0)
    pr = next(problems)
    diffusion = VPCosine()

    def bright(x, t):  # eps of the law 'every pixel is 1': x0_hat = 1
        s, sigma = diffusion.s(t).view(-1, 1, 1, 1), diffusion.sigma(t).view(-1, 1, 1, 1)
        return (x - s) / sigma

    sampler = CondDenoiser(diffusion, bright, DDIMIntegrator(), CosineTimer(4), pr.operator,
                           "data_consistency")
    post = sampler.sample(pr.y, 1, generator=torch.Generator().manual_seed(0))
    outside = ~pr.operator.support
    assert outside.any() and (post.mean[0, 0][outside] == 0).all()


def test_reconstruct_prepared_writes_a_scan_as_nifti_with_the_header_affine(prepared, tmp_path):
    """Through ``reconstruct_prepared`` (as image volumes) with a baseline (no network needed):
    NIfTI in the file's units on the reconstructed grid with the header's affine, stacks for
    the metrics."""
    from recon.reconstruct.reconstruction import reconstruct_prepared

    settings = ReconstructSection(n_samples=1, progress=False, device="cpu")
    out = reconstruct_prepared(prepared.directory, OperatorConfig(name="fourier", params={
        "acceleration": 3, "center_fraction": 0.3}), settings, None, tmp_path / "out",
        progress=False, baseline=BaselineConfig(name="sense", params={"lam": 1e-2}))
    img = nib.load(out["recon"])
    assert img.shape == (*prepared.recon_matrix, 3)
    np.testing.assert_allclose(img.affine, prepared.affine, atol=1e-5)
    ref = nib.load(out["reference"]).get_fdata()
    np.testing.assert_allclose(np.moveaxis(ref, -1, 0), prepared.reference, rtol=1e-4,
                               atol=1e-4 * ref.max())
    stacks = np.load(out["stacks"])  # the prior's units, viewer layout
    np.testing.assert_allclose(stacks["truth"], prepared.view.apply(torch.from_numpy(
        prepared.reference / out["scale"])).numpy(), rtol=1e-5)
    assert out["has_reference"]
    assert out["method"] == "sense" and out["slices"] == 3


@pytest.mark.parametrize("rule", ["rss", "magnitude"])
def test_a_scan_reports_its_output_image_rule(prepared, tmp_path, rule):
    """``reconstruct.kspace_output``: the reported image of a method's complex answer x is the
    RSS of x's coil images with the acquired samples put back (``rss``), or |x|."""
    from recon.reconstruct.reconstruction import reconstruct_prepared
    from recon.reconstruct.scans import crop_phase

    op_cfg = OperatorConfig(name="fourier", params={"acceleration": 3, "center_fraction": 0.3})
    baseline = BaselineConfig(name="sense", params={"lam": 1e-2})
    settings = ReconstructSection(n_samples=1, progress=False, device="cpu", kspace_output=rule)
    out = reconstruct_prepared(prepared.directory, op_cfg, settings, None, tmp_path / rule,
                               progress=False, baseline=baseline)
    pr = next(scan_problems(prepared, op_cfg, seed=0)[1])
    x = baseline.build(pr.operator).solve_complex(pr.y)
    image = pr.operator.rss_with_data(x, pr.y) if rule == "rss" else x.abs()
    expected = prepared.view.apply(torch.from_numpy(crop_phase(image[0].numpy(),
                                                               prepared.shape[1])))
    got = np.load(out["stacks"])["recon"][:1]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5 * got.max())


def test_coil_maps_and_scale_are_computed_once_per_sampling_and_reused(prepared, tmp_path,
                                                                        monkeypatch):
    """ESPIRiT runs once per slice for a (scan, sampling, seed, phase): a second method and
    slabs of one slice reuse the cached maps and scale (the same outputs' scale); another seed
    or phase rule is another sampling and computes its own; lam tuning reuses them too."""
    from recon.reconstruct import raw
    from recon.reconstruct.reconstruction import reconstruct_prepared, tune_baseline

    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return espirit(*args, **kwargs)

    espirit = coils.espirit_maps
    monkeypatch.setattr(raw.coils, "espirit_maps", counted)
    op = OperatorConfig(name="fourier", params={"acceleration": 2, "center_fraction": 0.25})
    settings = ReconstructSection(n_samples=1, progress=False, device="cpu", seed=11,
                                  slab_slices=1)
    outs = [reconstruct_prepared(prepared.directory, op, settings, None, tmp_path / name,
                                 progress=False, baseline=BaselineConfig(name=name,
                                                                         params={"lam": 1e-2}))
            for name in ("sense", "l1_wavelet")]
    assert len(calls) == 3 and outs[0]["slabs"] == 3 and outs[0]["scale"] == outs[1]["scale"]
    tune_baseline([prepared.directory], op, BaselineConfig(name="sense"), 0.0, seed=11)
    assert len(calls) == 3
    reconstruct_prepared(prepared.directory, op, settings.model_copy(update={
        "kspace_phase": "none"}), None, tmp_path / "none", progress=False,
        baseline=BaselineConfig(name="sense", params={"lam": 1e-2}))
    raw.scan_problems(prepared, op, seed=12)
    assert len(calls) == 9


def test_compressed_scan_problems_keep_the_image(prepared, tmp_path):
    """6 coils compressed to 4: the operator and y have 4 coils, the noise level, scale and
    zero-filled image are the acquired coils' own, the calibration is cached under its own key
    with the energy each slice keeps; SENSE of the fully sampled data and L1-wavelet at 3x give
    the image of all 6 coils within a few per cent; as many virtual coils as coils is no
    compression (the same cache); the setting reaches a reconstruction."""
    from recon.reconstruct.reconstruction import reconstruct_prepared

    op_cfg = OperatorConfig(name="fourier", params={"acceleration": 3, "center_fraction": 0.3})
    full = list(scan_problems(prepared, op_cfg, seed=0)[1])
    scale, squeezed = scan_problems(prepared, op_cfg, seed=0, virtual_coils=4)
    squeezed = list(squeezed)
    assert scale == scan_problems(prepared, op_cfg, seed=0)[0]
    for a, b in zip(full, squeezed, strict=True):
        assert tuple(b.y.shape[-3:]) == (4, *a.y.shape[-2:]) and b.operator.coil_maps.shape[0] == 4
        assert b.operator.sigma_y == a.operator.sigma_y
        np.testing.assert_array_equal(a.naive, b.naive)
        x_full = L1Wavelet(a.operator, 1e-4, iterations=60).solve(a.y)[0, 0].numpy()
        x_four = L1Wavelet(b.operator, 1e-4, iterations=60).solve(b.y)[0, 0].numpy()
        assert np.linalg.norm(x_four - x_full) < 0.05 * np.linalg.norm(x_full)
    folders = sorted((prepared.directory / ".calibration").glob("*/meta.json"))
    metas = [json.loads(f.read_text()) for f in folders]
    kept = [m for m in metas if m.get("virtual_coils") == 4]
    assert len(kept) == 1 and all(0.9 < e <= 1.0 for e in kept[0]["retained_energy"])
    n_folders = len(folders)
    list(scan_problems(prepared, op_cfg, seed=0, virtual_coils=6)[1])
    assert len(list((prepared.directory / ".calibration").glob("*/meta.json"))) == n_folders
    _, acquired = scan_problems(prepared, OperatorConfig(name="acquired"), seed=0, virtual_coils=4)
    pr = next(acquired)
    _, acquired_all = scan_problems(prepared, OperatorConfig(name="acquired"), seed=0)
    pr_all = next(acquired_all)
    sense = Sense(pr.operator, 0.0, iterations=20).solve(pr.y)[0, 0].numpy()
    sense_all = Sense(pr_all.operator, 0.0, iterations=20).solve(pr_all.y)[0, 0].numpy()
    assert np.linalg.norm(sense - sense_all) < 0.05 * np.linalg.norm(sense_all)
    settings = ReconstructSection(n_samples=1, progress=False, device="cpu",
                                  kspace_virtual_coils=4)
    recons = []
    for name, s in (("four", settings), ("all", settings.model_copy(
            update={"kspace_virtual_coils": None}))):
        out = reconstruct_prepared(prepared.directory, op_cfg, s, None, tmp_path / name,
                                   progress=False, baseline=BaselineConfig(name="sense",
                                                                           params={"lam": 1e-2}))
        assert out["scale"] == pytest.approx(scale)
        recons.append(np.load(out["stacks"])["recon"])
    assert not np.array_equal(*recons)
    assert np.linalg.norm(recons[0] - recons[1]) < 0.05 * np.linalg.norm(recons[1])
    with pytest.raises(ValueError, match="kspace_virtual_coils"):
        ReconstructSection(kspace_virtual_coils=0)


@pytest.mark.parametrize("name", ["sense", "l1_wavelet"])
def test_a_baseline_with_the_discrepancy_lam_is_above_zero_filled(prepared, tmp_path, name):
    """A config's ``lam: discrepancy`` through ``reconstruct_prepared`` on a noisy simulated
    acquisition (whitened, 6 coils, 3x): lam is chosen per slice from the slice's own noise
    level, and every slice is above zero-filled PSNR, where the grid's largest lam is below."""
    from recon.classical.baselines import LAMBDA_GRID
    from recon.metrics import psnr
    from recon.reconstruct.reconstruction import reconstruct_prepared
    from recon.reconstruct.volumes import read_stacks

    op = OperatorConfig(name="fourier", params={"acceleration": 3, "center_fraction": 0.15})
    # the solution's own magnitude: the rss output puts the acquired lines back, which lifts
    # even an over-smoothed answer above zero-filled
    settings = ReconstructSection(n_samples=1, progress=False, device="cpu",
                                  kspace_output="magnitude")

    def gains(lam):
        out = reconstruct_prepared(prepared.directory, op, settings, None, tmp_path / str(lam),
                                   progress=False,
                                   baseline=BaselineConfig(name=name, params={"lam": lam}))
        s = read_stacks(out["stacks"])
        return [float(psnr(torch.from_numpy(s["recon"][i])[None, None].double(), ref) -
                      psnr(torch.from_numpy(s["naive"][i])[None, None].double(), ref))
                for i in range(len(s["truth"]))
                for ref in [torch.from_numpy(s["truth"][i])[None, None].double()]]

    assert min(gains("discrepancy")) > 0.5
    assert max(gains(max(LAMBDA_GRID))) < 0


# -- real in-vivo k-space ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_scan(tmp_path_factory):
    """PyQMRI's in-vivo 13-coil brain (``data_manifests/public_kspace.yaml``), made the way
    ``recon materialise`` makes it: the sdist from PyPI (cached in data/public/.downloads when
    ``make data`` ran), the member checked, the fastMRI file's sha256 checked."""
    from pathlib import Path

    from recon.data import public, sources
    from recon.data.manifest import DataError, load_manifest

    manifest = load_manifest(Path(__file__).parents[1] / "data_manifests" / "public_kspace.yaml")
    entry = manifest.volume("pyqmri_vfa_brain")
    cache = Path(__file__).parents[1] / "data" / "public" / ".downloads"
    if not cache.is_dir():
        cache = tmp_path_factory.mktemp("downloads")
    try:
        archive = sources.fetch_source("pyqmri", manifest.sources["pyqmri"], cache,
                                      members=[entry.provenance.member], echo=lambda _msg: None)
    except DataError as err:  # PyPI unreachable: nothing real to test against
        pytest.skip(f"PyQMRI's sdist could not be fetched: {err}")
    data = public._produce(entry, archive)
    assert hashlib.sha256(data).hexdigest() == entry.sha256
    path = tmp_path_factory.mktemp("real") / "pyqmri.h5"
    path.write_bytes(data)
    return path


def test_real_multicoil_brain_reads_and_calibrates(real_scan, tmp_path):
    """The real acquisition: 13 coils, 224 x 224, fully sampled; its reference is the RSS of
    the data; the k-space-corner noise agrees with the image background's within 15 %; ESPIRiT
    from 4x data (18 calibration lines) combines the fully sampled coil images into the RSS
    within 3 % inside the head; SENSE and L1-wavelet beat zero-filled by more than 2 dB."""
    from recon.metrics import psnr

    scan = read_kspace(real_scan)
    assert scan.shape == (1, 13, 224, 224) and scan.fully_sampled and scan.format == "fastmri"
    img = coils.centered_ifft(scan.kspace[0])
    np.testing.assert_allclose(scan.reference[0], coils.rss(img), rtol=1e-4)
    ref = scan.reference[0]
    background = ref < 0.05 * np.percentile(ref, 99)
    image_var = np.mean(np.abs(img[:, background]) ** 2)
    assert coils.corner_noise_variance(scan.kspace, scan.mask) == pytest.approx(image_var, rel=0.15)

    prepared = PreparedScan.open(prepare_scan(real_scan, tmp_path))
    op_cfg = OperatorConfig(name="fourier", params={"acceleration": 4, "center_fraction": 0.08})
    scale, problems = scan_problems(prepared, op_cfg, seed=0)
    pr = next(problems)
    assert pr.calibration == 18
    full = torch.from_numpy(img / scale)
    combined = (pr.operator.coil_maps.conj() * full).sum(0).abs().numpy()
    head = pr.reference > 0.2 * pr.reference.max()
    assert np.abs(combined[head] - pr.reference[head]).mean() < 0.03 * pr.reference[head].mean()

    def score(x):
        return float(psnr(torch.from_numpy(np.asarray(x))[None, None].double(),
                          torch.from_numpy(pr.reference)[None, None].double()))

    naive = score(pr.naive)
    assert score(Sense(pr.operator, 1e-2).solve(pr.y)[0, 0].numpy()) > naive + 2
    assert score(L1Wavelet(pr.operator, 1e-3).solve(pr.y)[0, 0].numpy()) > naive + 2


def test_image_baselines_still_run_after_a_kspace_one(prepared):
    """sigpy's soft threshold is a lazily typed numba ufunc: after a complex L1-wavelet on coil
    data, a real TV / L1-wavelet solve of an image in the same process must still work (it
    failed with a complex128 -> float32 cast before the real loops were compiled first)."""
    from recon.classical.baselines import TotalVariation
    from recon.registry import OPERATORS

    _, problems = scan_problems(prepared, OperatorConfig(name="acquired"), seed=0)
    pr = next(problems)
    L1Wavelet(pr.operator, 1e-3, iterations=3).solve(pr.y)
    op = OPERATORS["mask"]((24, 20), keep=0.4, sigma_y=0.01, seed=0)
    y = op.measure(torch.rand(2, 1, 24, 20), generator=0)
    for baseline in (TotalVariation(op, 1e-2, iterations=5), L1Wavelet(op, 1e-2, iterations=5)):
        assert baseline.solve(y).dtype == torch.float32
