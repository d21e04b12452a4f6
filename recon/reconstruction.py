r"""Posterior reconstruction of one prepared volume with one operator, slab by slab.

A volume ``(S, H, W)`` is cut into slabs of consecutive slices (``slab_ranges``), each
reconstructed on its own (``reconstruct_slab``: in this process, or as a task on any worker)
``batch_size`` slices at a time: each slice ``x`` is measured ``y = A x + sigma_y n`` (noise
seeded per slice, so neither ``y`` nor the sample depends on the batch or slab it falls in), the
naive baseline is ``A^+ y`` (``operator.pseudo_inverse``), and ``n_samples`` posterior samples
``x0 ~ p(x0 | y)`` are drawn with a ``CondDenoiser``; the reconstruction is their mean, the
uncertainty their pixel-wise std. A classical baseline (``recon.baselines``: TV, L1-wavelet)
takes the sampler's place on the same ``y``; its ``lam`` is chosen on validation volumes by
``tune_baseline``. ``assemble_volume`` turns the slab files into NIfTI outputs on the source's
grid (``recon.volumes.write_outputs``), one output at a time.

The config sections build the parts (``OperatorConfig.build``, ``GuidanceConfig.build``, ...);
``load_network`` loads the prior a ``PriorSection`` names.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from recon.baselines import select_lambda
from recon.cond_denoiser import CondDenoiser
from recon.config import BaselineConfig, OperatorConfig, PriorSection, ReconstructSection
from recon.data.nifti import atomic_path, atomic_write_bytes
from recon.guidance import Guidance
from recon.integrator import Integrator
from recon.metrics import psnr
from recon.network import EpsNetwork, autocast, load_prior, resolve_device
from recon.operators import Operator
from recon.timer import Timer
from recon.volumes import STACKS, PreparedVolume, write_outputs

_NETWORKS: dict[tuple, tuple] = {}


def load_network(prior: PriorSection, device: str | torch.device = "auto"):
    """``(network, diffusion)`` of ``prior.checkpoint``; with ``prior.config`` the checkpoint
    must match that network and diffusion config (``CheckpointError`` otherwise). Kept per
    process for the last checkpoint (keyed on its path, size and mtime), so the slabs a worker
    runs load it once."""
    device = resolve_device(device)
    st = Path(prior.checkpoint).stat() if Path(prior.checkpoint).is_file() else None
    key = (prior.model_dump_json(), str(device), st and (st.st_size, st.st_mtime_ns))
    if key not in _NETWORKS:
        expected = prior.expected()
        network, diffusion, _ = load_prior(
            prior.checkpoint, device,
            network_cfg=None if expected is None else expected.network,
            diffusion_cfg=None if expected is None else expected.diffusion, weights=prior.weights)
        _NETWORKS.clear()
        _NETWORKS[key] = (network, diffusion)
    return _NETWORKS[key]


# -- one batch of slices ------------------------------------------------------------------------
@dataclass
class SliceResult:
    """Reconstruction of a batch of slices (arrays ``(B, H, W)`` float32 on the host)."""

    indices: list[int]
    truth: np.ndarray
    naive: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    nfe: int
    seconds: float

    @property
    def stacks(self) -> dict[str, np.ndarray]:
        """The arrays by ``recon.volumes.STACKS`` name."""
        return {"truth": self.truth, "naive": self.naive, "recon": self.mean, "std": self.std}


def slice_seed(seed: int, index: int, salt: int = 0) -> int:
    """A per-slice seed, stable whatever the batching."""
    return (seed * 1_000_003 + index * 7_919 + salt * 104_729) % (2**63 - 1)


def measure_slices(operator: Operator, x: Tensor, indices: Sequence[int], seed: int) -> Tensor:
    """``y = A x + sigma_y n`` for each slice ``(B, 1, H, W)``, the noise drawn from the slice's
    own seed (``slice_seed(seed, index, salt=1)``), so ``y`` does not depend on the batching nor
    on the method that reconstructs it."""
    ys = [operator.measure(x[i: i + 1], generator=torch.Generator(x.device).manual_seed(
        slice_seed(seed, idx, salt=1))) for i, idx in enumerate(indices)]
    return torch.cat(ys)


class SliceReconstructor:
    """Measure and reconstruct batches of slices ``(B, 1, H, W)`` with a fixed operator.

    ``sampler`` has ``sample(y, n_samples, generator, progress, keep_samples) -> Posterior``
    and ``nfe``: a ``CondDenoiser`` (``SliceReconstructor.diffusion``) or a classical
    ``recon.baselines.Baseline``. ``measure_seed`` fixes the measurement noise (per slice),
    ``seed`` the sampler's noise, so two reconstructors that differ only in the method see the
    same ``y``.
    """

    def __init__(self, operator: Operator, sampler, n_samples: int = 2, seed: int = 0,
                 measure_seed: int | None = None, device: str | torch.device = "cpu",
                 progress: bool = False, precision: str = "fp32"):
        self.device = torch.device(device)
        self.precision = precision
        self.operator = operator.to(self.device)
        self.sampler = sampler
        self.n_samples, self.seed = int(n_samples), int(seed)
        self.measure_seed = self.seed if measure_seed is None else int(measure_seed)
        self.progress = progress

    @classmethod
    def diffusion(cls, network: EpsNetwork, diffusion, operator: Operator, guidance: Guidance,
                  integrator: Integrator, timer: Timer,
                  x0_range: tuple[float, float] | None = None, warm_start=None,
                  **kwargs) -> SliceReconstructor:
        """Posterior sampling with the prior ``network`` (a ``CondDenoiser``)."""
        device = torch.device(kwargs.get("device", "cpu"))
        operator = operator.to(device)
        sampler = CondDenoiser(diffusion, network, integrator, timer, operator, guidance,
                               x0_range=x0_range, warm_start=warm_start)
        return cls(operator, sampler, **kwargs)

    @property
    def nfe(self) -> int:
        return self.sampler.nfe

    def measure(self, x: Tensor, indices: Sequence[int]) -> Tensor:
        """``y`` for each slice (``measure_slices``)."""
        return measure_slices(self.operator, x, indices, self.measure_seed)

    def __call__(self, x: Tensor, indices: Sequence[int]) -> SliceResult:
        start = time.perf_counter()
        x = x.to(self.device, torch.float32)
        if x.ndim == 3:
            x = x[:, None]
        y = self.measure(x, indices)
        with torch.no_grad():
            naive = self.operator.pseudo_inverse(y)
        naive = naive.real if naive.is_complex() else naive
        gen = torch.Generator(self.device).manual_seed(slice_seed(self.seed, int(indices[0]), salt=2))
        with autocast(self.device, self.precision):
            post = self.sampler.sample(y, self.n_samples, generator=gen, progress=self.progress,
                                       keep_samples=False)

        def host(t: Tensor) -> np.ndarray:
            return t[:, 0].detach().float().cpu().numpy()

        return SliceResult(list(map(int, indices)), host(x), host(naive), host(post.mean),
                           host(post.std), post.nfe, time.perf_counter() - start)


def stream(batches: Iterable[tuple[Sequence[int], Tensor]],
           reconstructor: SliceReconstructor) -> Iterator[SliceResult]:
    """Reconstruct ``(indices, slices)`` batches one at a time (lazy: memory ~ one batch)."""
    for indices, x in batches:
        yield reconstructor(x, indices)


def batched(volume_slices: Callable[[Sequence[int]], Tensor], indices: Sequence[int],
            batch_size: int) -> Iterator[tuple[list[int], Tensor]]:
    """``(indices, volume_slices(indices))`` for consecutive chunks of ``batch_size`` indices."""
    indices = list(indices)
    for i in range(0, len(indices), batch_size):
        chunk = indices[i: i + batch_size]
        yield chunk, volume_slices(chunk)


def method_summary(settings: ReconstructSection, operator: OperatorConfig,
                   baseline: BaselineConfig | None = None) -> dict:
    """How a method is named in summaries and tables: ``method``, ``label``, ``guidance``,
    ``integrator``, ``steps`` (a baseline's iterations)."""
    if baseline is not None:
        return {"method": baseline.name, "label": baseline.label, "guidance": "-",
                "integrator": "-", "steps": baseline.iterations}
    return {"method": "diffusion", "guidance": settings.guidance_for(operator).name,
            "label": settings.label(operator), "integrator": settings.integrator.label,
            "steps": settings.steps}


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


def slab_ranges(n: int, slab_slices: int | None) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of at most ``slab_slices`` consecutive slice positions covering
    ``0..n-1`` (one range for None): the slabs a volume is cut into."""
    size = n if not slab_slices else int(slab_slices)
    return [(i, min(i + size, n)) for i in range(0, n, max(size, 1))]


def _reconstructor(vol: PreparedVolume, operator: OperatorConfig, settings: ReconstructSection,
                   prior: PriorSection, baseline: BaselineConfig | None,
                   device: torch.device) -> SliceReconstructor:
    op = operator.build(vol.shape, settings.sigma_y, settings.seed)
    common = {"n_samples": settings.n_samples, "seed": settings.seed, "device": device}
    if baseline is not None:
        return SliceReconstructor(op, baseline.build(op), **common)
    network, diffusion = load_network(prior, device)
    common["precision"] = settings.precision
    warm, t_max = None, None
    if settings.warm_start is not None:
        start = settings.warm_start.for_operator(operator)
        if start.baseline.lam is None:
            raise ValueError(f"the warm start's {start.baseline.name} has lam: null and operator "
                             f"{operator.name!r} gives none (its lam: {{{start.baseline.name}: "
                             f"...}}); set one or choose it on validation data (tune_baseline)")
        warm, t_max = start.baseline.build(op.to(device)).solve, start.t0
    return SliceReconstructor.diffusion(
        network, diffusion, op, settings.guidance_for(operator).build(),
        settings.integrator.build(), settings.timer.build(settings.steps, t_max),
        x0_range=settings.x0_range, warm_start=warm, **common)


def reconstruct_slab(prepared: str | Path, operator: OperatorConfig, settings: ReconstructSection,
                     prior: PriorSection, out_file: str | Path, span: Sequence[int] | None = None,
                     progress: bool = True, baseline: BaselineConfig | None = None) -> dict:
    """Reconstruct the slices at positions ``span = [start, stop)`` (default: all) of a prepared
    volume with one operator, ``batch_size`` at a time, by the diffusion sampler of ``settings``
    or a classical ``baseline``; their ``truth``/``naive``/``recon``/``std`` stacks and
    ``indices`` go to ``out_file`` (``.npz``, written atomically).

    A slab's result does not depend on the other slabs (measurement and sampler noise are
    seeded per slice), so slabs may run in any order, anywhere. Returns ``{"slab", "span",
    "slices", "nfe", "vjp", "seconds", "started", "finished", "host", "pid", "device"}``
    (``started``/``finished``: wall-clock epoch seconds, to see what ran concurrently)."""
    started = time.time()
    vol = PreparedVolume.open(prepared)
    start, stop = span if span is not None else (0, len(vol.indices))
    if not 0 <= start < stop <= len(vol.indices):
        raise ValueError(f"slab [{start}, {stop}) is outside the {len(vol.indices)} slices of "
                         f"{vol.name}")
    device = resolve_device(settings.device)
    if settings.num_threads is not None and device.type == "cpu":
        torch.set_num_threads(settings.num_threads)
    reconstructor = _reconstructor(vol, operator, settings, prior, baseline, device)
    indices = vol.indices[start:stop]
    rank = {idx: r for r, idx in enumerate(vol.indices)}
    parts: dict[str, list[np.ndarray]] = {name: [] for name in STACKS}
    t0 = time.perf_counter()
    batches = batched(lambda idx: vol.read([rank[i] for i in idx]), indices, settings.batch_size)
    # disable=None: no bar when stderr is not a terminal (no \r updates piling up in logs)
    with tqdm(total=len(indices), desc=f"{vol.name} {operator.name} [{start}:{stop}]",
              unit="slice", disable=None if progress else True) as bar:
        for result in stream(batches, reconstructor):
            for name, array in result.stacks.items():
                parts[name].append(array)
            bar.update(len(result.indices))
    seconds = time.perf_counter() - t0
    with atomic_path(out_file, suffix=".npz") as tmp:
        np.savez(tmp, indices=np.asarray(indices), **{k: np.concatenate(v) for k, v in parts.items()})
    return {"slab": str(out_file), "span": [int(start), int(stop)], "slices": len(indices),
            "nfe": reconstructor.nfe, "vjp": reconstructor.sampler.vjp, "seconds": seconds,
            "started": started, "finished": time.time(), "host": socket.gethostname(),
            "pid": os.getpid(), "device": str(device)}


def assemble_volume(prepared: str | Path, slabs: Sequence[dict], operator: OperatorConfig,
                    settings: ReconstructSection, out_dir: str | Path,
                    baseline: BaselineConfig | None = None) -> dict:
    """A volume's outputs from its slabs (``reconstruct_slab`` results covering every slice
    once): NIfTI ``recon``/``naive``/``std`` and ``slices.npz`` (``write_outputs``: each file
    atomic, each stack read from the slab files when it is written, so memory holds one stack
    and its native-grid copy) and ``summary.json``. ``seconds`` is the slabs' summed compute time;
    ``slab_runs`` says where and when each slab ran. Returns the output paths and the summary."""
    vol = PreparedVolume.open(prepared)
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
    paths = write_outputs(stack, vol, out_dir)
    seconds = sum(s["seconds"] for s in slabs)
    summary = {"volume": vol.name, "operator": operator.name,
               **method_summary(settings, operator, baseline), "nfe": slabs[0]["nfe"],
               "vjp": slabs[0]["vjp"], "n_samples": settings.n_samples, "slices": n,
               "seconds": seconds, "slices_per_s": n / seconds if seconds > 0 else float("nan"),
               "device": slabs[0]["device"], "slabs": len(slabs),
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
    and ``method``, ``label``, ``nfe``, ``vjp``, ``seconds``, ``slices``, ``slices_per_s``;
    also written to ``summary.json``."""
    n = len(PreparedVolume.open(prepared).indices)
    slabs = [reconstruct_slab(prepared, operator, settings, prior, slab_file(out_dir, span), span,
                              progress=progress, baseline=baseline)
             for span in slab_ranges(n, settings.slab_slices)]
    return assemble_volume(prepared, slabs, operator, settings, out_dir, baseline)


