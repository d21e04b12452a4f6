r"""Posterior reconstruction of one prepared volume with one operator, slab by slab.

A volume ``(S, H, W)`` (image slices, ``recon.reconstruct.volumes``, or raw k-space,
``recon.reconstruct.raw``) is cut into slabs of consecutive slices (``slab_ranges``), each
reconstructed on its own (``reconstruct_slab``: in this process, or as a task on any worker):

- slice by slice, ``batch_size`` image slices (a scan: one) at a time
  (``recon.reconstruct.slices.SliceReconstructor``: ``y = A x + sigma_y n`` with noise seeded per
  slice, ``n_samples`` posterior samples from a ``CondDenoiser``, their mean the
  reconstruction and their std the uncertainty, ``A^+ y`` the naive baseline);
- or as one volume with a halo of slices on each side (``recon.reconstruct.coupling``): for the volume
  operators (``kykz_fourier``, ``slice_drop``), ``reconstruct.coupling: tv_z`` and the 3-D
  baseline ``tv3d``.

A classical baseline (``recon.classical.baselines``: TV, L1-wavelet, 3-D TV) takes the sampler's place on
the same ``y``; its ``lam`` is chosen on validation volumes by ``tune_baseline``.
``assemble_volume`` turns the slab files into NIfTI outputs on the source's grid
(``prepared.write_outputs``), one output at a time. The config sections build the parts
(``OperatorConfig.build``, ``GuidanceConfig.build``, ...).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from recon.allocator import keep_freed_memory
from recon.classical.baselines import select_lambda
from recon.config import BaselineConfig, OperatorConfig, PriorSection, ReconstructSection
from recon.data.nifti import atomic_path, atomic_write_bytes
from recon.metrics import psnr
from recon.prior.network import resolve_device
from recon.reconstruct import raw
from recon.reconstruct.coupling import (
    SlabReconstructor,
    SliceStack,
    halo_span,
    is_volume_method,
    measure_volume,
)
from recon.reconstruct.scans import PreparedScan, open_prepared
from recon.reconstruct.slices import (  # noqa: F401  (re-exported: the slice-batch API)
    SliceReconstructor,
    SliceResult,
    batched,
    load_network,
    measure_slices,
    slice_seed,
    stream,
)
from recon.reconstruct.volumes import STACKS, PreparedVolume, write_outputs
from recon.registry import WHOLE_VOLUME_OPERATORS
from recon.sampling.adaptation import Adapter
from recon.sampling.cond_denoiser import CondDenoiser


def batch_size_for(free_bytes: int, slice_shape: Sequence[int], n_samples: int,
                   bytes_per_pixel: float, fraction: float = 0.8, limit: int = 1024) -> int:
    """The most slices per batch whose ``n_samples`` chains each fit in ``fraction`` of
    ``free_bytes``, given the sampler's peak memory per chain pixel (measured on the device:
    ``benchmarks/gpu.py``); at least 1, at most ``limit``."""
    if not (free_bytes > 0 and bytes_per_pixel > 0 and 0 < fraction <= 1 and n_samples >= 1):
        raise ValueError(f"need free_bytes > 0, bytes_per_pixel > 0, 0 < fraction <= 1 and "
                         f"n_samples >= 1; got {free_bytes}, {bytes_per_pixel}, {fraction}, "
                         f"{n_samples}")
    pixels = int(np.prod([int(n) for n in slice_shape]))
    per_slice = n_samples * pixels * bytes_per_pixel
    return int(max(1, min(limit, (fraction * free_bytes) // per_slice)))


def slab_ranges(n: int, slab_slices: int | None,
                operator: OperatorConfig | None = None) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of at most ``slab_slices`` consecutive slice positions covering
    ``0..n-1`` (one range for None, or for an ``operator`` whose every measurement mixes all
    slices, ``recon.registry.WHOLE_VOLUME_OPERATORS``): the slabs a volume is cut into."""
    whole = operator is not None and operator.name in WHOLE_VOLUME_OPERATORS
    size = n if not slab_slices or whole else int(slab_slices)
    return [(i, min(i + size, n)) for i in range(0, n, max(size, 1))]


