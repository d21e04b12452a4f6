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
  ``recon.classical.total_variation.tv_prox``).

A slab is reconstructed with ``halo`` extra slices on each side (``halo_span``), dropped
afterwards, so that each slab stays an independent task whose border slices saw their
neighbours: the assembled volume has no seams. The measurement noise of each slice is drawn from
the slice's own seed (``measure_volume``), so a slab measures what the whole volume measures.
Volumes that one measurement mixes along z (``recon.registry.WHOLE_VOLUME_OPERATORS``) are one
slab (``recon.reconstruct.reconstruction.slab_ranges``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from recon.config import BaselineConfig, OperatorConfig, ReconstructSection
from recon.operators import Operator
from recon.reconstruct.slices import SliceReconstructor, slice_seed
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


def is_volume_method(operator: OperatorConfig, settings: ReconstructSection | None,
                     baseline: BaselineConfig | None = None) -> bool:
    """Whether a slab is solved as one volume: a volume operator, a 3-D baseline, or (for the
    diffusion sampler of ``settings``) ``coupling`` other than ``none`` or a warm start from a
    3-D baseline."""
    if operator.volume:
        return True
    if baseline is not None:
        return baseline.name in VOLUME_BASELINES
    warm = settings.warm_start_for(operator)
    return settings.coupling.name != "none" or (warm is not None and
                                                warm.baseline.name in VOLUME_BASELINES)


def halo_span(start: int, stop: int, n: int, halo: int) -> tuple[int, int]:
    """``[start - halo, stop + halo)`` clipped to the volume's ``n`` slices."""
    return max(0, start - halo), min(n, stop + halo)


def measure_volume(operator: Operator, x: Tensor, indices: Sequence[int], seed: int) -> Tensor:
    """``y = A x + sigma_y n`` for a slab ``x (1, S, H, W)`` whose slices sit at ``indices``:
    the noise of ``y``'s ``s``-th plane along dim 1 is drawn from the seed of slice
    ``indices[s]`` (``slice_seed(seed, index, salt=1)``), so a slab and the whole volume see the
    same noise on the same plane, and a slice operator's ``y`` is ``measure_slices``'."""
    y = operator.forward(x)
    if operator.sigma_y == 0.0:
        return y
    planes = [torch.randn(y[:, s].shape, dtype=y.dtype, device=y.device,
                          generator=torch.Generator(y.device).manual_seed(
                              slice_seed(seed, int(idx), salt=1)))
              for s, idx in enumerate(indices)]
    return operator.add_noise(y, torch.stack(planes, dim=1))


class SlabReconstructor(SliceReconstructor):
    """Measure and reconstruct a slab ``(S, H, W)`` as one volume ``(1, S, H, W)``
    (``measure_volume``) with a ``sampler`` over volumes: a ``CondDenoiser`` on
    ``SliceStack(network)`` or a classical baseline on the volume's operator."""

    def measure(self, x: Tensor, indices: Sequence[int]) -> Tensor:
        return measure_volume(self.operator, x, indices, self.measure_seed)

    def images(self, x: Tensor) -> Tensor:
        return x.reshape(1, -1, *x.shape[-2:])

    def slices(self, t: Tensor) -> Tensor:
        return t[0]
