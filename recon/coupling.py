r"""A slab of slices reconstructed as one volume with the 2-D prior (DiffusionMBIR, Chung et al.
CVPR 2023).

A slab ``(S, H, W)`` of consecutive slices is sampled as one image ``(1, S, H, W)``:

- the prior denoises every slice on its own (``SliceStack``: the ``S`` slices of each chain are a
  batch of 2-D slices for the network), so it acts in-plane;
- the data-consistency step solves the slab at once, which ties the slices together twice over:
  through the measurement when the operator measures the volume (``kykz_fourier``: k-space
  undersampled in the (kz, ky) plane; ``slice_drop``: every k-th slice missing;
  ``recon.registry.VOLUME_OPERATORS``), and through ``reconstruct.coupling: tv_z`` (total variation
  along the slices, ``+ mu_z ||D_z x||_1``, inside every data-consistency step:
  ``recon.total_variation.tv_prox``).

A slab is reconstructed with ``halo`` extra slices on each side (``halo_span``), dropped
afterwards, so that each slab stays an independent task whose border slices saw their
neighbours: the assembled volume has no seams. The measurement noise of each slice is drawn from
the slice's own seed (``measure_volume``), so a slab measures what the whole volume measures.
Volumes that one measurement mixes along z (``recon.registry.WHOLE_VOLUME_OPERATORS``) are one
slab (``recon.reconstruction.slab_ranges``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from recon.config import BaselineConfig, OperatorConfig, ReconstructSection
from recon.network import autocast
from recon.operators import Operator
from recon.reconstructor import SliceReconstructor, SliceResult, measure_slices, slice_seed
from recon.registry import VOLUME_BASELINES


class SliceStack(nn.Module):
    """A 2-D eps-network applied to volumes: ``(N, S, H, W) -> network((N S, 1, H, W))``,
    each slice on its own at the same ``t``."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        n, s = x.shape[:2]
        eps = self.network(x.reshape(n * s, 1, *x.shape[2:]), t.repeat_interleave(s))
        return eps.reshape(x.shape)


def is_volume_method(operator: OperatorConfig, settings: ReconstructSection,
                     baseline: BaselineConfig | None = None) -> bool:
    """Whether a slab is solved as one volume: a volume operator, a 3-D baseline, or (for the
    diffusion sampler) ``coupling`` other than ``none`` or a warm start from a 3-D baseline."""
    if operator.volume:
        return True
    if baseline is not None:
        return baseline.name in VOLUME_BASELINES
    warm = settings.warm_start
    return settings.coupling.name != "none" or (warm is not None and
                                                warm.baseline.name in VOLUME_BASELINES)


def halo_span(start: int, stop: int, n: int, halo: int) -> tuple[int, int]:
    """``[start - halo, stop + halo)`` clipped to the volume's ``n`` slices."""
    return max(0, start - halo), min(n, stop + halo)


def measure_volume(operator: Operator, x: Tensor, indices: Sequence[int], seed: int,
                   volume: bool) -> Tensor:
    """``y = A x + sigma_y n`` for a slab ``x (1, S, H, W)`` whose slices sit at ``indices``.

    A slice operator measures each slice as ``measure_slices`` does (same ``y``, slices along
    dim 1). A volume operator's ``y (1, S, ...)`` takes the noise of its ``s``-th plane along
    dim 1 from the seed of slice ``indices[s]`` (``slice_seed(seed, index, salt=1)``), so a slab
    and the whole volume see the same noise on the same plane."""
    if not volume:
        return measure_slices(operator, x.transpose(0, 1), indices, seed).transpose(0, 1)
    y_clean = operator.forward(x)
    planes = [torch.randn(y_clean[:, s].shape, dtype=y_clean.dtype, device=y_clean.device,
                          generator=torch.Generator(y_clean.device).manual_seed(
                              slice_seed(seed, int(idx), salt=1)))
              for s, idx in enumerate(indices)]
    return operator.measure(x, noise=torch.stack(planes, dim=1))


class SlabReconstructor(SliceReconstructor):
    """Measure and reconstruct a slab ``(S, H, W)`` as one volume ``(1, S, H, W)`` with a
    ``sampler`` over volumes: a ``CondDenoiser`` on ``SliceStack(network)`` or a classical
    baseline on the volume's operator. ``volume``: whether the operator measures the volume
    (``measure_volume``)."""

    def __init__(self, operator: Operator, sampler, volume: bool, **kwargs):
        super().__init__(operator, sampler, **kwargs)
        self.volume = volume

    def measure(self, x: Tensor, indices: Sequence[int]) -> Tensor:
        return measure_volume(self.operator, x, indices, self.measure_seed, self.volume)

    def __call__(self, x: Tensor, indices: Sequence[int]) -> SliceResult:
        start = time.perf_counter()
        x = x.to(self.device, torch.float32).reshape(1, len(indices), *x.shape[-2:])
        y = self.measure(x, indices)
        with torch.no_grad():
            naive = self.operator.pseudo_inverse(y)
        naive = naive.real if naive.is_complex() else naive
        gen = torch.Generator(self.device).manual_seed(slice_seed(self.seed, int(indices[0]),
                                                                  salt=2))
        with autocast(self.device, self.precision):
            post = self.sampler.sample(y, self.n_samples, generator=gen, progress=self.progress,
                                       keep_samples=False)

        def host(t: Tensor):
            return t[0].detach().float().cpu().numpy()

        return SliceResult(list(map(int, indices)), host(x), host(naive), host(post.mean),
                           host(post.std), post.nfe, time.perf_counter() - start)
