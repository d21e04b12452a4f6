r"""Slice-batched, streaming posterior reconstruction of one prepared volume with one operator.

A volume ``(S, H, W)`` is processed ``batch_size`` slices at a time: each slice ``x`` is measured
``y = A x + sigma_y n`` (noise seeded per slice, so the measurement of a slice does not depend
on the batch it falls in), the naive baseline is ``A^+ y`` (``operator.pseudo_inverse``), and
``n_samples`` posterior samples ``x0 ~ p(x0 | y)`` are drawn with a ``CondDenoiser``; the
reconstruction is their mean, the uncertainty their pixel-wise std. A classical baseline
(``recon.baselines``: TV, L1-wavelet) takes the sampler's place on the same ``y``; its ``lam``
is chosen on validation volumes by ``tune_baseline``. Only one batch is in memory
at a time: results stream into a ``recon.volumes.VolumeBuffer`` and become NIfTI files at the
end (``recon.volumes.write_outputs``).

The config sections build the parts (``OperatorConfig.build``, ``GuidanceConfig.build``, ...);
``load_network`` loads the prior a ``PriorSection`` names.
"""

from __future__ import annotations

import json
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
from recon.data.nifti import atomic_write_bytes
from recon.guidance import Guidance
from recon.integrator import Integrator
from recon.metrics import psnr
from recon.network import EpsNetwork, load_prior, resolve_device
from recon.operators import Operator
from recon.timer import Timer
from recon.volumes import PreparedVolume, VolumeBuffer, write_outputs


def load_network(prior: PriorSection, device: str | torch.device = "auto"):
    """``(network, diffusion)`` of ``prior.checkpoint``; with ``prior.config`` the checkpoint
    must match that network and diffusion config (``CheckpointError`` otherwise)."""
    expected = prior.expected()
    network, diffusion, _ = load_prior(
        prior.checkpoint, resolve_device(device),
        network_cfg=None if expected is None else expected.network,
        diffusion_cfg=None if expected is None else expected.diffusion, weights=prior.weights)
    return network, diffusion


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
                 progress: bool = False):
        self.device = torch.device(device)
        self.operator = operator.to(self.device)
        self.sampler = sampler
        self.n_samples, self.seed = int(n_samples), int(seed)
        self.measure_seed = self.seed if measure_seed is None else int(measure_seed)
        self.progress = progress

    @classmethod
    def diffusion(cls, network: EpsNetwork, diffusion, operator: Operator, guidance: Guidance,
                  integrator: Integrator, timer: Timer,
                  x0_range: tuple[float, float] | None = None, **kwargs) -> SliceReconstructor:
        """Posterior sampling with the prior ``network`` (a ``CondDenoiser``)."""
        device = torch.device(kwargs.get("device", "cpu"))
        operator = operator.to(device)
        sampler = CondDenoiser(diffusion, network, integrator, timer, operator, guidance,
                               x0_range=x0_range)
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


def reconstruct_prepared(prepared: str | Path, operator: OperatorConfig,
                         settings: ReconstructSection, prior: PriorSection, out_dir: str | Path,
                         progress: bool = True, baseline: BaselineConfig | None = None) -> dict:
    """Reconstruct every slice of a prepared volume with one operator, ``batch_size`` slices at
    a time, streaming into NIfTI ``truth``/``naive``/``recon``/``std`` in ``out_dir``.

    The method is the diffusion sampler of ``settings`` or, with ``baseline`` (its ``lam``
    set, e.g. by ``tune_baseline``), that classical reconstruction of the same ``y``.
    ``settings``' own ``operators`` list is ignored. Returns the output paths and ``method``,
    ``label``, ``nfe``, ``vjp``, ``seconds``, ``slices``, ``slices_per_s``; also written to
    ``summary.json``.
    """
    vol = PreparedVolume.open(prepared)
    device = resolve_device(settings.device)
    if settings.num_threads is not None and device.type == "cpu":
        torch.set_num_threads(settings.num_threads)
    op = operator.build(vol.shape, settings.sigma_y, settings.seed)
    common = {"n_samples": settings.n_samples, "seed": settings.seed, "device": device}
    if baseline is not None:
        reconstructor = SliceReconstructor(op, baseline.build(op), **common)
    else:
        network, diffusion = load_network(prior, device)
        reconstructor = SliceReconstructor.diffusion(
            network, diffusion, op, settings.guidance_for(operator).build(),
            settings.integrator.build(), settings.timer.build(settings.steps),
            x0_range=settings.x0_range, **common)
    method = method_summary(settings, operator, baseline)
    out_dir = Path(out_dir)
    n = len(vol.indices)
    rank = {idx: r for r, idx in enumerate(vol.indices)}
    buffer = VolumeBuffer(out_dir, vol.indices, vol.shape)
    start = time.perf_counter()
    try:
        batches = batched(lambda idx: vol.read([rank[i] for i in idx]), vol.indices, settings.batch_size)
        # disable=None: no bar when stderr is not a terminal (no \r updates piling up in logs)
        with tqdm(total=n, desc=f"{vol.name} {operator.name}", unit="slice",
                  disable=None if progress else True) as bar:
            for result in stream(batches, reconstructor):
                buffer.write(result.indices, result.stacks)
                bar.update(len(result.indices))
        seconds = time.perf_counter() - start
        paths = write_outputs(buffer, vol, out_dir)
    finally:
        buffer.close()
    summary = {"volume": vol.name, "operator": operator.name, **method, "nfe": reconstructor.nfe,
               "vjp": reconstructor.sampler.vjp, "n_samples": settings.n_samples, "slices": n,
               "seconds": seconds,
               "slices_per_s": n / seconds if seconds > 0 else float("nan"),
               "device": str(device)}
    summary_path = atomic_write_bytes(out_dir / "summary.json", json.dumps(summary, indent=1).encode())
    return {**paths, **summary, "summary": str(summary_path)}


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
