r"""Raw multi-coil k-space volumes: prepared once, reconstructed slice by slice, NIfTI out.

    prepared = prepare_scan("meas.h5", "work/cache", max_slices=4)   # recon.reconstruct.scans: a folder
    out = reconstruct_prepared(prepared, OperatorConfig(name="acquired"), settings, prior, "out/")

It goes through ``recon.reconstruct.reconstruction`` as an image volume does (slabs, runner,
cache, resume); here are its slices (``scan_slab``), outputs and lam scorers (``scan_scorers``).

**Preparation** (``recon.reconstruct.scans.prepare_scan``, cached per file):
``recon.data.kspace.read_kspace``, the ``max_slices`` central slices, then

1. noise: with noise scans (ISMRMRD) the k-space is *whitened*, ``k -> W k`` with
   ``W = L^{-1}``, ``L L^H = Psi`` (the noise covariance of the scans), so the noise is white
   with unit variance per complex entry; without them (fastMRI) it is left as it is and the
   noise variance is estimated from the k-space corners (``recon.classical.coils``);
2. the readout oversampling is removed (``remove_readout_oversampling``);
3. the reference: the file's ``reconstruction_rss`` when given (and the data were not
   whitened), else the root-sum-of-squares of the fully sampled coil images, else none
   (an undersampled acquisition: reconstructed, not scored).

**One operator** (``ScanProblem``): the sampling is the acquired lines (operator
``acquired``) or, retrospectively, those lines times a mask of the ``fourier`` operator's
generator (``recon.operators.build_fourier``: fastMRI-style Cartesian lines or a 2-D variable
density, seeded). Everything that depends on the sampling is computed from the undersampled
data only, as for a real accelerated scan:

- intensity scale (cached with the maps: ``calibrate``): the head's median of the zero-filled
  root-sum-of-squares over the volume is mapped to 0.5 (the prior's foreground
  normalisation), ``y -> y / scale``;
- coil compression (``reconstruct.kspace_virtual_coils``, off by default): the coils mixed
  into that many virtual ones by the SVD of each slice's calibration block
  (``recon.classical.coils.compression_matrix``), for every method, before the maps; the
  energy each slice keeps is in the calibration's ``meta.json``;
- coil maps: ESPIRiT on the fully sampled centre of each slice (``recon.classical.coils.espirit_maps``,
  calibration width = the largest centred fully sampled square, at most 24);
- phase: the low-resolution phase of the coil-combined calibration image is absorbed into the
  maps (``recon.classical.coils.absorb_phase``), so the image the real-valued prior models is the
  (non-negative) magnitude; the data consistency solves over complex images and keeps the
  magnitude (``UndersampledFourier.prox``), so the phase the low-resolution estimate misses
  stays in the data fit (``benchmarks/kspace.py --phase`` measures the alternatives);
- the image is zero outside the maps' support (``UndersampledFourier.support``).

The prior sees each slice in the viewer layout it was trained on (``ViewTransform``: rows
anterior to posterior, columns along the patient's right-left axis, from the header's
directions). Outputs: the posterior mean's image (``output_image``: by default the
root-sum-of-squares of its coil images with the acquired samples put back, as the reference is
made from the fully sampled ones), the pixel-wise std over samples,
the zero-filled root-sum-of-squares (naive) and the reference, on the reconstructed grid
(readout oversampling removed, phase field of view cropped to ``reconSpace``), as NIfTI with
the affine from the header (``KSpaceScan.affine``) in the file's units (whitened units for
ISMRMRD files with noise scans), plus ``slices.npz`` (viewer layout) for metrics and figures.
"""

from __future__ import annotations

import hashlib
import json
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from recon.classical import coils
from recon.config import BaselineConfig, OperatorConfig, ReconstructSection
from recon.data.manifest import DataError
from recon.data.nifti import atomic_dir, atomic_path, write_nifti
from recon.data.simulate import head_median
from recon.data.slicing import FOREGROUND_MEDIAN
from recon.filelock import exclusive_lock
from recon.metrics import psnr
from recon.operators import UndersampledFourier
from recon.operators.complex_image import IMAGE_MODELS, image_model
from recon.prior.network import PerChannel, autocast
from recon.reconstruct.coupling import is_volume_method
from recon.reconstruct.scans import PreparedScan, ViewOriented, crop_phase
from recon.reconstruct.slices import SliceResult, slice_seed
from recon.reconstruct.volumes import STACKS
from recon.registry import KSPACE_OPERATORS

