"""Throughput and memory of the reconstruction, against the network's own limit (issue 14).

Three measurements, each a ratio of timings taken in this one run:

1. ``nfe``: the whole guided sampler (integrator, proximal data consistency, x0 guard, noise)
   per network evaluation, over the bare forward of the shipped native prior on the same batch
   (``n_samples x batch_size`` chains of native 256x256 slices, 4x Fourier). Bar: <= 1.1.
2. ``workers``: the ``reconstruct`` flow on a 4-volume job (the public test volumes, every
   slice its own slab) on a local Dask cluster of 1 worker and of 2 workers (1 thread each),
   each from a fresh work dir (no cache). Bar: 2 workers >= 1.7x faster. Prints slices/s,
   seconds per volume and the extrapolation to a 300-volume cohort.
3. ``memory``: peak RSS of a fresh process reconstructing a 512x512xS volume (a synthetic head,
   prepared beforehand in another process) slab by slab, for S = 100 and 300. Bars: < 3 GB at
   300 slices, and less than linear growth (peak(300) / peak(100) < 3).

    python benchmarks/throughput.py                    # all three (about 25 min on 2 CPU cores)
    python benchmarks/throughput.py --parts nfe workers --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # before Prefect and Dask are imported
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
BARS = {"nfe_ratio": 1.1, "speedup": 1.7, "peak_gb": 3.0}
JOB = ["colin27_t1", "antspyx_r85_t1", "itk_kmeans_t1", "dipy_s0_b0"]


def nfe_overhead(device: str, steps: int, repeats: int) -> bool:
    from recon.config import load_config
    from recon.prior.network import resolve_device
    from recon.reconstruct.reconstruction import load_network
    from recon.sampling.cond_denoiser import CondDenoiser

    cfg = load_config(ROOT / "configs/demo.yaml", [f"reconstruct.device={device}"]).absolute(ROOT)
    rs = cfg.reconstruct
    dev = resolve_device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    net, diffusion = load_network(cfg.prior, dev)
    op_cfg = next(o for o in rs.operators if o.name == "fourier")
    shape = (256, 256)
    op = op_cfg.build(shape, rs.sigma_y, rs.seed).to(dev)
    batch = rs.batch_size
    truth = torch.rand(batch, 1, *shape, device=dev)
    y = op.measure(truth, generator=0)
    sampler = CondDenoiser(diffusion, net, rs.integrator.build(), rs.timer.build(steps), op,
                           rs.guidance_for(op_cfg).build(), x0_range=rs.x0_range)
    chains = batch * rs.n_samples
    x = torch.randn(chains, 1, *shape, device=dev)
    t = torch.full((chains,), 0.5, device=dev)

    def forward():
        with torch.no_grad():
            net(x, t)

    def sample():
        return sampler.sample(y, rs.n_samples, generator=torch.Generator(dev).manual_seed(0),
                              keep_samples=False)

    nfe = sample().nfe  # warm-up, and the evaluations one sample() makes
    fwd, per_nfe = [], []
    for _ in range(repeats):  # interleaved: drift in machine load hits both alike
        sync()
        t0 = time.perf_counter()
        for _ in range(nfe):
            forward()
        sync()
        fwd.append((time.perf_counter() - t0) / nfe)
        t0 = time.perf_counter()
        sample()
        sync()
        per_nfe.append((time.perf_counter() - t0) / nfe)
    f, s = statistics.median(fwd), statistics.median(per_nfe)
    ratio = s / f
    ok = ratio <= BARS["nfe_ratio"]
    print(f"\n1. sampler + guidance per NFE vs bare forward ({dev}, {chains} chains of "
          f"{shape[0]}x{shape[1]}, {rs.guidance_for(op_cfg).label}, {rs.integrator.label} x{steps}, "
          f"{nfe} NFE, median of {repeats})")
    print(f"   forward {f * 1e3:.1f} ms | sampler per NFE {s * 1e3:.1f} ms | ratio {ratio:.3f} "
          f"({'meets' if ok else 'MISSES'} <= {BARS['nfe_ratio']})")
    return ok


def workers_speedup(steps: int, max_slices: int, slab_slices: int) -> bool:
    from pipelines.settings import configure

    configure()  # Prefect's settings, before Prefect is imported
    from pipelines.flows import load_data, reconstruct
    from recon.config import load_config

    base = ["reconstruct.operators=[fourier]", "reconstruct.baselines=[]",
            f"reconstruct.steps={steps}", f"reconstruct.slab_slices={slab_slices}",
            "reconstruct.num_threads=1", "reconstruct.progress=false",
            f"data.max_slices={max_slices}", "runner.kind=dask",
            "runner.threads_per_worker=1", f"data.volumes=[{', '.join(JOB)}]",
            "tracking.experiment=throughput"]
    times, slices = {}, 0
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        for workers in (1, 2):
            cfg = load_config(ROOT / "configs/demo.yaml", [
                *base, f"work_dir={tmp}/w{workers}", f"runner.workers={workers}"]).absolute(ROOT)
            data = load_data(cfg)
            t0 = time.perf_counter()
            out = reconstruct(cfg, data=data)
            times[workers] = time.perf_counter() - t0
            slices = sum(o["slices"] for o in out["outputs"])
            used = max(o["workers"] for o in out["outputs"])
            print(f"   {workers} worker(s): {times[workers]:.1f} s for {len(out['outputs'])} volumes, "
                  f"{slices} slices ({used} worker process(es) ran slabs)")
    speedup = times[1] / times[2]
    ok = speedup >= BARS["speedup"]
    per_volume = times[2] / len(JOB)
    print(f"2. {len(JOB)}-volume job, 1 vs 2 Dask workers (1 thread each), {steps} steps, "
          f"{max_slices} central slices per volume, slabs of {slab_slices}:")
    print(f"   speedup {speedup:.2f}x ({'meets' if ok else 'MISSES'} >= {BARS['speedup']}) | "
          f"2 workers: {slices / times[2]:.3f} slices/s, {per_volume:.1f} s per volume, "
          f"300-volume cohort ~ {300 * per_volume / 3600:.2f} h at this setting")
    return ok


def synthetic_head(path: Path, shape: tuple[int, int, int]) -> Path:
    """A 512x512xS head-like NIfTI (ellipsoid with texture), written slice by slice."""
    import nibabel as nib

    if path.exists():
        return path
    nx, ny, nz = shape
    gx, gy = np.meshgrid(np.linspace(-1.2, 1.2, nx), np.linspace(-1.2, 1.2, ny), indexing="ij")
    vol = np.zeros(shape, np.float32)
    rng = np.random.default_rng(0)
    for k, gz in enumerate(np.linspace(-1.2, 1.2, nz)):
        r = gx ** 2 + gy ** 2 + 0.6 * gz ** 2
        vol[:, :, k] = (r < 1.0) * (100 + 40 * np.sin(6 * gx) * np.cos(5 * gy + gz)
                                    + 3 * rng.standard_normal((nx, ny)))
    nib.save(nib.Nifti1Image(vol, np.diag([0.5, 0.5, 0.6, 1.0])), path)
    return path


MEMORY_CHILD = """
import json, sys, time
from pathlib import Path
from recon.config import load_config
from recon.reconstruct.reconstruction import reconstruct_prepared
cfg = load_config(sys.argv[1], json.loads(sys.argv[2])).absolute(sys.argv[3])
op = next(o for o in cfg.reconstruct.operators if o.name == "fourier")
t0 = time.perf_counter()
out = reconstruct_prepared(sys.argv[4], op, cfg.reconstruct, cfg.prior, sys.argv[5], progress=False)
# this process's own high-water mark (ru_maxrss keeps the parent's across vfork + exec)
peak_kb = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
print(json.dumps({"peak_kb": peak_kb,
                  "slices": out["slices"], "seconds": time.perf_counter() - t0}))
