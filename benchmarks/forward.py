"""The prior's forward pass on a CPU: what each way of running it buys, and what it costs in PSNR.

1. Speed, all ratios against fp32 eager in this one run (the shipped prior on a batch of
   ``n_samples x 1 x 256 x 256`` under ``torch.inference_mode``, the median of ``--repeats``):
   channels_last weights, bf16 autocast (oneDNN: AVX512-BF16 / AMX where the CPU has them), both,
   and with ``--compile`` ``torch.compile`` (inductor) of fp32 and of bf16 + channels_last, its
   compile seconds printed apart. The largest ``|eps_bf16 - eps_fp32|`` beside each.
2. Quality: the config's own sampler (warm start, data consistency, n samples) on the validation
   volumes' central slices, every operator, once with ``reconstruct.precision: fp32`` and once
   with ``bf16`` (``recon.prior.network.autocast``; the sampler's arithmetic, FFTs and data
   consistency stay float32; channels_last weights in both, as `load_network` gives them on a
   CPU): PSNR mean and worst change, and the seconds per slice as a ratio.
   The bar a change must meet to be kept: |PSNR change| < 0.05 dB on every operator.

    python benchmarks/forward.py                        # configs/demo.yaml, 2 threads
    python benchmarks/forward.py --compile --skip-quality
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from methods import prepare_split  # benchmarks/methods.py, beside this script

from recon.config import load_config
from recon.data.manifest import load_manifest
from recon.metrics import evaluate_stacks
from recon.prior.network import autocast
from recon.reconstruct.reconstruction import reconstruct_prepared
from recon.reconstruct.slices import load_network
from recon.reconstruct.volumes import read_stacks

BAR_DB = 0.05


def timed(f, repeats: int) -> float:
    """Median seconds of ``f()`` over ``repeats`` calls after one warm-up call."""
    f()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(network: torch.nn.Module, shape: tuple[int, ...], repeats: int, compile_: bool) -> None:
    x, t = torch.randn(shape), torch.full((shape[0],), 0.5)
    contiguous = network.to(memory_format=torch.contiguous_format)
    with torch.inference_mode():
        reference = contiguous(x, t)
        rows = []
        for label, fmt, precision in (("fp32 eager", torch.contiguous_format, "fp32"),
                                      ("channels_last", torch.channels_last, "fp32"),
                                      ("bf16 autocast", torch.contiguous_format, "bf16"),
                                      ("bf16 autocast + channels_last", torch.channels_last,
                                       "bf16")):
            net = network.to(memory_format=fmt)
            with autocast(torch.device("cpu"), precision):
                seconds = timed(lambda net=net: net(x, t), repeats)
                out = net(x, t).float()
            rows.append((label, seconds, float((out - reference).abs().max()), None))
        if compile_:
            for label, fmt, precision in (("torch.compile fp32", torch.contiguous_format, "fp32"),
                                          ("torch.compile bf16 + channels_last",
                                           torch.channels_last, "bf16")):
                net = network.to(memory_format=fmt)
                with autocast(torch.device("cpu"), precision):
                    start = time.perf_counter()
                    compiled = torch.compile(net)
                    compiled(x, t)
                    build = time.perf_counter() - start
                    seconds = timed(lambda c=compiled: c(x, t), repeats)
                    out = compiled(x, t).float()
                rows.append((label, seconds, float((out - reference).abs().max()), build))
        network.to(memory_format=torch.channels_last)  # as load_network gives it on a CPU
    base = rows[0][1]
    print(f"\nthe prior's forward on {' x '.join(map(str, shape))}, {torch.get_num_threads()} "
          f"threads, median of {repeats}")
    print("| variant | ms | speed-up over fp32 eager | max abs change of eps | compile s |\n"
          "| --- | --- | --- | --- | --- |")
    for label, seconds, change, build in rows:
        print(f"| {label} | {1e3 * seconds:.0f} | {base / seconds:.2f}x | {change:.4f} | "
              f"{'' if build is None else f'{build:.0f}'} |")


def quality(cfg, slices: int) -> int:
    rs = cfg.reconstruct
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        val = prepare_split(load_manifest(cfg.data.manifest), cfg, cfg.data.val_split, slices, tmp)
        print(f"\n{cfg.name}'s sampler on {len(val)} validation volumes x {slices} slices, "
              f"{rs.n_samples} samples: bf16 against fp32")
        print("| operator | PSNR fp32 | PSNR bf16 | change mean | change worst | s / slice bf16 / "
              "fp32 |\n| --- | --- | --- | --- | --- | --- |")
        for op in rs.operators:
            scores, seconds = {}, {}
            for precision in ("fp32", "bf16"):
                settings = rs.model_copy(update={"precision": precision})
                psnrs, total, n = [], 0.0, 0
                for v in val:
                    out = reconstruct_prepared(v, op, settings, cfg.prior,
                                               Path(tmp) / op.name / precision / v.name,
                                               progress=False)
                    s = read_stacks(out["stacks"])
                    psnrs.append(evaluate_stacks(s["truth"], s["naive"], s["recon"])["psnr"])
                    total, n = total + out["seconds"], n + out["slices"]
                scores[precision], seconds[precision] = np.array(psnrs), total / n
            change = scores["bf16"] - scores["fp32"]
            worst = float(change[np.argmax(np.abs(change))])
            failed += abs(worst) >= BAR_DB
            print(f"| {op.name} | {scores['fp32'].mean():.2f} | {scores['bf16'].mean():.2f} | "
                  f"{change.mean():+.3f} | {worst:+.3f} "
                  f"({'meets' if abs(worst) < BAR_DB else 'MISSES'} < {BAR_DB}) | "
                  f"{seconds['bf16'] / seconds['fp32']:.2f} |", flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--slices", type=int, default=2, help="central slices per validation volume")
    p.add_argument("--compile", action="store_true", help="also torch.compile (a minute each)")
    p.add_argument("--skip-quality", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"reconstruct.num_threads={args.threads}",
                                    "reconstruct.progress=false", "reconstruct.device=cpu"])
    network, _ = load_network(cfg.prior, "cpu")
    speed(network, (cfg.reconstruct.n_samples, 1, 256, 256), args.repeats, args.compile)
    return 0 if args.skip_quality else int(quality(cfg, args.slices) > 0)


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"{time.perf_counter() - start:.0f} s")
    raise SystemExit(code)
