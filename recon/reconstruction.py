r"""Slice-batched, streaming posterior reconstruction of one prepared volume with one operator.

A volume ``(S, H, W)`` is processed ``batch_size`` slices at a time: each slice ``x`` is measured
``y = A x + sigma_y n`` (noise seeded per slice, so the measurement of a slice does not depend
on the batch it falls in), the naive baseline is ``A^+ y`` (``operator.pseudo_inverse``), and
``n_samples`` posterior samples ``x0 ~ p(x0 | y)`` are drawn with a ``CondDenoiser``; the
reconstruction is their mean, the uncertainty their pixel-wise std. Only one batch is in memory
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

from recon.cond_denoiser import CondDenoiser
from recon.config import OperatorConfig, PriorSection, ReconstructSection
from recon.data.nifti import atomic_write_bytes
from recon.guidance import Guidance
from recon.integrator import Integrator
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


class SliceReconstructor:
    """Measure and reconstruct batches of slices ``(B, 1, H, W)`` with a fixed operator.

    ``measure_seed`` fixes the measurement noise (per slice), ``seed`` the sampler's noise, so
    two reconstructors that differ only in integrator/steps see the same ``y``.
    """

    def __init__(self, network: EpsNetwork, diffusion, operator: Operator, guidance: Guidance,
                 integrator: Integrator, timer: Timer, n_samples: int = 2, seed: int = 0,
                 measure_seed: int | None = None, device: str | torch.device = "cpu",
                 progress: bool = False, x0_range: tuple[float, float] | None = None):
        self.device = torch.device(device)
        self.operator = operator.to(self.device)
        self.sampler = CondDenoiser(diffusion, network, integrator, timer, self.operator, guidance,
                                    x0_range=x0_range)
        self.n_samples, self.seed = int(n_samples), int(seed)
        self.measure_seed = self.seed if measure_seed is None else int(measure_seed)
        self.progress = progress

    @property
    def nfe(self) -> int:
        return self.sampler.nfe

    def measure(self, x: Tensor, indices: Sequence[int]) -> Tensor:
        """``y`` for each slice, noise drawn from the slice's own seed."""
        ys = [self.operator.measure(x[i: i + 1], generator=torch.Generator(self.device).manual_seed(
            slice_seed(self.measure_seed, idx, salt=1))) for i, idx in enumerate(indices)]
        return torch.cat(ys)

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


def reconstruct_prepared(prepared: str | Path, operator: OperatorConfig,
                         settings: ReconstructSection, prior: PriorSection, out_dir: str | Path,
                         progress: bool = True) -> dict:
    """Reconstruct every slice of a prepared volume with one operator, ``batch_size`` slices at
    a time, streaming into NIfTI ``truth``/``naive``/``recon``/``std`` in ``out_dir``.

    ``settings``' own ``operators`` list is ignored. Returns the output paths and ``nfe``,
    ``seconds``, ``slices``, ``slices_per_s``; also written to ``summary.json``.
    """
    vol = PreparedVolume.open(prepared)
    device = resolve_device(settings.device)
    if settings.num_threads is not None and device.type == "cpu":
        torch.set_num_threads(settings.num_threads)
    network, diffusion = load_network(prior, device)
    guidance_cfg = settings.guidance_for(operator)
    reconstructor = SliceReconstructor(
        network, diffusion, operator.build(vol.shape, settings.sigma_y, settings.seed),
        guidance_cfg.build(), settings.integrator.build(), settings.timer.build(settings.steps),
        n_samples=settings.n_samples, seed=settings.seed, device=device, progress=False,
        x0_range=settings.x0_range)
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
    summary = {"volume": vol.name, "operator": operator.name, "guidance": guidance_cfg.name,
               "integrator": settings.integrator.label, "steps": settings.steps, "nfe": reconstructor.nfe,
               "n_samples": settings.n_samples, "slices": n, "seconds": seconds,
               "slices_per_s": n / seconds if seconds > 0 else float("nan"),
               "device": str(device)}
    summary_path = atomic_write_bytes(out_dir / "summary.json", json.dumps(summary, indent=1).encode())
    return {**paths, **summary, "summary": str(summary_path)}
