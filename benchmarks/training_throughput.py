"""Training throughput of the shipped prior config: steps/s, samples/s and peak memory.

Times the real training step (``recon.prior.training.train_step``: autocast forward, loss,
backward, grad-norm clipping, AdamW, EMA update) against a bare no-grad forward pass on the
same batch, interleaved, median of repeated trials, and prints ``step / forward``.
Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, else the process's peak resident set
(``ru_maxrss``, includes the interpreter and libraries; printed before and after the timings).

    python benchmarks/training_throughput.py [--config configs/prior_64.yaml] [--batch N]
        [--repeats 6] [--threads N] [--device auto]
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import sys
import time

import torch

from recon.config.prior import load_prior_config
from recon.prior.batches import BatchSampler, make_batch
from recon.prior.network import build_network, count_parameters, resolve_device
from recon.prior.training import lr_at, train_step


def _maxrss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/prior_64.yaml")
    p.add_argument("--batch", type=int, default=None, help="default: training.batch_size")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_prior_config(args.config)
    tc = cfg.training.model_copy(update={"batch_size": args.batch or cfg.training.batch_size})
    device = resolve_device(args.device)
    amp = tc.amp if device.type == "cuda" else "none"
    size = cfg.data.image_size
    rss0 = _maxrss_mb()

    diffusion = cfg.diffusion.build()
    model = build_network(cfg.network, diffusion).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.betas,
                            weight_decay=tc.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    shape = (cfg.network.in_channels, *([size] * cfg.network.spatial_dims))
    data = torch.rand(4 * tc.batch_size, *shape)
    sampler = BatchSampler(len(data), tc.batch_size, tc.seed)

    def step_once(k: int) -> None:
        batch = make_batch(data, sampler, tc, diffusion.t_max, k, device)
        loss, _ = train_step(model, ema, opt, scaler, diffusion, batch, tc, k, lr_at(tc, k), amp)
        float(loss)  # the training loop syncs once per log interval; here once per step

    x0, t, eps = make_batch(data, sampler, tc, diffusion.t_max, 0, device)
    x_t = diffusion.add_noise(x0, t, eps)

    def forward_once() -> None:
        with torch.no_grad(), (torch.autocast("cuda", dtype=torch.bfloat16) if amp == "bf16"
                               else torch.autocast("cuda", enabled=False)):
            model(x_t, t)
        _sync(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for k in range(2):  # warm-up (allocator, oneDNN/cuDNN primitives)
        step_once(k)
        forward_once()
    steps, fwds = [], []
    for k in range(args.repeats):
        t0 = time.perf_counter()
        step_once(2 + k)
        _sync(device)
        steps.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        forward_once()
        fwds.append(time.perf_counter() - t0)
    step_s, fwd_s = statistics.median(steps), statistics.median(fwds)
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else _maxrss_mb())
    res = {"steps_per_s": 1 / step_s, "samples_per_s": tc.batch_size / step_s,
           "step_ms": 1e3 * step_s, "forward_ms": 1e3 * fwd_s, "step_over_forward": step_s / fwd_s,
           "peak_mb": peak}
    print(f"device {device} ({torch.get_num_threads()} threads), amp {amp}, batch {tc.batch_size} "
          f"x {cfg.network.in_channels}x{size}x{size}, {count_parameters(model):,} parameters")
    print(f"training step  {res['step_ms']:8.1f} ms  ({res['steps_per_s']:.2f} steps/s, "
          f"{res['samples_per_s']:.1f} samples/s; min {1e3 * min(steps):.1f} ms)")
    print(f"bare forward   {res['forward_ms']:8.1f} ms  (no grad; min {1e3 * min(fwds):.1f} ms)")
    print(f"step / forward {res['step_over_forward']:8.2f}")
    if device.type == "cuda":
        print(f"peak CUDA memory allocated {peak:.1f} MiB")
    else:
        print(f"peak RSS {peak:.0f} MiB (after imports: {rss0:.0f} MiB)")
    return res


if __name__ == "__main__":
    main()
