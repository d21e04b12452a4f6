r"""Slices measured and reconstructed a batch at a time, and the prior they are sampled with.

``SliceReconstructor`` measures each slice ``y = A x + sigma_y n`` (noise seeded per slice,
``measure_slices``, so neither ``y`` nor the sample depends on the batch or slab it falls in) and
draws ``n_samples`` posterior samples with a ``CondDenoiser`` (or solves a classical
``recon.classical.baselines.Baseline`` on the same ``y``): their mean is the reconstruction, their pixel-wise
std the uncertainty, ``A^+ y`` the naive baseline. ``load_network`` loads the prior a
``PriorSection`` names, once per process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from recon.config import PriorSection
from recon.operators import Operator
from recon.prior.network import EpsNetwork, autocast, load_prior, resolve_device
from recon.sampling.cond_denoiser import CondDenoiser
from recon.sampling.guidance import Guidance
from recon.sampling.integrator import Integrator
from recon.sampling.timer import Timer

_NETWORKS: dict[tuple, tuple] = {}


def load_network(prior: PriorSection, device: str | torch.device = "auto"):
    """``(network, diffusion)`` of ``prior.checkpoint``; with ``prior.config`` the checkpoint
    must match that network and diffusion config (``CheckpointError`` otherwise). Kept per
    process for the last checkpoint (keyed on its path, size and mtime), so the slabs a worker
    runs load it once. On a CPU its weights are channels_last (oneDNN's layout: the same
    numbers to float32 round-off, 1.3x faster alone and 2.3x with bf16,
    ``benchmarks/forward.py``)."""
    device = resolve_device(device)
    st = Path(prior.checkpoint).stat() if Path(prior.checkpoint).is_file() else None
    key = (prior.model_dump_json(), str(device), st and (st.st_size, st.st_mtime_ns))
    if key not in _NETWORKS:
        expected = prior.expected()
        network, diffusion, _ = load_prior(
            prior.checkpoint, device,
            network_cfg=None if expected is None else expected.network,
            diffusion_cfg=None if expected is None else expected.diffusion, weights=prior.weights)
        if device.type == "cpu":
            network = network.to(memory_format=torch.channels_last)
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
        """The arrays by ``recon.reconstruct.volumes.STACKS`` name."""
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
    ``recon.classical.baselines.Baseline``. ``measure_seed`` fixes the measurement noise (per slice),
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

    def images(self, x: Tensor) -> Tensor:
        """The sampler's images from the slices ``x`` (``(B, H, W)`` or ``(B, 1, H, W)``):
        ``(B, 1, H, W)``."""
        return x[:, None] if x.ndim == 3 else x

    def slices(self, t: Tensor) -> Tensor:
        """The slices ``(B, H, W)`` of the sampler's images (``images``' inverse)."""
        return t[:, 0]

    def __call__(self, x: Tensor, indices: Sequence[int]) -> SliceResult:
        start = time.perf_counter()
        x = self.images(x.to(self.device, torch.float32))
        y = self.measure(x, indices)
        with torch.no_grad():
            naive = self.operator.pseudo_inverse(y)
        naive = naive.real if naive.is_complex() else naive
        gen = torch.Generator(self.device).manual_seed(slice_seed(self.seed, int(indices[0]), salt=2))
        with autocast(self.device, self.precision):
            post = self.sampler.sample(y, self.n_samples, generator=gen, progress=self.progress,
                                       keep_samples=False)

        def host(t: Tensor) -> np.ndarray:
            return self.slices(t).detach().float().cpu().numpy()

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