__all__ = ["PHASES", "Calibration", "ScanProblem", "calibrate", "calibration_width", "output_image",
           "sampling_masks", "scan_problems", "scan_scorers", "scan_slab", "write_scan_outputs"]

MAX_CALIBRATION = 24
"""ESPIRiT calibration width at most (lines); at least ``MIN_CALIBRATION``."""
MIN_CALIBRATION = 6
X0_HEADROOM = 1.5
"""``x0_range_for``: a scan's guided estimates may reach this many times its zero-filled maximum."""
PHASES = typing.get_args(ReconstructSection.model_fields["kspace_phase"].annotation)
"""How the image's phase is absorbed into the coil maps (``scan_problems``): the values
``reconstruct.kspace_phase`` takes."""


# -- one operator -------------------------------------------------------------------------------
def calibration_width(mask: np.ndarray) -> int:
    """Side of the largest centred square of ``mask (R, P)`` that is fully sampled."""
    m = np.asarray(mask, bool)
    r, p = m.shape
    for n in range(1, min(r, p) + 1):
        r0, p0 = r // 2 - n // 2, p // 2 - n // 2
        if not m[r0: r0 + n, p0: p0 + n].all():
            return n - 1
    return min(r, p)


def sampling_masks(prepared: PreparedScan, operator: OperatorConfig, seed: int) -> np.ndarray:
    """``(S, R, P)``: the acquired lines, times the ``fourier`` operator's mask (retrospective
    undersampling, drawn from ``seed`` as for images) unless the operator is ``acquired``."""
    s_n, _, r, p = prepared.kspace.shape
    acquired = np.broadcast_to(prepared.mask[:, None, :], (s_n, r, p))
    if operator.name == "acquired":
        return np.ascontiguousarray(acquired)
    if operator.name != "fourier":
        raise DataError(f"operator {operator.name!r} does not apply to raw k-space "
                        f"({prepared.name}): use {' or '.join(KSPACE_OPERATORS)}")
    if operator.params.get("coils") is not None:
        raise DataError(f"{prepared.name}: the coils of raw k-space come from the data; "
                        "remove fourier's 'coils' parameter")
    retro = operator.build((r, p), 0.0, seed).mask.numpy()
    return acquired & retro[None]


@dataclass
class ScanProblem:
    """One slice of a prepared scan under one sampling: ``y`` ``(1, 1, C, R, P)`` in the
    prior's units (divided by ``scale``), the operator (maps with the phase absorbed, the
    noise level ``sigma / scale``), the zero-filled root-sum-of-squares ``naive`` and the
    ``reference`` (or None) ``(R, P_recon)`` in the same units."""

    index: int
    y: Tensor
    operator: UndersampledFourier
    naive: np.ndarray
    reference: np.ndarray | None
    calibration: int


def _phase_maps(maps: np.ndarray, y: np.ndarray, mask: np.ndarray, calib: int,
                phase: str) -> np.ndarray:
    """ESPIRiT maps with the image's phase absorbed: ``lowres`` (the coil-combined calibration
    image's), ``sense`` (a SENSE solution's: 10 CG iterations on all the data) or ``none``."""
    if phase == "lowres":
        return coils.absorb_phase(maps, coils.lowres_phase(y, maps, calib))
    if phase == "sense":
        op = UndersampledFourier(torch.from_numpy(mask), coil_maps=torch.from_numpy(maps))
        x = op.prox(torch.zeros(1, 1, *y.shape[-2:], dtype=torch.complex64),
                    torch.from_numpy(y).to(torch.complex64)[None, None], 0.0, 10)
        return coils.absorb_phase(maps, np.angle(x[0, 0].numpy()))
    if phase == "none":
        return maps
    raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")


class Calibration(typing.NamedTuple):
    """What a scan's undersampled data give once per sampling (``calibrate``): the intensity
    ``scale``, the coil ``maps (S, C', R, P)`` (phase absorbed), the ESPIRiT calibration
    ``widths`` per slice, and with coil compression the ``compression (S, V, C)`` matrices and
    the calibration data's ``energy`` they keep per slice (None without)."""

    scale: float
    maps: np.ndarray
    widths: list[int]
    compression: np.ndarray | None
    energy: list[float] | None


