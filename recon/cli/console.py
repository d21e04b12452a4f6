"""What the ``recon`` command prints: the console, tables, margins, where results went."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

_probe = Console()
console = Console(width=max(_probe.width, 150) if _probe.is_terminal else 160)


def where(cfg) -> None:
    """Where to find the results."""
    from pipelines.tracking import tracking_uri, ui_command

    console.print(f"\nMLflow runs: [bold]{tracking_uri(cfg)}[/] (experiment "
                  f"[bold]{cfg.tracking.experiment}[/])", highlight=False)
    console.print(f"  browse them: [bold]{ui_command(cfg)}[/]", highlight=False)
    console.print(f"  outputs (NIfTI on the input grid, per-slice arrays): "
                  f"{Path(cfg.work_dir) / 'runs'}", highlight=False)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str]]) -> None:
    table = Table(title=title, title_justify="left")
    for key, header in columns:  # a long method label wraps in its cell; numbers never do
        table.add_column(header, no_wrap=key not in ("label", "method"),
                         max_width=36 if key in ("label", "method") else None,
                         justify="left" if key in ("volume", "operator", "guidance", "integrator",
                                                   "label", "method") else "right")
    for r in rows:
        table.add_row(*[_fmt(r.get(k, "")) for k, _ in columns])
    console.print(table)


RECON_COLUMNS = [("volume", "volume"), ("operator", "operator"), ("label", "method"),
                 ("nfe", "NFE"),
                 ("slices", "slices"), ("psnr_naive", "PSNR naive"), ("psnr", "PSNR recon"),
                 ("gain_db", "gain dB"), ("ssim_naive", "SSIM naive"), ("ssim", "SSIM recon"),
                 ("seconds", "seconds"), ("slices_per_s", "slices/s")]
COMPARE_COLUMNS = [("method", "method"), ("nfe", "NFE"), ("vjp", "VJP"), ("psnr", "PSNR"),
                   ("ssim", "SSIM"), ("seconds", "seconds"), ("slices_per_s", "slices/s"),
                   ("gain_db", "gain over naive dB")]


FULLY_SAMPLED_DB = 100.0
"""A naive reconstruction this close to the reference (PSNR in dB) means nothing was missing."""


def print_reconstruction(cfg, rows: list[dict]) -> bool:
    """The held-out PSNR/SSIM table and each operator's margin over the naive pseudo-inverse;
    True when every operator beats it."""
    from recon.metrics import worst_margins

    r = cfg.reconstruct
    print_table(f"held-out reconstruction vs the naive pseudo-inverse ({r.integrator.label}, "
                f"{r.steps} steps, {r.n_samples} posterior samples, sigma_y={r.sigma_y:g} on images; "
                "raw k-space keeps its measured noise)",
                rows, RECON_COLUMNS)
    console.print("PSNR margins over the naive pseudo-inverse:")
    ok = True
    full = {r["operator"] for r in rows if r.get("psnr_naive", 0) >= FULLY_SAMPLED_DB}
    for op in sorted(full):
        console.print(f"  {op:8s} the measurement is fully sampled: the naive reconstruction "
                      f"already equals the reference, there is nothing to reconstruct or score",
                      highlight=False)
    rows = [r for r in rows if r["operator"] not in full]
    for op, gain in worst_margins(rows, "diffusion").items():
        good = gain > 0
        ok &= good
        mark = "[green]beats[/]" if good else "[bold red]does NOT beat[/]"
        console.print(f"  {op:8s} reconstruction {mark} the naive pseudo-inverse by "
                      f"{gain:+.2f} dB (worst volume)", highlight=False)
    baselines = sorted({r["method"] for r in rows} - {"diffusion"})
    classical = worst_margins(rows, "diffusion", baselines)
    if classical:
        names = ", ".join(baselines)
        console.print(f"PSNR margins over the best classical baseline ({names}):")
        for op, gain in classical.items():
            word = "leads" if gain > 0 else "[bold]trails[/]"
            console.print(f"  {op:8s} reconstruction {word} it by {gain:+.2f} dB (worst volume)",
                          highlight=False)
    return ok