"""


def memory(slice_counts: list[int], steps: int) -> bool:
    from recon.config import load_config
    from recon.reconstruct.volumes import prepare_volume

    overrides = ["reconstruct.operators=[fourier]", f"reconstruct.steps={steps}",
                 "reconstruct.n_samples=1", "reconstruct.batch_size=2", "reconstruct.slab_slices=32",
                 "reconstruct.num_threads=2", "reconstruct.device=cpu", "data.max_slices=null",
                 "reconstruct.warm_start=null"]  # the assembly is what grows, not a warm start
    peaks = {}
    with tempfile.TemporaryDirectory(prefix="memory-") as tmp:
        tmp = Path(tmp)
        for n in slice_counts:
            source = synthetic_head(tmp / f"head_{n}.nii", (512, 512, n))
            cfg = load_config(ROOT / "configs/demo.yaml", overrides).absolute(ROOT)
            prepared = prepare_volume(source, cfg.data, tmp / "prepared", None, name=f"head{n}")
            done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(ROOT / "configs/demo.yaml"),
                                   json.dumps(overrides), str(ROOT), str(prepared), str(tmp / f"out{n}")],
                                  capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-3000:])
            res = json.loads(done.stdout.strip().splitlines()[-1])
            peaks[n] = res["peak_kb"] / 2**20
            print(f"   512x512x{n}: {res['slices']} slices reconstructed in {res['seconds']:.0f} s, "
                  f"peak RSS {peaks[n]:.2f} GB")
    lo, hi = min(peaks), max(peaks)
    growth = peaks[hi] / peaks[lo]
    ok = peaks[hi] < BARS["peak_gb"] and growth < hi / lo
    meets = "meets" if peaks[hi] < BARS["peak_gb"] else "MISSES"
    print(f"3. memory: peak RSS {peaks[hi]:.2f} GB at {hi} slices ({meets} < {BARS['peak_gb']} GB); "
          f"{lo} -> {hi} slices: x{growth:.2f} for x{hi / lo:.1f} the slices "
          f"({'sublinear' if growth < hi / lo else 'NOT sublinear'})")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["nfe", "workers", "memory"],
                        choices=["nfe", "workers", "memory"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=8, help="sampler steps (nfe and workers)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-slices", type=int, default=16, help="workers: slices per volume")
    parser.add_argument("--slab-slices", type=int, default=4, help="workers: slices per slab")
    parser.add_argument("--slices", type=int, nargs="+", default=[100, 300], help="memory: S")
    parser.add_argument("--memory-steps", type=int, default=1)
    args = parser.parse_args()
    ok = True
    if "nfe" in args.parts:
        ok &= nfe_overhead(args.device, args.steps, args.repeats)
    if "workers" in args.parts:
        ok &= workers_speedup(args.steps, args.max_slices, args.slab_slices)
    if "memory" in args.parts:
        ok &= memory(args.slices, args.memory_steps)
    return 0 if ok else 1


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"{time.perf_counter() - start:.0f} s")
    raise SystemExit(code)
