"""Figures for MLflow: built on ``matplotlib.figure.Figure`` (no pyplot, no display backend)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

COLUMNS = ("ground truth", "naive", "reconstruction", "|error|", "std")


class _Row(NamedTuple):
    """One row of ``volume_figure``: its label, the 2-D image it shows of an ``(S, H, W)``
    stack, the imshow aspect and the height (over the width) of that image."""

    label: str
    cut: Callable[[np.ndarray], np.ndarray]
    aspect: float = 1.0
    height: float = 1.0


def volume_figure(gt: np.ndarray, naive: np.ndarray, recon: np.ndarray, std: np.ndarray,
                  title: str = "", slices: Sequence[int] | None = None,
                  psnr: Mapping[str, Sequence[float]] | None = None,
                  labels: Sequence[int] | None = None, slice_aspect: float = 1.0) -> Figure:
    """Rows = slices (default: up to 3 around the centre), columns = ground truth | naive |
    reconstruction | |error| | std over posterior samples. Arrays are ``(S, H, W)`` (any
    in-plane size: native slices keep their aspect). The error and std columns have their own
    colour scale per figure, from 0 to the 99th percentile of the shown pixels (the few largest
    saturate instead of flattening the rest), with a colour bar.

    With ``S >= 3`` two reformat rows follow, where slice-to-slice flicker shows: the sagittal
    plane at column ``W // 2`` (``(S, H)``) and the coronal plane at row ``H // 2``
    (``(S, W)``), same columns and colour scales. The stacks are taken to be consecutive,
    equally spaced slices in the viewer layout with the slice index increasing superiorly (RAS
    axial slicing), so the slice axis is flipped to put superior up; ``slice_aspect`` (slice
    spacing over in-plane pixel size) sets their imshow aspect."""
    n, h, w = gt.shape
    if not slice_aspect > 0:
        raise ValueError(f"slice_aspect must be > 0, got {slice_aspect}")
    if slices is None:
        slices = sorted({n // 2, max(0, n // 2 - n // 4), min(n - 1, n // 2 + n // 4)})
    name = [f"{labels[s] if labels is not None else s}" for s in range(n)]
    rows = [_Row(f"slice {name[s]}", lambda a, s=s: a[s]) for s in slices]
    if n >= 3:  # superior (the last slice) up; heights follow the images' shapes
        rows += [_Row(f"sagittal\ncolumn {w // 2}", lambda a: a[::-1, :, w // 2], slice_aspect,
                      n * slice_aspect / h),
                 _Row(f"coronal\nrow {h // 2}", lambda a: a[::-1, h // 2, :], slice_aspect,
                      n * slice_aspect / w)]
    ratios = [float(np.clip(row.height, 0.35, 1.5)) for row in rows]
    fig = Figure(figsize=(2.2 * len(COLUMNS), 2.3 * sum(ratios) + 0.4), layout="constrained")
    axes = fig.subplots(len(rows), len(COLUMNS), squeeze=False, gridspec_kw={"height_ratios": ratios})
    panels = [[row.cut(gt), row.cut(naive), row.cut(recon), np.abs(row.cut(recon) - row.cut(gt)),
               row.cut(std)] for row in rows]
    scales = [(float(np.min(gt)), float(np.max(gt)))] * 3 + [
        (0.0, max(float(np.percentile(np.concatenate([p[c].ravel() for p in panels]), 99)), 1e-8))
        for c in (3, 4)]
    for r, (row, images) in enumerate(zip(rows, panels, strict=True)):
        titles: list[str | None] = [col if r == 0 else None for col in COLUMNS]
        if psnr is not None and r < len(slices):
            for c, key in ((1, "naive"), (2, "recon")):
                titles[c] = f"{COLUMNS[c]}\n{psnr[key][slices[r]]:.1f} dB"
        _draw_row(fig, axes[r], images, scales, titles, row.aspect)
        axes[r, 0].set_ylabel(row.label, fontsize=8)
        if r >= len(slices):  # where the axial rows above sit (numbered when there is room)
            axes[r, 0].set_yticks([n - 1 - s for s in slices],
                                  [name[s] if row.height >= 0.25 else "" for s in slices], fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def _draw_row(fig: Figure, axes: Sequence, images: Sequence[np.ndarray],
              scales: Sequence[tuple[float, float]], titles: Sequence[str | None],
              aspect: float) -> None:
    """One row of ``volume_figure``: grey images (truth, naive, recon) on the truth's range,
    then |error| and std in magma from 0, each with a colour bar."""
    for c, (ax, img, (lo, hi), label) in enumerate(zip(axes, images, scales, titles, strict=True)):
        im = ax.imshow(img, cmap="gray" if c < 3 else "magma", vmin=lo, vmax=hi, aspect=aspect)
        if c >= 3:
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
        if label:
            ax.set_title(label, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])


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
