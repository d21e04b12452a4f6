"""Demos.

    python -m recon.demo                      # the full pipeline demo (what `make demo` runs)
    python -m recon.demo pipeline --set reconstruct.steps=8     # same, with config overrides
    python -m recon.demo mixture              # sample a known 2-D Gaussian mixture with each
                                              # integrator and compare with the true law

The pipeline demo, on 2 CPU cores in a few minutes: materialise the offline public brain MRI
set (``data_manifests/public_brain.yaml``), run the ``pipeline`` flow with the shipped prior
(``configs/demo.yaml``: training skipped, ``train.enabled: false``), reconstruct the held-out
test volume's central slices for the three operators (random pixel mask, Gaussian blur,
4x undersampled Fourier), compare the four integrators (Euler, Heun, DPM++2S, DDIM) on the
same measurement, print the tables and the PSNR margins over the naive pseudo-inverse, and say
where the MLflow runs are. Exit status 1 if any operator fails to beat the naive baseline.
"""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.table import Table

from recon.analytic import GaussianMixture, coordinate_wasserstein
from recon.denoiser import Denoiser
from recon.diffusion import VPLinear
from recon.integrator import (
    DDIMIntegrator,
    DPMpp2sIntegrator,
    EulerIntegrator,
    EulerMaruyamaIntegrator,
    HeunIntegrator,
)
from recon.timer import CosineTimer


def demo_mixture() -> GaussianMixture:
    """Three 2-D components with unequal weights."""
    return GaussianMixture(
        torch.tensor([0.2, 0.5, 0.3]),
        torch.tensor([[-2.5, 0.0], [2.0, 1.5], [0.5, -2.5]]),
        torch.stack([0.25 * torch.eye(2), torch.tensor([[0.4, 0.15], [0.15, 0.2]]),
                     torch.tensor([[0.2, -0.1], [-0.1, 0.3]])]),
    )


def mixture_table(n_samples: int = 20_000, steps: tuple[int, ...] = (8, 32), seed: int = 0,
                  console: Console | None = None) -> list[dict]:
    """Sample the demo mixture with every integrator; W1 is the largest per-coordinate
    Wasserstein-1 distance to fresh samples of the true law."""
    console = console or Console(width=max(Console().width, 110))
    mixture, diffusion = demo_mixture(), VPLinear()
    network = mixture.eps_network(diffusion)
    reference = mixture.sample(n_samples, torch.Generator().manual_seed(seed + 1))
    floor = coordinate_wasserstein(mixture.sample(n_samples, torch.Generator().manual_seed(seed + 2)),
                                   reference).max().item()
    integrators = [EulerIntegrator(), HeunIntegrator(), DPMpp2sIntegrator(), DDIMIntegrator(0.0),
                   DDIMIntegrator(1.0), EulerMaruyamaIntegrator()]
    rows = []
    for integrator in integrators:
        for n in steps:
            denoiser = Denoiser(diffusion, network, integrator, CosineTimer(n))
            start = time.perf_counter()
            x = denoiser.sample((n_samples, 2), generator=torch.Generator().manual_seed(seed),
                                dtype=torch.float64)
            seconds = time.perf_counter() - start
            rows.append({"integrator": repr(integrator), "steps": n, "nfe": denoiser.nfe,
                         "w1": coordinate_wasserstein(x, reference).max().item(),
                         "mean_error": (x.mean(0) - mixture.mean).abs().max().item(),
                         "seconds": seconds})
    table = Table(title=f"2-D Gaussian mixture, exact score, {n_samples} samples "
                        f"(W1 between two true samples: {floor:.3f})")
    for col in ("integrator", "steps", "NFE", "W1 to true law", "mean error", "seconds"):
        table.add_column(col, justify="left" if col == "integrator" else "right")
    for r in rows:
        table.add_row(r["integrator"], str(r["steps"]), str(r["nfe"]), f"{r['w1']:.3f}",
                      f"{r['mean_error']:.3f}", f"{r['seconds']:.2f}")
    console.print(table)
    return rows


def pipeline_demo(overrides: list[str] | None = None, config: str = "configs/demo.yaml") -> int:
    """The pipeline demo (see the module docstring); returns the exit status."""
    import sys
    from pathlib import Path

    from recon import cli
    from recon.config import ConfigError, load_config

    start = time.perf_counter()
    console = cli.console
    root = Path(__file__).resolve().parents[1]
    path = Path(config) if Path(config).is_file() else root / config
    try:
        cfg = load_config(path, overrides or [], base_dir=root)
    except ConfigError as err:
        console.print(f"[bold red]invalid configuration[/]\n{err}", highlight=False)
        return 2
    cli.setup_prefect(cfg)
    from pipelines.flows import compare_integrators, pipeline
    from pipelines.settings import api_url

    ops = ", ".join(o.name for o in cfg.reconstruct.operators)
    console.rule("[bold]recon demo: diffusion-prior reconstruction of held-out brain MRI")
    console.print(f"config {path.relative_to(root) if path.is_relative_to(root) else path} | "
                  f"operators: {ops} | {cfg.reconstruct.integrator.label}, {cfg.reconstruct.steps} "
                  f"steps, {cfg.reconstruct.n_samples} posterior samples | "
                  f"{cfg.data.image_size}x{cfg.data.image_size} slices, <= {cfg.data.max_slices} "
                  f"per volume | Prefect API: {api_url() or 'embedded'}", highlight=False)
    console.print(f"prior: {cfg.prior.checkpoint} (train.enabled={cfg.train.enabled})",
                  highlight=False)
    try:
        console.print("\n[bold]1/2 pipeline[/]: load_data -> train_prior -> reconstruct -> evaluate")
        out = pipeline(cfg.to_dict())
        ok = cli.print_reconstruction(cfg, out["rows"])
        console.print(f"\n[bold]2/2 compare_integrators[/] on {cfg.compare_operator.name}: "
                      f"{', '.join(i.label for i in cfg.compare.integrators)} x steps "
                      f"{cfg.compare.steps} (same data, seed and measurement)")
        cmp = compare_integrators(cfg.to_dict(), data=out["data"], checkpoint=out["checkpoint"])
        cli.print_table(f"integrators on {cfg.compare_operator.name}", cmp["rows"],
                        cli.COMPARE_COLUMNS)
    except Exception as err:  # noqa: BLE001 - the flow's reason, plainly (MLflow run is FAILED)
        console.print(f"[bold red]demo failed:[/] {type(err).__name__}: {err}", highlight=False)
        return 1
    cli.where(cfg)
    console.print(f"pipeline run {out['run_id']}, comparison run {cmp['run_id']}; "
                  f"demo wall time {time.perf_counter() - start:.0f} s", highlight=False)
    if not ok:
        console.print("[bold red]some operator did not beat the naive baseline[/]")
    sys.stdout.flush()
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m recon.demo", description="recon demos")
    p.add_argument("which", nargs="?", default="pipeline", choices=["pipeline", "mixture"])
    p.add_argument("--config", default="configs/demo.yaml", help="pipeline demo config")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="dotted config override, e.g. reconstruct.steps=8 (repeatable)")
    args = p.parse_args(argv)
    if args.which == "mixture":
        mixture_table()
        return 0
    return pipeline_demo(args.overrides, args.config)


if __name__ == "__main__":
    raise SystemExit(main())