def calibrate(prepared: PreparedScan, masks: np.ndarray, phase: str,
              virtual_coils: int | None = None) -> Calibration:
    """The ``Calibration`` of a scan under one sampling (``masks``), phase rule and coil
    compression (``virtual_coils``: SVD to that many virtual coils from each slice's
    calibration block, ``recon.classical.coils.compression_matrix``, when the scan has more;
    None keeps every coil), computed once and kept in ``.calibration/<key>`` of the prepared
    folder (key: a hash of the masks and both rules; written atomically under a lock, so
    concurrent slabs compute it once); the maps are ESPIRiT's of the (compressed) data with the
    phase absorbed (``_phase_maps``). The scale comes from the acquired coils' zero-filled
    root-sum-of-squares, with or without compression."""
    k = prepared.kspace
    compress = virtual_coils is not None and virtual_coils < k.shape[1]
    rules = (phase, virtual_coils) if compress else phase
    key = hashlib.sha256(masks.tobytes() + repr((masks.shape, rules)).encode()).hexdigest()[:16]
    folder = prepared.directory / ".calibration" / key
    with exclusive_lock(folder.with_suffix(".lock")):
        if not (folder / "meta.json").is_file():
            zero_filled = np.stack([coils.rss(coils.centered_ifft(k[i] * masks[i]))
                                    for i in range(k.shape[0])])
            scale = head_median(zero_filled) / FOREGROUND_MEDIAN
            if not np.isfinite(scale) or scale <= 0:
                raise DataError(f"{prepared.name}: the zero-filled image is empty (no signal)")
            widths, maps, matrices, energy = [], [], [], []
            for i in range(k.shape[0]):
                widths.append(calib := min(calibration_width(masks[i]), MAX_CALIBRATION))
                if calib < MIN_CALIBRATION:
                    raise DataError(f"{prepared.name} slice {prepared.indices[i]}: only {calib} fully "
                                    f"sampled central lines; ESPIRiT needs at least {MIN_CALIBRATION} "
                                    "(sample more autocalibration lines: center_fraction)")
                y = k[i] * masks[i]
                if compress:
                    matrices.append(m := coils.compression_matrix(y, calib, virtual_coils))
                    energy.append(coils.retained_energy(coils.calibration_region(y, calib), m))
                    y = coils.mix_coils(y, m)
                maps.append(_phase_maps(coils.espirit_maps(y, calib), y, masks[i], calib, phase))
            # kept in ESPIRiT's memory layout (axes by decreasing stride): same sums downstream
            order = [int(a) for a in np.argsort(maps[0].strides)[::-1]]
            with atomic_dir(folder) as tmp:
                np.save(tmp / "maps.npy", np.stack([m.transpose(order) for m in maps]))
                if compress:
                    np.save(tmp / "compression.npy", np.stack(matrices))
                (tmp / "meta.json").write_text(json.dumps({
                    "scale": float(scale), "phase": phase, "calibration": widths, "order": order,
                    "virtual_coils": virtual_coils if compress else None,
                    "retained_energy": energy if compress else None}))
    meta = json.loads((folder / "meta.json").read_text())
    maps = np.load(folder / "maps.npy", mmap_mode="r")
    compression = np.load(folder / "compression.npy") if meta.get("virtual_coils") else None
    return Calibration(meta["scale"], maps.transpose(0, *(1 + np.argsort(meta["order"]))),
                       meta["calibration"], compression, meta.get("retained_energy"))


