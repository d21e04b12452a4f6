r"""Realistic multi-coil acquisitions simulated from a magnitude NIfTI volume, at its native grid.

    scan = simulate_scan("data/public/antspyx/ch2.nii.gz", slices=4, coils=8, seed=0)
    write_ismrmrd(scan, "colin27.h5"); write_fastmri(scan, "colin27_fastmri.h5")

For the central slices (along the RAS z axis) of the volume, with ``m`` the magnitude slice
on its own in-plane grid (rows = RAS x = readout, columns = RAS y = phase encode):

1. **Readout oversampling**: the field of view is doubled along the readout (``m`` zero-padded
   to ``2 R`` rows), as scanners sample the readout at twice the bandwidth.
2. **Phase**: ``x = m exp(i phi)``, ``phi`` a smooth random quadratic over the field of view
   (B0 and receive phase; ``phase_range`` radians peak to peak at most); with
   ``phase="tissue"`` plus what a measured image's phase also holds (``tissue_phase``): the
   fat of the scalp at its own offset, B0 bumps at air-tissue interfaces, veins, and small
   offsets between tissues, so the phase changes sharply where the anatomy does.
3. **Coils**: ``C`` loops on a circle of radius ``coil_radius`` (in half fields of view)
   around the object with sensitivities ``exp(i (angle - theta_c)) / distance`` (no
   normalisation: the image is brighter near the coils, as with a real receive array),
   scaled so that their root-sum-of-squares is 1 at the centre.
4. **k-space**: ``k_c = fft2c(S_c x)`` (orthonormal, centred).
5. **Correlated noise**: ``n = sigma L z``, ``z`` circular complex white noise, ``L L^H = Psi``
   with channel gains in [0.8, 1.25] and correlation ``coil_correlation^{ring distance}``
   between channels; ``sigma = noise`` times the head's median of ``m`` (``noise`` is the
   noise-to-signal ratio of a single unit-gain coil image). The same noise law fills
   ``noise_readouts`` noise-scan readouts.
6. **Sampling** (optional ``acceleration``): fastMRI-style Cartesian lines
   (``recon.operators.cartesian_mask``), one mask for every slice.

Geometry comes from the volume's RAS affine: pixel ``(R // 2, P // 2)`` of slice ``k`` sits
at ``affine @ [R // 2, P // 2, k, 1]`` (``KSpaceScan``'s convention), so a reconstruction of
the file overlays the source volume voxel for voxel. ``reference`` is the root-sum-of-squares
of the fully sampled noisy coil images on the reconstructed grid (fastMRI's
``reconstruction_rss``).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from recon.classical.coils import centered_fft, centered_ifft, remove_readout_oversampling, rss
from recon.data.kspace import LPS_TO_RAS, KSpaceScan

__all__ = ["central_slices", "coil_sensitivities", "head_median", "simulate_scan", "tissue_phase"]


def head_median(image: np.ndarray) -> float:
    """Median of the voxels brighter than a tenth of the 99th percentile (the head)."""
    v = np.abs(np.asarray(image, float)).ravel()
    p99 = np.percentile(v, 99.0)
    head = v[v > 0.1 * p99]
    return float(np.median(head)) if head.size else float(v.max())


def central_slices(volume: np.ndarray, count: int, min_foreground: float = 0.05) -> list[int]:
    """``count`` consecutive slice indices (last axis) at the middle of the slices whose share
    of voxels above a tenth of the 99th percentile is at least ``min_foreground``."""
    v = np.abs(volume)
    level = 0.1 * np.percentile(v, 99.0)
    fg = (v > level).mean(axis=(0, 1))
    good = np.flatnonzero(fg >= min_foreground)
    if good.size == 0:
        raise ValueError("no slice has enough foreground to simulate")
    mid = int(good[good.size // 2])
    count = min(count, volume.shape[-1])
    start = min(max(mid - (count - 1) // 2, 0), volume.shape[-1] - count)
    return list(range(start, start + count))


def tissue_phase(m: np.ndarray, rng: np.random.Generator,
                 pixel_mm: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    r"""The phase ``(R, P)`` a measured gradient-echo image of magnitude ``m`` holds beyond a
    smooth background, from the physics of the signal at an echo time of a few ms (3 T, 4 ms):

    - **fat**: the bright rim of the head (within 6 mm of its edge and brighter than its 60th
      percentile: the scalp's subcutaneous fat; a skull-stripped brain has almost none there)
      at one offset drawn from ``U(-pi, pi)`` per slice; fat precesses 3.4 ppm (440 Hz at 3 T)
      below water, so at the echo time their phases differ by an arbitrary angle, and the step
      is as sharp as the tissue boundary;
    - **air-tissue interfaces**: 1 to 3 Gaussian bumps of ``U(1, 3)`` rad, 10 to 25 mm wide,
      centred on the head's edge (B0 near sinuses and ear canals: tens of Hz over a few mm);
    - **veins**: 5 to 15 blobs of 1 to 2 mm inside the head of ``+-U(0.1, 0.5)`` rad
      (deoxygenated blood, 0.3-0.45 ppm more paramagnetic than tissue: at most
      ``Delta chi B0 / 3``, about 19 Hz at 3 T, 0.5 rad at a 4 ms echo);
    - **tissues**: the head's intensity terciles (roughly CSF, grey and white matter in a T1)
      at ``N(0, 0.1)`` rad offsets each (grey and white matter differ by a few Hz at 3 T)."""
    from scipy import ndimage

    m = np.asarray(m, float)
    level = 0.1 * np.percentile(m, 99.0)
    head = ndimage.binary_fill_holes(m > level)
    if not head.any():
        return np.zeros_like(m)
    depth = ndimage.distance_transform_edt(head, sampling=pixel_mm)
    phi = np.zeros_like(m)
    fat = head & (depth < 6.0) & (m > np.percentile(m[head], 60))
    phi[fat] += rng.uniform(-np.pi, np.pi)
    rows, cols = np.indices(m.shape)
    y_mm, x_mm = rows * pixel_mm[0], cols * pixel_mm[1]
    edge = np.argwhere(head & (depth <= 1.0 * min(pixel_mm) + 1e-9))
    for _ in range(rng.integers(1, 4)):
        cy, cx = edge[rng.integers(len(edge))] * np.asarray(pixel_mm)
        width = rng.uniform(10.0, 25.0)
        phi += rng.uniform(1.0, 3.0) * np.exp(-((y_mm - cy) ** 2 + (x_mm - cx) ** 2)
                                              / (2 * width**2))
    inside = np.argwhere(head)
    for _ in range(rng.integers(5, 16)):
        cy, cx = inside[rng.integers(len(inside))] * np.asarray(pixel_mm)
        width = rng.uniform(1.0, 2.0)
        phi += rng.choice([-1.0, 1.0]) * rng.uniform(0.1, 0.5) * np.exp(
            -((y_mm - cy) ** 2 + (x_mm - cx) ** 2) / (2 * width**2))
    terciles = np.percentile(m[head], [100 / 3, 200 / 3])
    tissue = np.digitize(m, terciles)
    phi += np.where(head, rng.normal(0.0, 0.1, 3)[tissue], 0.0)
    return phi


def coil_sensitivities(shape: tuple[int, int], coils: int, radius: float = 2.0,
                       extent: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """``(C, H, W)`` loop-coil sensitivities ``exp(i (angle - theta_c)) / distance`` of coils at
    angles ``theta_c = 2 pi c / C`` on a circle of ``radius`` (units: half of the ``extent``
    of the image object, ``extent`` = the grid's half sizes in those units), scaled so the
    root-sum-of-squares is 1 at the centre."""
    h, w = shape
    theta = 2 * np.pi * np.arange(coils) / coils
    y = (np.arange(h) - h // 2) / (h / 2) * extent[0]
    x = (np.arange(w) - w // 2) / (w / 2) * extent[1]
    dy = y[None, :, None] - radius * np.sin(theta)[:, None, None]
    dx = x[None, None, :] - radius * np.cos(theta)[:, None, None]
    maps = np.exp(1j * (np.arctan2(dx, -dy) - theta[:, None, None])) / np.hypot(dx, dy)
    return (maps / rss(maps[:, h // 2, w // 2], axis=0)).astype(np.complex64)


def _noise_factor(coils: int, correlation: float, rng: np.random.Generator) -> np.ndarray:
    """``L`` with ``L L^H = Psi`` (mean diagonal 1): gains and ring-neighbour correlation."""
    c = np.arange(coils)
    ring = np.minimum(np.abs(c[:, None] - c[None, :]), coils - np.abs(c[:, None] - c[None, :]))
    corr = correlation ** ring
    gains = rng.uniform(0.8, 1.25, coils)
    psi = gains[:, None] * corr * gains[None, :]
    return np.linalg.cholesky(psi / np.mean(np.diag(psi)))


def _complex_noise(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / np.sqrt(2.0)


def simulate_scan(path: str | Path, slices: int = 4, coils: int = 8, noise: float = 0.02,
                  oversampling: int = 2, phase_range: float = 2 * np.pi,
                  coil_correlation: float = 0.3, coil_radius: float = 2.0,
                  acceleration: float | None = None, center_fraction: float = 0.08,
                  noise_readouts: int = 8, seed: int = 0, phase: str = "smooth") -> KSpaceScan:
    """A simulated acquisition of the ``slices`` central axial slices of the NIfTI volume at
    ``path`` (see the module docstring); ``phase``: ``smooth`` (the background alone) or
    ``tissue`` (``tissue_phase`` added)."""
    if phase not in ("smooth", "tissue"):
        raise ValueError(f"phase must be 'smooth' or 'tissue', got {phase!r}")
    from recon.operators import cartesian_mask

    rng = np.random.default_rng(seed)
    img = nib.as_closest_canonical(nib.load(str(path)))
    vol = np.asarray(img.get_fdata(dtype=np.float32))
    if vol.ndim == 4 and vol.shape[3] == 1:
        vol = vol[..., 0]
    if vol.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {vol.shape}")
    picks = central_slices(vol, slices)
    m = np.moveaxis(vol[:, :, picks], -1, 0).astype(np.float64)  # (S, R, P)
    dr, dp = (float(np.linalg.norm(img.affine[:3, i])) for i in range(2))
    s_n, r, p = m.shape
    r_enc = oversampling * r
    start = r_enc // 2 - r // 2
    x = np.zeros((s_n, r_enc, p), np.complex128)
    x[:, start: start + r] = m
    # smooth background phase over the encoded field of view (coordinates in half-FOVs)
    u = (np.arange(r_enc) - r_enc // 2) / (r / 2)
    v = (np.arange(p) - p // 2) / (p / 2)
    uu, vv = np.meshgrid(u, v, indexing="ij")
    for s in range(s_n):
        a, b, c, d = rng.uniform(-1, 1, 4)
        phi = a * np.pi + b * uu + c * vv + d * (uu**2 + vv**2)
        span = np.ptp(phi[start: start + r])
        if span > phase_range:
            phi = phi * (phase_range / span)
        if phase == "tissue":
            phi[start: start + r] += tissue_phase(m[s], rng, (dr, dp))
        x[s] *= np.exp(1j * phi)
    maps = coil_sensitivities((r_enc, p), coils, coil_radius, extent=(oversampling, 1.0))
    k = centered_fft(maps[None] * x[:, None])
    sigma = noise * head_median(m)
    chol = _noise_factor(coils, coil_correlation, rng)
    k = k + sigma * np.einsum("ij,sj...->si...", chol, _complex_noise(k.shape, rng))
    noise_scan = sigma * chol @ _complex_noise((coils, noise_readouts * r_enc), rng)
    reference = rss(centered_ifft(remove_readout_oversampling(k.astype(np.complex64), r)))
    mask = np.ones((s_n, p), bool)
    if acceleration is not None:
        line = cartesian_mask((r_enc, p), acceleration, center_fraction, kind="random",
                              generator=seed)[0].numpy()
        mask[:] = line
    a = img.affine
    dr, dp, dz = (float(np.linalg.norm(a[:3, i])) for i in range(3))
    centres = np.stack([(a @ [r // 2, p // 2, k_, 1])[:3] for k_ in picks])
    return KSpaceScan(
        kspace=np.where(mask[:, None, None, :], k, 0).astype(np.complex64), mask=mask,
        recon_matrix=(r, p), fov_mm=(r * dr, p * dp, dz),
        positions=centres @ LPS_TO_RAS.T,
        read_dir=tuple(LPS_TO_RAS @ (a[:3, 0] / dr)), phase_dir=tuple(LPS_TO_RAS @ (a[:3, 1] / dp)),
        slice_dir=tuple(LPS_TO_RAS @ (a[:3, 2] / dz)), noise=noise_scan.astype(np.complex64),
        reference=reference.astype(np.float32), source=str(path), format="simulated")