def slab_file(out_dir: str | Path, span: Sequence[int]) -> Path:
    """Where the slab ``[start, stop)`` of a volume's reconstruction in ``out_dir`` is kept."""
    return Path(out_dir) / "slabs" / f"{span[0]:05d}-{span[1]:05d}.npz"


def tune_baseline(prepared: Sequence[str | Path], operator: OperatorConfig, baseline: BaselineConfig,
                  sigma_y: float, seed: int = 0) -> dict:
    """Choose a baseline's ``lam`` on validation volumes (``recon.baselines.select_lambda`` over
    ``LAMBDA_GRID``): every slice of ``prepared`` is measured as a test slice would be (same
    operator config, ``sigma_y`` and ``seed``) and reconstructed for each candidate; the best mean
    PSNR wins. Returns ``{"lam", "scores": {lam: mean PSNR}, "slices", "volumes"}``."""
    problems = []
    for p in prepared:
        vol = PreparedVolume.open(p)
        op = operator.build(vol.shape, sigma_y, seed)
        x = vol.read(list(range(len(vol.indices))))
        problems.append((x, measure_slices(op, x, vol.indices, seed), baseline.build(op)))
    if not problems:
        raise ValueError(f"no validation volume to choose lam for {baseline.name!r} on")

    def mean_psnr(lam: float) -> float:
        scores = [v for x, y, solver in problems for v in psnr(solver.solve(y, lam), x).tolist()]
        return sum(scores) / len(scores)

    lam, scores = select_lambda(mean_psnr)
    return {"lam": lam, "scores": {f"{k:.4g}": v for k, v in scores.items()},
            "slices": sum(x.shape[0] for x, _, _ in problems), "volumes": len(problems)}
