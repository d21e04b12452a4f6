"""Sampler overhead: one integrator step vs the bare network forward pass it wraps.

For a small conv network on a batch of 64x64 images, prints for each integrator
``ratio = (step time / NFE per step) / forward time``; 1.00 means the integrator adds nothing
beyond its network calls. Both timings are measured in the same run, interleaved, with the
median of repeated trials.

    python benchmarks/sampler_overhead.py [--batch 16] [--size 64] [--repeats 20] [--device auto]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from torch import nn

from recon.denoiser import Denoiser
from recon.diffusion import VPLinear
from recon.integrator import INTEGRATORS, DDIMIntegrator
from recon.network import resolve_device
from recon.timer import LinearTimer


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


if __name__ == "__main__":
    main()
