"""The shipped prior's files: the small exported checkpoint (EMA weights, config, summary), the
held-out slices the quality tests use, and the slices a prior config trains on."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from recon.config.prior import PriorConfig
from recon.data.loading import SliceDataset
from recon.data.nifti import atomic_path
from recon.data.patches import CropDataset
from recon.data.slicing import SliceConfig
from recon.prior.batches import stack_items
from recon.prior.network import (
    CHECKPOINT_FORMAT,
    read_checkpoint,
)
from recon.prior.training import save_atomic


def export_prior(checkpoint: str | Path, dest: str | Path,
                 dtype: torch.dtype = torch.float32, extra: dict[str, Any] | None = None) -> Path:
    """Write the shipped prior: EMA weights (as ``dtype``), config and a summary, atomically."""
    ckpt = read_checkpoint(checkpoint)
    ema = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt["ema"].items()}
    history = ckpt.get("history", [])
    summary = {
        "step": int(ckpt["step"]),
        "seconds": float(ckpt.get("seconds", 0.0)),
        "n_train": int(ckpt.get("n_train", 0)),
        "train_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
        "val_loss": next((h["val_loss"] for h in reversed(history) if "val_loss" in h), None),
        "val_loss_raw": next((h["val_loss_raw"] for h in reversed(history)
                              if "val_loss_raw" in h), None),
        "val_eps_mse": next((h["val_eps_mse"] for h in reversed(history)
                             if "val_eps_mse" in h), None),
        "torch": str(torch.__version__),
    } | (extra or {})
    return save_atomic({"format": CHECKPOINT_FORMAT, "kind": "prior", "config": ckpt["config"],
                        "step": int(ckpt["step"]), "ema": ema, "summary": summary}, dest)


def save_heldout_slices(slices: Tensor, path: str | Path, n: int = 48,
                        source: str = "") -> Path:
    """Ship ``n`` held-out slices for the quality tests: evenly spaced over ``slices`` (so over
    every volume of the split, deterministic), float16 (|error| < 3e-4 in [0, 1]) in a compressed
    ``.npz`` with ``slices`` ``(n, C, H, W)``, their ``indices`` and a ``source`` note."""
    idx = torch.linspace(0, len(slices) - 1, min(n, len(slices))).round().long().unique()
    arr = stack_items(slices, idx).numpy().astype(np.float16)
    path = Path(path)
    with atomic_path(path, suffix=".npz") as tmp:  # np.savez adds .npz to other names
        np.savez_compressed(tmp, slices=arr, indices=idx.numpy(), source=np.array(source))
    return path


def save_native_heldout(cfg: PriorConfig, data_root: str | Path, path: str | Path,
                        per_volume: int = 1) -> Path:
    """Ship the ``per_volume`` central foreground slices of every ``heldout_split`` volume at
    its native grid (sizes differ per volume) for the native prior's tests: a compressed
    ``.npz`` with one float16 array ``(k, 1, H, W)`` per volume id (normalised as the prior
    sees them) and a ``source`` note."""
    d = cfg.data
    ds = SliceDataset(d.manifest, data_root, d.heldout_split,
                      SliceConfig(size=None, axis=d.axis, normalise=d.normalise, **d.loader),
                      d.cache_dir, ids=d.heldout_ids)
    arrays = {}
    for vid, vol in ds.volumes.items():
        keep = [z for v, z in ds.index if v == vid]
        start = max(0, (len(keep) - per_volume) // 2)
        arrays[vid] = vol[keep[start:start + per_volume]].numpy().astype(np.float16)
    source = (f"{d.manifest} split={d.heldout_split}: central {per_volume} foreground slice(s) "
              f"per volume, native grid, normalise={d.normalise}")
    path = Path(path)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, source=np.array(source), **arrays)
    return path


# -- data ---------------------------------------------------------------------------------------
def load_slices(cfg: PriorConfig, data_root: str | Path, split: str,
                ids: Sequence[str] | None = None) -> Tensor | CropDataset:
    """The foreground slices of ``split`` (of volumes ``ids`` if given), via
    ``recon.data.loading.SliceDataset``: a float32 tensor ``(N, 1, S, S)``, or with
    ``data.patch_size`` a ``CropDataset`` of the native-grid slices (random crops, MONAI
    augmentation when ``data.augment``)."""
    d = cfg.data
    ds = SliceDataset(d.manifest, data_root, split,
                      SliceConfig(size=d.image_size, axis=d.axis, normalise=d.normalise,
                                  **d.loader), d.cache_dir, ids=ids)
    if len(ds) == 0:
        raise ValueError(f"no slices in split {split!r} under {data_root}"
                         + (f" for volumes {list(ids)}" if ids else ""))
    if d.patch_size is None:
        return ds.tensor()
    return CropDataset([ds[i]["image"] for i in range(len(ds))], d.patch_size,
                       augment=d.augment, seed=cfg.training.seed,
                       synthetic=d.synthetic if split == d.train_split else 0.0)
