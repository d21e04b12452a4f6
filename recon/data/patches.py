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

With ``synthetic = p > 0`` a crop is, with probability p, cut from a *domain-randomised*
version of its slice (``synthetic_transforms``, as SynthSeg, Billot et al. 2023, randomises
contrast from label maps): the slice's tissue classes (multi-Otsu classes of its foreground,
``tissue_means``) get random intensities through a continuous piecewise-linear intensity map
(``RandTissueContrastd``: texture and partial-volume edges kept), then a smooth elastic
deformation, a multiplicative bias field, Gibbs ringing and Rician noise
(MONAI ``Rand2DElasticd``, ``RandBiasFieldd``, ``RandGibbsNoised``, ``RandRicianNoised``), and
the foreground median is brought back to the slices' 0.5. A handful of scans then stand for
many contrasts and shapes.

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
    MapTransform,
    Rand2DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandFlipd,
    RandGibbsNoised,
    RandomizableTransform,
    RandRicianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    SpatialPadd,
)
from skimage.filters import threshold_multiotsu
from torch import Tensor

FOREGROUND = 0.1
"""Intensity above which a pixel of a normalised slice (head median 0.5) is foreground."""


def tissue_means(image: Tensor, classes: int = 4) -> Tensor:
    """The mean intensities ``(classes,)`` (ascending) of a normalised slice's tissue classes:
    the multi-Otsu classes of its foreground (pixels above ``FOREGROUND``), from a 128-bin
    histogram. A slice with too little foreground gets its foreground mean repeated, one with
    few distinct values those values."""
    x = image.flatten().numpy()
    values = x[x > FOREGROUND]
    if values.size < 64 or np.ptp(values) <= 0:
        mean = float(values.mean()) if values.size else 0.5
        return torch.full((classes,), mean)
    counts, edges = np.histogram(values, bins=128)  # 256 bins: 12x slower, same classes
    if np.count_nonzero(counts) <= classes:  # a few distinct values: they are the classes
        levels = np.unique(values)[:classes]
        return torch.from_numpy(np.resize(levels, classes).astype(np.float32)).sort().values
    thresholds = threshold_multiotsu(hist=(counts, 0.5 * (edges[1:] + edges[:-1])), classes=classes)
    which = np.digitize(values, thresholds)
    means = [values[which == k].mean() if (which == k).any() else np.nan for k in range(classes)]
    means = np.asarray(means, np.float64)
    means[np.isnan(means)] = np.nanmean(means)
    return torch.from_numpy(np.sort(means).astype(np.float32))


class RandTissueContrastd(RandomizableTransform, MapTransform):
    """Random per-tissue contrast: the intensity map ``x -> f(x)`` that is piecewise linear
    through ``(0, 0)`` and ``(m_k, mu_k)`` for the tissue means ``m_k`` of ``means_key``
    (``tissue_means``) and random ``mu_k ~ U(low, high)``, linear beyond the last mean. ``f``
    is continuous, so partial-volume edges stay smooth and the texture within a tissue is
    kept; it need not be monotone (contrast may invert, as from T1 to T2). The foreground
    median is then scaled back to ``median`` (the slices' normalisation)."""

    def __init__(self, keys: str = "image", means_key: str = "means", low: float = 0.05,
                 high: float = 1.0, median: float = 0.5, prob: float = 1.0):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.means_key, self.low, self.high, self.median = means_key, low, high, median

    def __call__(self, data):
        d = dict(data)
        means = np.asarray(d[self.means_key], np.float64)
        self.randomize(None)
        targets = self.R.uniform(self.low, self.high, size=len(means))
        if not self._do_transform:
            return d
        xp = np.concatenate([[0.0], means])
        fp = np.concatenate([[0.0], targets])
        keep = np.concatenate([[True], np.diff(xp) > 1e-6])  # strictly increasing knots
        xp, fp = xp[keep], fp[keep]
        for key in self.key_iterator(d):
            x = np.asarray(d[key], np.float64)
            top = max(float(x.max()), xp[-1] + 1e-3)
            out = np.interp(x, np.append(xp, top), np.append(fp, fp[-1] * top / xp[-1]))
            fg = out[x > FOREGROUND]
            scale = self.median / max(float(np.median(fg)), 1e-6) if fg.size else 1.0
            d[key] = torch.as_tensor(out * scale, dtype=torch.float32)
        return d


def synthetic_transforms() -> Compose:
    """Domain randomisation of a ``{"image", "means"}`` slice (see the module docstring)."""
    return Compose([
        RandTissueContrastd("image", "means"),
        Rand2DElasticd("image", spacing=(24, 24), magnitude_range=(0.5, 2.0), prob=0.7,
                       padding_mode="zeros"),
        RandBiasFieldd("image", coeff_range=(0.1, 0.4), prob=0.7),
        RandGibbsNoised("image", alpha=(0.0, 0.4), prob=0.3),
        RandRicianNoised("image", std=0.03, prob=0.5, sample_std=True),
    ])


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
    """``size x size`` crops of ``slices`` (a list of ``(1, H, W)`` tensors of any sizes); with
    probability ``synthetic`` a crop comes from a domain-randomised copy of its slice."""

    def __init__(self, slices: Sequence[Tensor], size: int, augment: bool = True, seed: int = 0,
                 synthetic: float = 0.0):
        if not slices:
            raise ValueError("no slices to crop")
        if not 0.0 <= synthetic <= 1.0:
            raise ValueError(f"synthetic must lie in [0, 1], got {synthetic}")
        self.slices = [torch.as_tensor(s, dtype=torch.float32) for s in slices]
        self.size, self.seed, self.synthetic = int(size), int(seed), float(synthetic)
        self._train = crop_transforms(self.size, augment)
        self._fixed = crop_transforms(self.size, augment=False)
        self._means = [tissue_means(s) for s in self.slices] if synthetic > 0 else []
        self._synth = synthetic_transforms()

    def __len__(self) -> int:
        return len(self.slices)

    def _crop(self, transform: Compose, i: int, seed: int, synthetic: bool = False) -> Tensor:
        image = self.slices[i]
        if synthetic:
            self._synth.set_random_state(seed=_seed(seed, 1))
            image = torch.as_tensor(self._synth({"image": image, "means": self._means[i]})["image"],
                                    dtype=torch.float32)
        transform.set_random_state(seed=seed)
        out = transform({"image": image})
        out = out[0] if isinstance(out, list) else out
        return torch.as_tensor(out["image"], dtype=torch.float32).contiguous()

    def _is_synthetic(self, seed: int) -> bool:
        return self.synthetic > 0 and np.random.default_rng(_seed(seed, 2)).random() < self.synthetic

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        """A fixed crop of slice ``i`` (no augmentation)."""
        return {"image": self._crop(self._fixed, int(i), _seed(self.seed, int(i)))}

    def batch(self, indices: Sequence[int] | Tensor, step: int) -> Tensor:
        """Augmented crops ``(B, 1, size, size)`` of the slices ``indices`` for ``step``."""
        idx = [int(i) for i in indices]
        seeds = [_seed(self.seed, step, k, i) for k, i in enumerate(idx)]
        return torch.stack([self._crop(self._train, i, s, self._is_synthetic(s))
                            for i, s in zip(idx, seeds, strict=True)])