def sampler_for(operator: OperatorConfig, settings: ReconstructSection, prior: PriorSection,
                baseline: BaselineConfig | None, device: torch.device, wrap=None):
    """``op -> sampler`` for operators on ``device``: the classical ``baseline``, or the
    diffusion sampler of ``settings`` with the prior (``load_network``) wrapped by ``wrap``
    (``SliceStack`` for a slab solved as one volume, ``ViewOriented`` for a raw scan); the
    sampler's ``x0_range`` is ``settings``' unless given (``make(op, x0_range)``). With
    ``settings.adapt`` every sampler ``make`` returns shares one ``Adapter`` (a copy of the
    prior fitted to the measurements it samples, slice after slice)."""
    if baseline is not None:
        return lambda op, x0_range=None: baseline.build(op)
    network, diffusion = load_network(prior, device)
    start = settings.warm_start_for(operator)
    start = start and start.for_operator(operator)
    if start is not None and start.baseline.lam is None:
        raise ValueError(f"the warm start's {start.baseline.name} has lam: null and operator "
                         f"{operator.name!r} gives none (its lam: {{{start.baseline.name}: "
                         f"...}}); set one or choose it on validation data (tune_baseline)")
    coupling, adapt = settings.coupling, settings.adapt
    guidance = settings.guidance_for(operator).build(
        **({"tv_z": coupling.weight} if coupling.name == "tv_z" else {}))
    adapter = None if adapt.name == "none" else Adapter(network, adapt.lr, adapt.iterations,
                                                        adapt.t_max)
    network = network if adapter is None else adapter  # one adapted copy for the slab
    parts = (network if wrap is None else wrap(network), settings.integrator.build(),
             settings.timer.build(settings.steps, None if start is None else start.t0))

    def make(op, x0_range=settings.x0_range):
        warm = None if start is None else start.baseline.build(op).solve
        return CondDenoiser(diffusion, *parts, op, guidance, x0_range=x0_range, warm_start=warm,
                            adapter=adapter)
    return make


def image_slab(vol: PreparedVolume, operator: OperatorConfig, settings: ReconstructSection,
               baseline: BaselineConfig | None, samplers, device: torch.device, start: int,
               stop: int):
    """``(reconstructor, batches)`` of ``reconstruct_slab`` for the slices ``[start, stop)`` of
    an image volume: ``batch_size`` slices at a time (``SliceReconstructor``), or for a volume
    method the span and its halo as one volume (``recon.reconstruct.coupling.SlabReconstructor``)."""
    volume = is_volume_method(operator, settings, baseline)
    lo, hi = halo_span(start, stop, len(vol.indices), settings.coupling.halo) if volume \
        else (start, stop)
    slab = vol.indices[lo:hi]
    op = operator.build_for(vol.shape, slab, settings.sigma_y, settings.seed)
    sampler = samplers(SliceStack if volume else None)(op.to(device))
    kwargs = {"n_samples": settings.n_samples, "seed": settings.seed, "device": device,
              "precision": "fp32" if baseline is not None else settings.precision}
    if volume:
        return (SlabReconstructor(op, sampler, **kwargs),
                iter([(slab, vol.read(range(lo, hi)))]))
    rank = {idx: r for r, idx in enumerate(vol.indices)}
    return (SliceReconstructor(op, sampler, **kwargs),
            batched(lambda idx: vol.read([rank[i] for i in idx]), slab, settings.batch_size))


def reconstruct_slab(prepared: str | Path, operator: OperatorConfig, settings: ReconstructSection,
                     prior: PriorSection, out_file: str | Path, span: Sequence[int] | None = None,
                     progress: bool = True, baseline: BaselineConfig | None = None) -> dict:
    """Reconstruct the slices at positions ``span = [start, stop)`` (default: all) of a prepared
    image volume or raw scan (its ``KINDS`` entry: ``image_slab``, ``recon.reconstruct.raw.scan_slab``) with
    one operator, by the diffusion sampler of ``settings`` or a classical ``baseline``; their
    ``truth``/``naive``/``recon``/``std`` stacks and ``indices`` go to ``out_file`` (``.npz``,
    written atomically). A slab's result does not depend on the other slabs (measurement and
    sampler noise are seeded per slice), so slabs may run in any order, anywhere. Returns
    ``{"slab", "span", "slices", "nfe", "vjp", "seconds", "started", "finished", "host", "pid",
    "device"}`` (``started``/``finished``: wall-clock epoch seconds, to see what ran
    concurrently)."""
    started = time.time()
    vol = open_prepared(prepared)
    n = len(vol.indices)
    start, stop = span if span is not None else (0, n)
    if not 0 <= start < stop <= n:
        raise ValueError(f"slab [{start}, {stop}) is outside the {n} slices of {vol.name}")
    if operator.name in WHOLE_VOLUME_OPERATORS and (start, stop) != (0, n):
        raise ValueError(f"operator {operator.name!r} mixes every slice of a volume in each "
                         f"measurement: it reconstructs the whole volume, not slab [{start}, {stop})")
    device = resolve_device(settings.device)
    if device.type == "cpu":
        keep_freed_memory()  # no page faults on every large tensor (recon.allocator)
        if settings.num_threads is not None:
            torch.set_num_threads(settings.num_threads)
    indices = vol.indices[start:stop]
    samplers = partial(sampler_for, operator, settings, prior, baseline, device)
    reconstructor, batches = KINDS[type(vol)].slab(vol, operator, settings, baseline, samplers,
                                                   device, start, stop)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in STACKS}
    t0 = time.perf_counter()
    kept = set(indices)
    # disable=None: no bar when stderr is not a terminal (no \r updates piling up in logs)
    with tqdm(total=len(indices), desc=f"{vol.name} {operator.name} [{start}:{stop}]",
              unit="slice", disable=None if progress else True) as bar:
        for result in stream(batches, reconstructor):
            keep = [i for i, idx in enumerate(result.indices) if idx in kept]  # halo dropped
            for name, array in result.stacks.items():
                parts[name].append(array[keep])
            bar.update(len(keep))
    seconds = time.perf_counter() - t0
    with atomic_path(out_file, suffix=".npz") as tmp:
        np.savez(tmp, indices=np.asarray(indices), **{k: np.concatenate(v) for k, v in parts.items()})
    adapted = _save_adapter(getattr(reconstructor.sampler, "adapter", None), Path(out_file))
    return {"slab": str(out_file), "span": [int(start), int(stop)], "slices": len(indices),
            "nfe": reconstructor.sampler.nfe, "vjp": reconstructor.sampler.vjp, "seconds": seconds,
            "started": started, "finished": time.time(), "host": socket.gethostname(),
            "pid": os.getpid(), "device": str(device), **adapted}