def scan_problems(prepared: PreparedScan, operator: OperatorConfig, seed: int,
                  ranks: Sequence[int] | None = None, phase: str = "lowres",
                  virtual_coils: int | None = None):
    """``(scale, problems)``: the volume's intensity scale and an iterator of ``ScanProblem``
    for the slices at ``ranks`` (default all), the image's phase absorbed into the maps as
    ``phase`` says (``PHASES``), the coils compressed to ``virtual_coils`` (``calibrate``: None
    keeps them); scale, maps and compression from ``calibrate`` (computed once, cached). The
    zero-filled ``naive`` image is the acquired coils' root-sum-of-squares either way."""
    k = prepared.kspace
    masks = sampling_masks(prepared, operator, seed)
    cal = calibrate(prepared, masks, phase, virtual_coils)
    scale, maps = cal.scale, cal.maps
    ranks = range(k.shape[0]) if ranks is None else ranks
    reference, p_recon = prepared.reference, prepared.recon_matrix[1]

    def problems():
        for i in ranks:
            y = k[i] * masks[i]
            naive = crop_phase(coils.rss(coils.centered_ifft(y)), p_recon) / scale
            if cal.compression is not None:
                y = coils.mix_coils(y, cal.compression[i])
            op = UndersampledFourier(torch.from_numpy(masks[i]),
                                     coil_maps=torch.from_numpy(np.array(maps[i], order="K")),
                                     sigma_y=prepared.sigma / scale, real_output=False)
            ref = None if reference is None else reference[i] / scale
            y_t = torch.from_numpy(y / scale).to(torch.complex64)[None, None]
            yield ScanProblem(prepared.indices[i], y_t, op, naive, ref, cal.widths[i])

    return scale, problems()


# -- reconstruction (through recon.reconstruct.reconstruction) ----------------------------------------------
def x0_range_for(x0_range: tuple[float, float] | None, naive: np.ndarray,
                 signed: bool) -> tuple[float, float] | None:
    """The sampler's ``x0_range`` on a scan: the upper end raised to ``X0_HEADROOM`` times the
    zero-filled image's maximum where the scan is brighter than the prior's units assume (the
    scalp of PyQMRI's FLASH brain reaches 3.3 in them, the T1 training slices end near 1.5:
    clamped there, its scalp was lost, 28.7 instead of 30.6 dB warm-started from L1-wavelet
    with the tracked phase at 4x), and ``(-hi, hi)`` for an image model of signed images
    (``RealImag``)."""
    if x0_range is None:
        return None
    lo, hi = x0_range
    hi = max(hi, X0_HEADROOM * float(np.max(naive)))
    return (-hi, hi) if signed else (lo, hi)


def output_image(operator: UndersampledFourier, z: Tensor, y: Tensor, rule: str) -> Tensor:
    """The image a scan's reconstruction reports of complex images ``z`` (``kspace_output``):
    ``rss``, the root-sum-of-squares of their coil images with the acquired samples ``y`` put
    back (``UndersampledFourier.rss_with_data``: the fully sampled reference's own making, its
    noise floor outside the head included; on fastMRI's measured validation slice at 4x +3.9
    dB whole image for the prior, +2.1 for L1-wavelet, +0.1 inside the head), or ``magnitude``,
    ``|z|``."""
    return operator.rss_with_data(z, y) if rule == "rss" else z.abs()


class ScanSlices:
    """``reconstruct_slab``'s reconstructor of a scan: one slice (``ScanProblem``) at a time,
    each with its own operator (its coil maps) seen through the image model
    ``settings.kspace_image`` (``recon.operators.complex_image``), by the sampler
    ``make_sampler(operator, x0_range)``. The reconstruction is the ``output_image`` of the mean
    of the samples' complex images, the std the pixel-wise std of the samples' own."""

    def __init__(self, make_sampler, settings: ReconstructSection, device: torch.device,
                 precision: str, shape: tuple[int, int]):
        self.make_sampler, self.settings, self.device = make_sampler, settings, device
        self.precision, self.shape, self.sampler = precision, shape, None

    def __call__(self, problem: ScanProblem, indices: Sequence[int]) -> SliceResult:
        start = time.perf_counter()
        measured = problem.operator.to(self.device)
        op = image_model(measured, self.settings.kspace_image)
        self.sampler = self.make_sampler(op, x0_range_for(self.settings.x0_range, problem.naive,
                                                          op.signed))
        gen = torch.Generator(self.device).manual_seed(slice_seed(self.settings.seed,
                                                                  problem.index, salt=2))
        with autocast(self.device, self.precision):
            post = self.sampler.sample(problem.y.to(self.device), self.settings.n_samples,
                                       generator=gen)
        z = op.to_complex(post.samples.flatten(0, 1)) if post.samples is not None else \
            op.to_complex(post.mean)  # a classical baseline: one deterministic image
        y, rule = problem.y.to(self.device), self.settings.kspace_output
        mean = output_image(measured, z.mean(0, keepdim=True), y, rule)
        std = output_image(measured, z, y, rule).std(0, keepdim=True) if z.shape[0] > 1 else \
            torch.zeros_like(mean)
        truth = problem.reference if problem.reference is not None else np.zeros(self.shape)
        mean, std = (crop_phase(a[:, 0].cpu().numpy(), self.shape[1]) for a in (mean, std))
        return SliceResult([problem.index], truth[None], problem.naive[None], mean, std,
                           post.nfe, time.perf_counter() - start)


