r"""Raw multi-coil k-space volumes: prepared once, reconstructed slice by slice, NIfTI out.

    prepared = prepare_scan("meas.h5", "work/cache", max_slices=4)   # recon.scans: a folder
    out = reconstruct_scan(prepared, OperatorConfig(name="acquired"), settings, prior, "out/")

**Preparation** (``recon.scans.prepare_scan``, cached per file): ``recon.data.kspace.read_kspace``, the
``max_slices`` central slices, then

1. noise: with noise scans (ISMRMRD) the k-space is *whitened*, ``k -> W k`` with
   ``W = L^{-1}``, ``L L^H = Psi`` (the noise covariance of the scans), so the noise is white
   with unit variance per complex entry; without them (fastMRI) it is left as it is and the
   noise variance is estimated from the k-space corners (``recon.coils``);
2. the readout oversampling is removed (``remove_readout_oversampling``);
3. the reference: the file's ``reconstruction_rss`` when given (and the data were not
   whitened), else the root-sum-of-squares of the fully sampled coil images, else none
   (an undersampled acquisition: reconstructed, not scored).

**One operator** (``ScanProblem``): the sampling is the acquired lines (operator
``acquired``) or, retrospectively, those lines times a mask of the ``fourier`` operator's
generator (``recon.operators.build_fourier``: fastMRI-style Cartesian lines or a 2-D variable
density, seeded). Everything that depends on the sampling is computed from the undersampled
data only, as for a real accelerated scan:

- intensity scale: the head's median of the zero-filled root-sum-of-squares over the volume
  is mapped to 0.5 (the prior's foreground normalisation), ``y -> y / scale``;
- coil maps: ESPIRiT on the fully sampled centre of each slice (``recon.coils.espirit_maps``,
  calibration width = the largest centred fully sampled square, at most 24);
- phase: the low-resolution phase of the coil-combined calibration image is absorbed into the
  maps (``recon.coils.absorb_phase``), so the image the real-valued prior models is the
  (non-negative) magnitude; the data consistency solves over complex images and keeps the
  magnitude (``UndersampledFourier.prox``), so the phase the low-resolution estimate misses
  stays in the data fit (``benchmarks/kspace.py --phase`` measures the alternatives);
- the image is zero outside the maps' support (``UndersampledFourier.support``).

The prior sees each slice in the viewer layout it was trained on (``ViewTransform``: rows
anterior to posterior, columns along the patient's right-left axis, from the header's
directions). Outputs: the magnitude of the posterior mean, the pixel-wise std over samples,
the zero-filled root-sum-of-squares (naive) and the reference, on the reconstructed grid
(readout oversampling removed, phase field of view cropped to ``reconSpace``), as NIfTI with
the affine from the header (``KSpaceScan.affine``) in the file's units (whitened units for
ISMRMRD files with noise scans), plus ``slices.npz`` (viewer layout) for metrics and figures.
"""

from __future__ import annotations

import json
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from recon import coils
from recon.cond_denoiser import CondDenoiser
from recon.config import BaselineConfig, OperatorConfig, PriorSection, ReconstructSection
from recon.data.manifest import DataError
from recon.data.nifti import atomic_path, atomic_write_bytes, write_nifti
from recon.data.simulate import head_median
from recon.data.slicing import FOREGROUND_MEDIAN
from recon.network import autocast, resolve_device
from recon.operators import UndersampledFourier
from recon.reconstruction import load_network, method_summary, slice_seed
from recon.scans import PreparedScan, ViewOriented, crop_phase
from recon.volumes import STACKS, VolumeBuffer

__all__ = ["KSPACE_OPERATORS", "PHASES", "ScanProblem", "calibration_width", "reconstruct_scan",
           "sampling_masks", "scan_problems", "tune_scans"]

KSPACE_OPERATORS = ("acquired", "fourier")
"""Operators that apply to raw k-space: as acquired, or retrospectively undersampled."""
MAX_CALIBRATION = 24
"""ESPIRiT calibration width at most (lines); at least ``MIN_CALIBRATION``."""
MIN_CALIBRATION = 6
PHASES = typing.get_args(ReconstructSection.model_fields["kspace_phase"].annotation)
"""How the image's phase is absorbed into the coil maps (``scan_problems``): the values
``reconstruct.kspace_phase`` takes."""


# -- one operator -------------------------------------------------------------------------------
def calibration_width(mask: np.ndarray) -> int:
    """Side of the largest centred square of ``mask (R, P)`` that is fully sampled."""
    m = np.asarray(mask, bool)
    r, p = m.shape
    w = 0
    while w < min(r, p):
        n = w + 1
        r0, p0 = r // 2 - n // 2, p // 2 - n // 2
        if not m[r0: r0 + n, p0: p0 + n].all():
            break
        w = n
    return w


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


