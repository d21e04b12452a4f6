"""Random crops of native-resolution slices, with MONAI augmentation, for patch priors.

A fully convolutional prior is trained on ``size x size`` crops of slices at their native grid
and applied to whole slices of any size at sampling time (patch diffusion: PaDIS, Hu et al.
NeurIPS 2024). The crops, composed in one place (``crop_transforms``), MONAI dict transforms:

1. ``SpatialPadd`` to ``1.25 size`` (zeros: slices smaller than a crop), then a uniformly
   placed ``RandSpatialCropd``: crops see background and the head's edge as often as the
   slices have them (a prior fed only head-centred crops paints tissue into the background);
2. with ``augment``: ``RandAffined`` (rotation up to 15 degrees, scale +-15 %), then the
   central ``size x size`` (so the rotation's empty corners are cut off), ``RandFlipd``
   (left-right), ``RandScaleIntensityd`` (+-20 %), ``RandShiftIntensityd`` (+-0.03),
   ``RandAdjustContrastd`` (gamma 0.7 .. 1.5).

``CropDataset.batch(indices, step)`` draws every crop from a seed mixed from ``(seed, step,
position)``, so training resumed at any step sees exactly the crops of an uninterrupted run.
Items ``dataset[i]`` are fixed crops without augmentation (validation).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    SpatialPadd,
)
from torch import Tensor


def crop_transforms(size: int, augment: bool) -> Compose:
    """The crop (and augmentation) of one ``{"image": (1, H, W)}`` slice to ``(1, size, size)``."""
    big = int(round(1.25 * size))
    steps = [SpatialPadd("image", spatial_size=(big, big)),
             RandSpatialCropd("image", roi_size=(big, big), random_size=False)]
    if augment:
        steps += [RandAffined("image", prob=0.7, rotate_range=(np.pi / 12,),
                              scale_range=(0.15, 0.15), mode="bilinear", padding_mode="zeros")]
    steps += [CenterSpatialCropd("image", roi_size=(size, size))]
    if augment:
        steps += [RandFlipd("image", prob=0.5, spatial_axis=1),
                  RandScaleIntensityd("image", factors=0.2, prob=0.8),
                  RandShiftIntensityd("image", offsets=0.03, prob=0.3),
                  RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.5)]
    return Compose(steps)


def _seed(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFF)) * 0x100000001B3) % 2**64
    return h % 2**32


class CropDataset:
    """``size x size`` crops of ``slices`` (a list of ``(1, H, W)`` tensors of any sizes)."""

    def __init__(self, slices: Sequence[Tensor], size: int, augment: bool = True, seed: int = 0):
        if not slices:
            raise ValueError("no slices to crop")
        self.slices = [torch.as_tensor(s, dtype=torch.float32) for s in slices]
        self.size, self.seed = int(size), int(seed)
        self._train = crop_transforms(self.size, augment)
        self._fixed = crop_transforms(self.size, augment=False)

    def __len__(self) -> int:
        return len(self.slices)

    def _crop(self, transform: Compose, i: int, seed: int) -> Tensor:
        transform.set_random_state(seed=seed)
        out = transform({"image": self.slices[i]})
        out = out[0] if isinstance(out, list) else out
        return torch.as_tensor(out["image"], dtype=torch.float32).contiguous()

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        """A fixed crop of slice ``i`` (no augmentation)."""
        return {"image": self._crop(self._fixed, int(i), _seed(self.seed, int(i)))}

    def batch(self, indices: Sequence[int] | Tensor, step: int) -> Tensor:
        """Augmented crops ``(B, 1, size, size)`` of the slices ``indices`` for ``step``."""
        idx = [int(i) for i in indices]
        return torch.stack([self._crop(self._train, i, _seed(self.seed, step, k, i))
                            for k, i in enumerate(idx)])