def scan_slab(scan: PreparedScan, operator: OperatorConfig, settings: ReconstructSection,
              baseline: BaselineConfig | None, samplers, device: torch.device, start: int,
              stop: int):
    """``(reconstructor, batches)`` of ``reconstruct_slab`` for the slices ``[start, stop)`` of
    a scan: ``ScanSlices`` and ``([index], ScanProblem)`` batches, the phase absorbed as
    ``settings.kspace_phase`` says; ``samplers(wrap)`` makes the sampler of an operator, the
    prior seeing each slice in the viewer layout (``ViewOriented``)."""
    if is_volume_method(operator, settings, baseline):
        raise ValueError(f"{scan.name}: raw k-space is reconstructed slice by slice; set "
                         "reconstruct.coupling: none and use a 2-D baseline")
    def wrap(network):  # the prior sees each slice (each channel) in the viewer layout
        seen = ViewOriented(network, scan.view)
        return PerChannel(seen) if IMAGE_MODELS[settings.kspace_image].channels > 1 else seen

    make_sampler = samplers(wrap)
    _, problems = scan_problems(scan, operator, settings.seed, range(start, stop),
                                settings.kspace_phase, settings.kspace_virtual_coils)
    precision = "fp32" if baseline is not None else settings.precision
    return (ScanSlices(make_sampler, settings, device, precision, scan.shape),
            (([pr.index], pr) for pr in problems))


def write_scan_outputs(scan: PreparedScan, stack, out_dir: Path, operator: OperatorConfig,
                       settings: ReconstructSection) -> tuple[dict[str, str], dict]:
    """The outputs of the module docstring (NIfTI ``(R, P, S)``, ``slices.npz``); returns the
    paths and the summary's ``has_reference`` and ``scale``."""
    scale = calibrate(scan, sampling_masks(scan, operator, settings.seed), settings.kspace_phase,
                      settings.kspace_virtual_coils).scale
    has_reference = scan.reference is not None
    stacks = {name: stack(name) for name in STACKS}
    paths = {}
    for name in ("recon", "naive", "std") + (("truth",) if has_reference else ()):
        file = "reference" if name == "truth" else name
        paths[file] = str(write_nifti(np.moveaxis(stacks[name], 0, -1) * scale,
                                      out_dir / f"{file}.nii.gz", affine=scan.affine))
    viewed = {k: scan.view.apply(torch.from_numpy(stacks[k])).numpy() for k in STACKS}
    with atomic_path(out_dir / "slices.npz", suffix=".npz") as tmp:
        np.savez_compressed(tmp, indices=np.asarray(scan.indices), **viewed)
    paths["stacks"] = str(out_dir / "slices.npz")
    return paths, {"has_reference": has_reference, "scale": scale}


def scan_scorers(scan: PreparedScan, operator: OperatorConfig, baseline: BaselineConfig,
                 sigma_y: float, seed: int) -> list:
    """For ``tune_baseline``: ``lam -> [PSNR per slice]`` of a scan with a reference (none
    without), the baseline solved on each slice's ``y`` (its own noise: no ``sigma_y``), its
    ``output_image`` by the default rule (``rss``) scored against the reference."""
    if scan.reference is None:
        return []
    solved = [(pr, baseline.build(pr.operator)) for pr in scan_problems(scan, operator, seed)[1]]

    def scores(lam: float) -> list[float]:
        return [float(psnr(*(torch.from_numpy(a)[None, None].double() for a in (crop_phase(
            output_image(pr.operator, solver.solve_complex(pr.y, lam), pr.y, "rss")[0, 0].numpy(),
            scan.shape[1]), pr.reference))))
            for pr, solver in solved]
    return [scores]