def scan_problems(prepared: PreparedScan, operator: OperatorConfig, seed: int,
                  ranks: Sequence[int] | None = None, phase: str = "lowres"):
    """``(scale, problems)``: the volume's intensity scale and an iterator of ``ScanProblem``
    for the slices at ``ranks`` (default all), maps estimated lazily slice by slice, the
    image's phase absorbed into them as ``phase`` says (``PHASES``; ``_phase_maps``)."""
    k = prepared.kspace
    masks = sampling_masks(prepared, operator, seed)
    ranks = list(range(k.shape[0])) if ranks is None else list(ranks)
    p_recon = prepared.recon_matrix[1]
    zero_filled = {i: coils.rss(coils.centered_ifft(k[i] * masks[i])) for i in ranks}
    scale = head_median(np.stack(list(zero_filled.values()))) / FOREGROUND_MEDIAN
    if not np.isfinite(scale) or scale <= 0:
        raise DataError(f"{prepared.name}: the zero-filled image is empty (no signal)")
    reference = prepared.reference

    def problems():
        for i in ranks:
            y = k[i] * masks[i]
            calib = min(calibration_width(masks[i]), MAX_CALIBRATION)
            if calib < MIN_CALIBRATION:
                raise DataError(f"{prepared.name} slice {prepared.indices[i]}: only {calib} fully "
                                f"sampled central lines; ESPIRiT needs at least {MIN_CALIBRATION} "
                                "(sample more autocalibration lines: center_fraction)")
            maps = _phase_maps(coils.espirit_maps(y, calib), y, masks[i], calib, phase)
            op = UndersampledFourier(torch.from_numpy(masks[i]), coil_maps=torch.from_numpy(maps),
                                     sigma_y=prepared.sigma / scale, real_output=False)
            ref = None if reference is None else reference[i] / scale
            y_t = torch.from_numpy(y / scale).to(torch.complex64)[None, None]
            yield ScanProblem(prepared.indices[i], y_t, op,
                              crop_phase(zero_filled[i], p_recon) / scale, ref, calib)

    return scale, problems()


# -- reconstruction -----------------------------------------------------------------------------
def reconstruct_scan(prepared: str | Path, operator: OperatorConfig, settings: ReconstructSection,
                     prior: PriorSection, out_dir: str | Path, progress: bool = True,
                     baseline: BaselineConfig | None = None, phase: str | None = None) -> dict:
    """Reconstruct every slice of a prepared scan with one sampling (``operator``) by the
    diffusion sampler of ``settings`` or a classical ``baseline`` (its ``lam`` set), the phase
    absorbed as ``phase`` (default ``settings.kspace_phase``) says; writes
    ``recon``/``naive``/``std``/``reference`` NIfTI, ``slices.npz`` and ``summary.json`` in
    ``out_dir`` and returns what ``recon.reconstruction.reconstruct_prepared`` returns, plus
    ``has_reference`` (whether the slices can be scored) and ``scale``."""
    scan = PreparedScan.open(prepared)
    device = resolve_device(settings.device)
    if settings.num_threads is not None and device.type == "cpu":
        torch.set_num_threads(settings.num_threads)
    if baseline is not None:
        make_sampler = baseline.build
    else:
        network, diffusion = load_network(prior, device)
        network = ViewOriented(network, scan.view)
        warm_cfg = settings.warm_start and settings.warm_start.for_operator(operator)
        if warm_cfg is not None and warm_cfg.baseline.lam is None:
            raise ValueError(f"the warm start's {warm_cfg.baseline.name} has lam: null and operator "
                             f"{operator.name!r} gives none (its lam: {{{warm_cfg.baseline.name}: "
                             f"...}}); set one or choose it on validation data (tune_baseline)")
        parts = (settings.integrator.build(),
                 settings.timer.build(settings.steps, None if warm_cfg is None else warm_cfg.t0))
        guidance = settings.guidance_for(operator).build()

        def make_sampler(op: UndersampledFourier) -> CondDenoiser:  # one per slice: its maps
            warm = None if warm_cfg is None else warm_cfg.baseline.build(op).solve
            return CondDenoiser(diffusion, network, *parts, op, guidance,
                                x0_range=settings.x0_range, warm_start=warm)
    out_dir = Path(out_dir)
    n = len(scan.indices)
    shape = scan.shape
    buffer = VolumeBuffer(out_dir, scan.indices, shape)
    has_reference = scan.reference is not None
    start = time.perf_counter()
    nfe = vjp = 0
    try:
        scale, problems = scan_problems(scan, operator, settings.seed,
                                        phase=phase or settings.kspace_phase)
        with tqdm(total=n, desc=f"{scan.name} {operator.name}", unit="slice",
                  disable=None if progress else True) as bar:
            for problem in problems:
                sampler = make_sampler(problem.operator.to(device))
                gen = torch.Generator(device).manual_seed(slice_seed(settings.seed, problem.index,
                                                                      salt=2))
                with autocast(device, "fp32" if baseline is not None else settings.precision):
                    post = sampler.sample(problem.y.to(device), settings.n_samples,
                                          generator=gen, keep_samples=False)
                nfe, vjp = post.nfe, post.vjp
                p_recon = shape[1]
                stacks = {
                    "truth": (problem.reference if has_reference else np.zeros(shape))[None],
                    "naive": problem.naive[None],
                    "recon": crop_phase(post.mean.abs()[0, 0].cpu().numpy(), p_recon)[None],
                    "std": crop_phase(post.std[0, 0].cpu().numpy(), p_recon)[None]}
                buffer.write([problem.index], stacks)
                bar.update(1)
        seconds = time.perf_counter() - start
        paths = _write_outputs(buffer, scan, out_dir, scale, has_reference)
    finally:
        buffer.close()
    summary = {"volume": scan.name, "operator": operator.name,
               **method_summary(settings, operator, baseline), "nfe": nfe, "vjp": vjp,
               "n_samples": settings.n_samples, "slices": n, "seconds": seconds,
               "slices_per_s": n / seconds if seconds > 0 else float("nan"),
               "device": str(device), "has_reference": has_reference, "scale": scale}
    summary_path = atomic_write_bytes(out_dir / "summary.json", json.dumps(summary, indent=1).encode())
    return {**paths, **summary, "summary": str(summary_path)}