def _save_adapter(adapter: Adapter | None, slab_file: Path) -> dict:
    """The adapted parameters of a slab beside its file (``<slab>.adapter.pt``: ``state``,
    ``seconds``, ``updates``, ``losses``), and what the slab's result says of them."""
    if adapter is None:
        return {}
    path = slab_file.with_suffix(".adapter.pt")
    record = {"state": adapter.state(), "seconds": adapter.seconds, "updates": adapter.updates,
              "losses": adapter.losses}
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(record, tmp)
    return {"adapter": str(path), "adapt_seconds": adapter.seconds}


def assemble_volume(prepared: str | Path, slabs: Sequence[dict], operator: OperatorConfig,
                    settings: ReconstructSection, out_dir: str | Path,
                    baseline: BaselineConfig | None = None) -> dict:
    """A volume's outputs from its slabs (``reconstruct_slab`` results covering every slice
    once): NIfTI ``recon``/``naive``/``std`` and ``slices.npz`` (``write_outputs``: each file
    atomic, each stack read from the slab files when it is written, so memory holds one stack
    and its native-grid copy) and ``summary.json``. ``seconds`` is the slabs' summed compute time;
    ``slab_runs`` says where and when each slab ran. Returns the output paths and the summary."""
    vol = open_prepared(prepared)
    n = len(vol.indices)
    slabs = sorted(slabs, key=lambda s: s["span"][0])
    covered = [i for s in slabs for i in range(*s["span"])]
    if covered != list(range(n)):
        raise ValueError(f"the slabs of {vol.name} do not cover its {n} slices exactly once: "
                         f"{[s['span'] for s in slabs]}")

    def stack(name: str) -> np.ndarray:
        out = np.empty((n, *vol.shape), np.float32)
        for s in slabs:
            start, stop = s["span"]
            with np.load(s["slab"]) as z:
                if z["indices"].tolist() != vol.indices[start:stop]:
                    raise ValueError(f"{s['slab']} holds slices {z['indices'].tolist()}, not "
                                     f"{vol.indices[start:stop]} of {vol.name}")
                out[start:stop] = z[name]
        return out

    out_dir = Path(out_dir)
    paths, extra = KINDS[type(vol)].write_outputs(vol, stack, out_dir, operator, settings)
    seconds = sum(s["seconds"] for s in slabs)
    adapters = [s["adapter"] for s in slabs if s.get("adapter")]
    if adapters:
        extra = {**extra, "adapters": adapters,
                 "adapt_seconds": sum(s["adapt_seconds"] for s in slabs if s.get("adapter"))}
    method = {"method": "diffusion", "guidance": settings.guidance_for(operator).name,
              "label": settings.label(operator), "integrator": settings.integrator.label,
              "steps": settings.steps} if baseline is None else {
        "method": baseline.name, "label": baseline.label, "guidance": "-", "integrator": "-",
        "steps": baseline.iterations}  # a baseline's steps: its iterations
    summary = {"volume": vol.name, "operator": operator.name, **method, "nfe": slabs[0]["nfe"],
               "vjp": slabs[0]["vjp"], "n_samples": settings.n_samples, "slices": n,
               "seconds": seconds, "slices_per_s": n / seconds if seconds > 0 else float("nan"),
               "device": slabs[0]["device"], "slabs": len(slabs), **extra,
               "workers": len({(s["host"], s["pid"]) for s in slabs}),
               "slab_runs": [{k: s[k] for k in ("span", "host", "pid", "started", "finished")}
                             for s in slabs]}
    summary_path = atomic_write_bytes(out_dir / "summary.json", json.dumps(summary, indent=1).encode())
    return {**paths, **summary, "summary": str(summary_path)}


