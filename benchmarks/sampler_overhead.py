"""Sampler overhead: one integrator step, and one guided evaluation, vs the bare network forward.

For a small conv network on a batch of 64x64 images, prints for each integrator
``ratio = (step time / NFE per step) / forward time``; 1.00 means the integrator adds nothing
beyond its network calls. Then, with the shipped native prior on slices of ``--guided-size``,
the cost of one guided eps evaluation (network + guidance: the proximal data consistency for
mask, blur and 4x k-space, DPS with its VJP) over the bare forward of that prior: proximal data
consistency must stay <= 1.2. Both timings of a ratio are measured in the same run,
interleaved, with the median of repeated trials.

    python benchmarks/sampler_overhead.py [--batch 16] [--size 64] [--repeats 20] [--device auto]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from torch import nn

from recon.prior.network import load_prior, resolve_device
from recon.registry import INTEGRATORS, OPERATORS
from recon.sampling.cond_denoiser import CondDenoiser
from recon.sampling.denoiser import Denoiser
from recon.sampling.diffusion import VPLinear
from recon.sampling.guidance import DPS, DataConsistency
from recon.sampling.integrator import DDIMIntegrator
from recon.sampling.timer import LinearTimer


class SmallConvNet(nn.Module):
    """A small eps-network: 4 conv layers with a time-dependent bias."""

    def __init__(self, channels: int = 32):
        super().__init__()
        self.inp = nn.Conv2d(1, channels, 3, padding=1)
        self.body = nn.Sequential(*[m for _ in range(2) for m in
                                    (nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))])
        self.out = nn.Conv2d(channels, 1, 3, padding=1)
        self.time = nn.Linear(1, channels)

    def forward(self, x, t):
        h = self.inp(x) + self.time(t[:, None])[:, :, None, None]
        return self.out(torch.nn.functional.silu(self.body(h)))


def _median_time(fn, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prior", default="checkpoints/prior_native.pt")
    parser.add_argument("--guided-size", type=int, default=256)
    parser.add_argument("--guided-batch", type=int, default=2)
    args = parser.parse_args()
    device = resolve_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    net = SmallConvNet().to(device).eval()
    diffusion = VPLinear()
    x = torch.randn(args.batch, 1, args.size, args.size, device=device)
    t = torch.full((args.batch,), 0.5, device=device)
    generator = torch.Generator(device=device).manual_seed(0)

    rows = []
    with torch.inference_mode():
        for _ in range(3):
            net(x, t)  # warm-up
        for name, cls in INTEGRATORS.items():
            integrator = DDIMIntegrator(eta=1.0) if name == "ddim" else cls()
            denoiser = Denoiser(diffusion, net, integrator, LinearTimer(10))
            times = denoiser.times.tolist()
            one_step = functools.partial(integrator.step, diffusion, denoiser.eps, x, times[4],
                                         times[5], generator)
            forward, step = [], []
            for _ in range(args.repeats):  # interleave so drift in machine load hits both alike
                forward.append(_median_time(lambda: net(x, t), 1, sync))
                step.append(_median_time(one_step, 1, sync))
            f, s = statistics.median(forward), statistics.median(step)
            rows.append((repr(integrator), integrator.nfe, f, s, s / integrator.nfe / f))

    print(f"device={device} batch={args.batch} size={args.size} repeats={args.repeats}")
    print(f"{'integrator':32} {'NFE':>4} {'forward ms':>11} {'step ms':>9} {'step/NFE/forward':>17}")
    for name, nfe, f, s, ratio in rows:
        print(f"{name:32} {nfe:>4} {f * 1e3:>11.2f} {s * 1e3:>9.2f} {ratio:>17.3f}")
    guided_overhead(args, device, sync)


def guided_overhead(args, device, sync) -> None:
    """One guided eps evaluation over one bare forward of the shipped prior (same batch)."""
    net, diffusion, _ = load_prior(args.prior, device)
    shape = (args.guided_size, args.guided_size)
    x = torch.randn(args.guided_batch, 1, *shape, device=device)
    truth = torch.rand(args.guided_batch, 1, *shape, device=device)
    t_val = 0.3
    t = torch.full((args.guided_batch,), t_val, device=device)
    print(f"\nguided evaluation / bare forward: {args.prior}, batch {args.guided_batch}, "
          f"{shape[0]}x{shape[1]}, t={t_val}")
    print(f"{'guidance':28} {'operator':8} {'forward ms':>11} {'guided ms':>10} {'ratio':>7} {'VJP':>4}")
    for op_name, params in (("mask", {"keep": 0.3}), ("blur", {"sigma": 2.0}),
                            ("fourier", {"acceleration": 4, "center_fraction": 0.08})):
        op = OPERATORS[op_name](shape, **params, sigma_y=0.01, seed=0).to(device)
        y = op.measure(truth, generator=0)
        for guidance in (DataConsistency(), DPS(1.0)):
            sampler = CondDenoiser(diffusion, net, DDIMIntegrator(eta=1.0), LinearTimer(10), op,
                                   guidance, x0_range=(0.0, 1.5))
            eps_y = sampler.cond_eps(y)

            def bare():
                with torch.no_grad():
                    net(x, t)

            def guided(eps_y=eps_y):
                with torch.no_grad():
                    eps_y(x, t_val)

            bare(), guided()  # warm-up
            forward, cost = [], []
            for _ in range(args.repeats):
                forward.append(_median_time(bare, 1, sync))
                cost.append(_median_time(guided, 1, sync))
            f, g = statistics.median(forward), statistics.median(cost)
            print(f"{guidance!r:28} {op_name:8} {f * 1e3:>11.1f} {g * 1e3:>10.1f} {g / f:>7.3f} "
                  f"{guidance.vjps_per_eval:>4}")


if __name__ == "__main__":
    main()
