"""Figures for MLflow: built on ``matplotlib.figure.Figure`` (no pyplot, no display backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter


def volume_figure(gt: np.ndarray, naive: np.ndarray, recon: np.ndarray, std: np.ndarray,
                  title: str = "", slices: Sequence[int] | None = None,
                  psnr: Mapping[str, Sequence[float]] | None = None,
                  labels: Sequence[int] | None = None) -> Figure:
    """Rows = slices (default: up to 3 around the centre), columns = ground truth | naive |
    reconstruction | |error| | std over posterior samples. Arrays are ``(S, H, W)`` (any
    in-plane size: native slices keep their aspect). The error and std columns have their own
    colour scale per figure, from 0 to the 99th percentile of the shown pixels (the few largest
    saturate instead of flattening the rest), with a colour bar."""
    n = gt.shape[0]
    if slices is None:
        slices = sorted({n // 2, max(0, n // 2 - n // 4), min(n - 1, n // 2 + n // 4)})
    cols = ["ground truth", "naive", "reconstruction", "|error|", "std"]
    fig = Figure(figsize=(2.2 * len(cols), 2.3 * len(slices) + 0.4), layout="constrained")
    axes = fig.subplots(len(slices), len(cols), squeeze=False)
    lo, hi = float(np.min(gt)), float(np.max(gt))
    shown = list(slices)
    err_max = max(float(np.percentile(np.abs(recon[shown] - gt[shown]), 99)), 1e-8)
    std_max = max(float(np.percentile(std[shown], 99)), 1e-8)
    for r, s in enumerate(slices):
        images = [gt[s], naive[s], recon[s], np.abs(recon[s] - gt[s]), std[s]]
        for c, (img, name) in enumerate(zip(images, cols, strict=True)):
            ax = axes[r, c]
            if c < 3:
                ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
            else:
                im = ax.imshow(img, cmap="magma", vmin=0, vmax=err_max if c == 3 else std_max)
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
            label = name
            if psnr is not None and c in (1, 2):
                key = "naive" if c == 1 else "recon"
                label += f"\n{psnr[key][s]:.1f} dB"
            if r == 0 or psnr is not None and c in (1, 2):
                ax.set_title(label, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(f"slice {labels[s] if labels is not None else s}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def quality_cost(rows: Sequence[Mapping[str, object]], title: str = "PSNR vs seconds") -> Figure:
    """The quality-cost frontier: one point per method at (seconds, PSNR), methods of one
    family (same guidance and integrator, or one baseline) joined in order of cost, the Pareto
    frontier (no method both faster and better) as a black step line, the naive PSNR dashed."""
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    by: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        by.setdefault(str(r["family"]), []).append((float(r["seconds"]), float(r["psnr"])))
    for name, pts in by.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    front, best = [], float("-inf")
    for sec, val in sorted(p for pts in by.values() for p in pts):
        if val > best:
            front.append((sec, val))
            best = val
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black",
            linewidth=0.8, alpha=0.6, label="frontier")
    naive = [float(r["psnr_naive"]) for r in rows if r.get("psnr_naive") is not None]
    if naive:
        ax.axhline(naive[0], color="gray", linestyle="--", label="naive")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("seconds (whole comparison set, this machine)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return fig