def reconstruct_prepared(prepared: str | Path, operator: OperatorConfig,
                         settings: ReconstructSection, prior: PriorSection, out_dir: str | Path,
                         progress: bool = True, baseline: BaselineConfig | None = None) -> dict:
    """Reconstruct every slice of a prepared volume with one operator in this process: slab
    after slab (``settings.slab_slices``; ``reconstruct_slab``, files in ``out_dir/slabs``),
    then ``assemble_volume``. The method is the diffusion sampler of ``settings`` or, with
    ``baseline`` (its ``lam`` set, e.g. by ``tune_baseline``), that classical reconstruction of
    the same ``y``; ``settings``' own ``operators`` list is ignored. Returns the output paths
    and the summary (``method``, ``label``, ``nfe``, ``vjp``, ``seconds``, ``slices``, ...)."""
    n = len(open_prepared(prepared).indices)
    slabs = [reconstruct_slab(prepared, operator, settings, prior, slab_file(out_dir, span), span,
                              progress=progress, baseline=baseline)
             for span in slab_ranges(n, settings.slab_slices, operator)]
    return assemble_volume(prepared, slabs, operator, settings, out_dir, baseline)


def slab_file(out_dir: str | Path, span: Sequence[int]) -> Path:
    """Where the slab ``[start, stop)`` of a volume's reconstruction in ``out_dir`` is kept."""
    return Path(out_dir) / "slabs" / f"{span[0]:05d}-{span[1]:05d}.npz"


def image_scorers(vol: PreparedVolume, operator: OperatorConfig, baseline: BaselineConfig,
                  sigma_y: float, seed: int) -> list:
    """For ``tune_baseline``: ``lam -> [PSNR per slice]`` of a volume, measured as a test slice
    would be (a volume method: measured and solved as one volume, one PSNR)."""
    x = vol.read(list(range(len(vol.indices))))
    op = operator.build_for(vol.shape, vol.indices, sigma_y, seed)
    if is_volume_method(operator, None, baseline):
        x = x.reshape(1, len(vol.indices), *vol.shape)
        y = measure_volume(op, x, vol.indices, seed)
    else:
        y = measure_slices(op, x, vol.indices, seed)
    solver = baseline.build(op)
    return [lambda lam: psnr(solver.solve(y, lam), x).tolist()]


def tune_baseline(prepared: Sequence[str | Path], operator: OperatorConfig, baseline: BaselineConfig,
                  sigma_y: float, seed: int = 0) -> dict:
    """Choose a baseline's ``lam`` on validation volumes or scans (``recon.classical.baselines.select_lambda``
    over ``LAMBDA_GRID``): every slice is measured as a test slice would be (same operator config,
    ``sigma_y`` and ``seed``; a scan's sampling as its test twin's, scored against its reference)
    and reconstructed for each candidate (``prepared.scorers``); the best mean PSNR wins.
    Returns ``{"lam", "scores": {lam: mean PSNR}, "slices", "volumes"}``."""
    scorers = [s for vol in map(open_prepared, prepared)
               for s in KINDS[type(vol)].scorers(vol, operator, baseline, sigma_y, seed)]
    if not scorers:
        raise ValueError(f"no validation volume (k-space: with a reference) to choose lam for "
                         f"{baseline.name!r} on")

    def mean_psnr(lam: float) -> float:
        scores = [v for score in scorers for v in score(lam)]
        return sum(scores) / len(scores)

    lam, scores = select_lambda(mean_psnr)
    return {"lam": lam, "scores": {f"{k:.4g}": v for k, v in scores.items()},
            "slices": sum(len(open_prepared(p).indices) for p in prepared),
            "volumes": len(prepared)}


class Kind(NamedTuple):  # what reconstructs a kind of prepared folder (``KINDS``)
    slab: Callable  # (vol, operator, settings, baseline, samplers, device, start, stop) -> batches
    write_outputs: Callable  # (vol, stack, out_dir, operator, settings) -> (paths, summary)
    scorers: Callable  # (vol, operator, baseline, sigma_y, seed) -> [lam -> [PSNR]]


KINDS = {PreparedVolume: Kind(image_slab, lambda vol, stack, out_dir, *_: (
             write_outputs(stack, vol, out_dir), {}), image_scorers),
         PreparedScan: Kind(raw.scan_slab, raw.write_scan_outputs, raw.scan_scorers)}
