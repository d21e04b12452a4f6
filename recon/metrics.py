r"""Image-quality metrics: PSNR and SSIM, batched in torch, equal to scikit-image's.

Both take ``pred`` and ``target`` of shape ``(B, C, H, W)`` (images) or ``(B, C, D, H, W)``
(volumes) and return one float64 value per image / volume, shape ``(B,)``, on the input device.
Channels are pooled: PSNR uses the MSE over all channels, SSIM the mean of per-channel SSIMs
(skimage with ``channel_axis``).

Data range R: by default ``target.max() - target.min()`` per image / volume (over channels and
all voxels). fastMRI's evaluation uses ``target.max()`` per volume, which is the same for
non-negative images whose minimum is 0; pass ``data_range`` (a float or a ``(B,)`` tensor) to
follow it exactly, or to fix one range for a whole study. A constant target has R = 0 and
raises ValueError.

- ``psnr = 10 log10(R^2 / MSE)``, ``MSE = mean((pred - target)^2)``; ``inf`` when they are equal.
  Equals ``skimage.metrics.peak_signal_noise_ratio(target, pred, data_range=R)``.
- ``ssim``: Wang et al. (2004) with skimage's defaults: uniform ``7 x 7`` window (``7 x 7 x 7``
  for volumes), ``K1 = 0.01``, ``K2 = 0.03``, sample covariances (``N / (N - 1)`` with
  ``N = 7^ndim``), mean of the SSIM map over the window centres whose window fits inside the
  image (skimage filters the whole image and crops ``(7 - 1) / 2`` pixels per side, the same
  set). Equals ``skimage.metrics.structural_similarity(target, pred, data_range=R)``. For
  volumes this is 3-D SSIM; fastMRI's volume SSIM is instead the mean of 2-D SSIMs over slices:
  fold the slices into the batch (``(B D, C, H, W)``) and pass a per-slice ``data_range``.

Why not MONAI: ``monai.metrics.SSIMMetric(kernel_type="uniform", win_size=7)`` uses population
covariances (no ``N / (N - 1)`` factor), so it differs from skimage by more than the 1e-4
we need (5.6e-4 on a noisy 64 x 64 crop of ``camera()``); it also computes in float32 and takes
one scalar ``data_range`` for the whole batch, as ``PSNRMetric`` takes one ``max_val``. The few
lines below compute both exactly in float64 (local means with ``avg_pool``), on CPU or GPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _check_pair(pred: Tensor, target: Tensor) -> int:
    """Validate the inputs; return the number of spatial dims (2 or 3)."""
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a real floating-point tensor (take .abs() of a "
                             f"complex image first), got dtype {t.dtype}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs "
                         f"{tuple(target.shape)}")
    if target.ndim not in (4, 5):
        raise ValueError(f"expected images (B, C, H, W) or volumes (B, C, D, H, W), got shape "
                         f"{tuple(target.shape)}")
    return target.ndim - 2


def _data_range(target: Tensor, data_range: float | Tensor | None) -> Tensor:
    """Per-item data range, float64 of shape (B,)."""
    b = target.shape[0]
    if data_range is None:
        flat = target.detach().reshape(b, -1).double()
        r = flat.amax(1) - flat.amin(1)
        if bool((r <= 0).any()):
            bad = torch.nonzero(r <= 0).flatten().tolist()
            raise ValueError(f"target item(s) {bad} are constant, so data_range = max - min = 0; "
                             "pass data_range explicitly")
        return r
    r = torch.as_tensor(data_range, dtype=torch.float64, device=target.device)
    if r.ndim == 0:
        r = r.expand(b)
    if r.shape != (b,):
        raise ValueError(f"data_range must be a number or a tensor of shape ({b},), got shape "
                         f"{tuple(r.shape)}")
    if not bool((torch.isfinite(r) & (r > 0)).all()):
        raise ValueError(f"data_range must be positive and finite, got {r.tolist()}")
    return r


def psnr(pred: Tensor, target: Tensor, data_range: float | Tensor | None = None) -> Tensor:
    """Peak signal-to-noise ratio in dB per image / volume, shape ``(B,)`` (see module doc)."""
    _check_pair(pred, target)
    r = _data_range(target, data_range)
    mse = (pred.double() - target.double()).square().reshape(target.shape[0], -1).mean(1)
    return 10.0 * torch.log10(r.square() / mse)


def ssim(pred: Tensor, target: Tensor, data_range: float | Tensor | None = None,
         win_size: int = 7, k1: float = 0.01, k2: float = 0.03,
         mask: Tensor | None = None) -> Tensor:
    r"""Mean structural similarity per image / volume, shape ``(B,)`` (see module doc).

    With local means ``u``, sample variances ``v`` and covariance ``v_xy`` over the window:
    ``S = (2 u_x u_y + C1)(2 v_xy + C2) / ((u_x^2 + u_y^2 + C1)(v_x + v_y + C2))``,
    ``C1 = (K1 R)^2``, ``C2 = (K2 R)^2``. With a boolean ``mask`` of the target's shape the mean
    runs over the window centres inside it (NaN for an item with none): SSIM where a reader
    looks (``head_mask``), not over the background's noise floor.
    """
    ndim = _check_pair(pred, target)
    if isinstance(win_size, bool) or not isinstance(win_size, int) or win_size < 3 \
            or win_size % 2 == 0:
        raise ValueError(f"win_size must be an odd integer >= 3, got {win_size!r}")
    spatial = tuple(target.shape[2:])
    if min(spatial) < win_size:
        raise ValueError(f"every spatial dim must be at least win_size={win_size}, got spatial "
                         f"shape {spatial}")
    r = _data_range(target, data_range)
    b, c = target.shape[:2]
    x = pred.double().reshape(b * c, 1, *spatial)
    y = target.double().reshape(b * c, 1, *spatial)
    pool = F.avg_pool2d if ndim == 2 else F.avg_pool3d

    def mean(t: Tensor) -> Tensor:
        return pool(t, kernel_size=win_size, stride=1)

    n = win_size**ndim
    cov_norm = n / (n - 1)
    ux, uy = mean(x), mean(y)
    vx = cov_norm * (mean(x * x) - ux * ux)
    vy = cov_norm * (mean(y * y) - uy * uy)
    vxy = cov_norm * (mean(x * y) - ux * uy)
    r = r.repeat_interleave(c).reshape(-1, *([1] * (ndim + 1)))
    c1, c2 = (k1 * r) ** 2, (k2 * r) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    if mask is None:
        return s.reshape(b, -1).mean(1)
    if tuple(mask.shape) != tuple(target.shape):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the images "
                         f"{tuple(target.shape)}")
    pad = (win_size - 1) // 2
    inside = mask.to(s.device, torch.bool)[(..., *[slice(pad, n - pad) for n in spatial])]
    inside = inside.reshape(b * c, 1, *s.shape[2:])
    kept = (s * inside).reshape(b, -1).sum(1)
    return kept / inside.reshape(b, -1).sum(1)


# -- a reconstructed volume against its ground truth -------------------------------------------
SLICE_METRICS = ("psnr", "ssim", "psnr_naive", "ssim_naive", "ssim_head", "ssim_head_naive")
"""Per-slice metrics of ``evaluate_stacks`` (``_naive``: of the naive pseudo-inverse; ``_head``:
inside ``head_mask``)."""
VOLUME_METRICS = ("psnr", "ssim", "psnr_naive", "ssim_naive", "gain_db", "psnr_head",
                  "ssim_head", "psnr_head_naive", "ssim_head_naive")
"""Per-volume metrics of ``evaluate_stacks``; ``gain_db = psnr - psnr_naive``."""
HEAD_LEVEL = 0.1
"""``head_mask``: the head is brighter than this fraction of the reference's 99th percentile."""


