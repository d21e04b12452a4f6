"""The mixture demo: sample a known 2-D Gaussian mixture with each integrator (exact score)
and compare with the true law.

    recon demo mixture        # this table; `recon demo` (= `make demo`) runs the pipeline demo
"""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.table import Table

from recon.sampling.analytic import GaussianMixture, coordinate_wasserstein
from recon.sampling.denoiser import Denoiser
from recon.sampling.diffusion import VPLinear
from recon.sampling.integrator import (
    DDIMIntegrator,
    DPMpp2sIntegrator,
    EulerIntegrator,
    EulerMaruyamaIntegrator,
    HeunIntegrator,
)
from recon.sampling.timer import CosineTimer


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