def _write_outputs(buffer: VolumeBuffer, scan: PreparedScan, out_dir: Path, scale: float,
                   has_reference: bool) -> dict[str, str]:
    """``recon``/``naive``/``std`` (and ``reference``) NIfTI ``(R, P, S)`` with the header's
    affine, in the file's units; ``slices.npz`` of the stacks in the prior's units, turned to
    the viewer layout (``ViewTransform``) for the figures."""
    stacks = {name: np.asarray(a) for name, a in buffer.arrays.items()}
    names = ("recon", "naive", "std") + (("truth",) if has_reference else ())
    paths = {}
    for name in names:
        volume = np.moveaxis(stacks[name], 0, -1) * scale
        file = "reference" if name == "truth" else name
        paths[file] = str(write_nifti(volume, out_dir / f"{file}.nii.gz", affine=scan.affine))
    npz = out_dir / "slices.npz"  # in the viewer layout, for figures (metrics do not mind)
    viewed = {k: scan.view.apply(torch.from_numpy(stacks[k])).numpy() for k in STACKS}
    with atomic_path(npz, suffix=".npz") as tmp:
        np.savez_compressed(tmp, indices=np.asarray(scan.indices), **viewed)
    paths["stacks"] = str(npz)
    return paths


def tune_scans(prepared: Sequence[str | Path], operator: OperatorConfig, baseline: BaselineConfig,
               seed: int = 0) -> dict:
    """``recon.reconstruction.tune_baseline`` for raw k-space validation volumes: the
    baseline's ``lam`` with the best mean PSNR against each volume's reference, under the same
    sampling as the test volumes."""
    from recon.baselines import select_lambda
    from recon.metrics import psnr

    problems = []
    for p in prepared:
        scan = PreparedScan.open(p)
        if scan.reference is None:
            continue
        _, slices = scan_problems(scan, operator, seed)
        problems += [(pr, baseline.build(pr.operator)) for pr in slices]
    if not problems:
        raise ValueError(f"no validation k-space with a reference to choose lam for "
                         f"{baseline.name!r} on")

    def mean_psnr(lam: float) -> float:
        scores = []
        for pr, solver in problems:
            x = crop_phase(solver.solve(pr.y, lam).abs()[0, 0].numpy(), pr.reference.shape[-1])
            scores.append(float(psnr(torch.from_numpy(x)[None, None].double(),
                                     torch.from_numpy(pr.reference)[None, None].double())))
        return sum(scores) / len(scores)

    lam, scores = select_lambda(mean_psnr)
    return {"lam": lam, "scores": {f"{k:.4g}": v for k, v in scores.items()},
            "slices": len(problems), "volumes": len(prepared)}