def head_mask(truth: np.ndarray, level: float = HEAD_LEVEL) -> np.ndarray:
    """``(S, H, W)`` bool, where a reader looks: the pixels of the ground truth above ``level``
    times its 99th percentile over the volume, each slice's holes filled (dark CSF and the
    ventricles inside the head count, the air around it does not)."""
    from scipy import ndimage

    truth = np.asarray(truth)
    bright = truth > level * np.percentile(truth, 99.0)
    return np.stack([ndimage.binary_fill_holes(s) for s in bright])


def evaluate_stacks(truth: np.ndarray, naive: np.ndarray, recon: np.ndarray,
                    batch_size: int = 64) -> dict[str, object]:
    """PSNR and SSIM per slice and per volume, for the reconstruction and the naive baseline,
    over the whole image and inside the head (``head_mask``: ``_head`` keys).

    Data range: the volume's ground-truth maximum (fastMRI), the same for every slice and for
    both regions. Volume PSNR uses the MSE over all kept slices (their head pixels for
    ``psnr_head``); volume SSIM is the mean of the 2-D slice SSIMs (inside the head: over the
    window centres there). Against a noisy reference (the root-sum-of-squares of measured
    coils) the whole-image numbers weigh the background's noise floor, which no reconstruction
    should copy; the head's do not. ``gain_db`` = PSNR(recon) - PSNR(naive) per volume. Keys:
    ``VOLUME_METRICS``, ``<name>_slices`` for each of ``SLICE_METRICS``, and ``data_range``.
    """
    r = float(np.max(truth))
    if not r > 0:
        raise ValueError("the ground-truth volume is empty (max <= 0): cannot compute PSNR")
    head = head_mask(truth)
    out: dict[str, list[float]] = {name: [] for name in SLICE_METRICS}
    sq = {k: 0.0 for k in ("", "_naive", "_head", "_head_naive")}
    n = m = 0
    for i in range(0, truth.shape[0], batch_size):
        t = torch.from_numpy(np.asarray(truth[i: i + batch_size], dtype=np.float64))[:, None]
        inside = torch.from_numpy(head[i: i + batch_size])[:, None]
        for key, arr in (("", recon), ("_naive", naive)):
            p = torch.from_numpy(np.asarray(arr[i: i + batch_size], dtype=np.float64))[:, None]
            err = (p - t).square()
            out["psnr" + key] += psnr(p, t, r).tolist()
            out["ssim" + key] += ssim(p, t, r).tolist()
            out["ssim_head" + key] += ssim(p, t, r, mask=inside).tolist()
            sq[key] += float(err.sum())
            sq["_head" + key] += float(err[inside].sum())
        n += t.numel()
        m += int(inside.sum())
    vol = {k: 10.0 * np.log10(r * r / max(v / (m if "head" in k else n), 1e-30))
           for k, v in sq.items()}
    ssim_mean = {k: float(np.nanmean(out[k])) if not np.isnan(out[k]).all() else float("nan")
                 for k in ("ssim", "ssim_naive", "ssim_head", "ssim_head_naive")}
    return {
        **{f"{name}_slices": values for name, values in out.items()},
        "psnr": float(vol[""]), "psnr_naive": float(vol["_naive"]), **ssim_mean,
        "gain_db": float(vol[""] - vol["_naive"]),
        "psnr_head": float(vol["_head"]), "psnr_head_naive": float(vol["_head_naive"]),
        "data_range": r,
    }


def worst_margins(rows: Iterable[Mapping[str, Any]], method: str,
                  over: Iterable[str] | None = None, key: str = "method",
                  metric: str = "psnr") -> dict[str, float]:
    """Per operator, the worst volume's ``metric`` (PSNR) margin of the rows whose ``key`` is
    ``method``: over the best ``metric`` of the rows whose ``key`` is in ``over`` (same volume
    and operator), or, with ``over=None``, the PSNR over the row's own naive reconstruction
    (``gain_db``). Rows are ``{"volume", "operator", key, "psnr", "gain_db", ...}``; an
    operator without rows of both sides is left out."""
    rows = list(rows)
    others = None if over is None else set(over)
    out: dict[str, float] = {}
    for r in rows:
        if r[key] != method:
            continue
        if others is None:
            margin = r["gain_db"]
        else:
            rivals = [o[metric] for o in rows if o[key] in others and o["volume"] == r["volume"]
                      and o["operator"] == r["operator"]]
            if not rivals:
                continue
            margin = r[metric] - max(rivals)
        out[r["operator"]] = min(out.get(r["operator"], float("inf")), margin)
    return out

