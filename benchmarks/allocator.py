"""Freed memory kept for reuse (`recon.allocator.keep_freed_memory`) against glibc's default, on
the multi-coil data-consistency step of a measured scan.

One slice of a raw k-space acquisition (default: fastMRI's measured 16-coil 384 x 396 T2
slice of the validation split) undersampled 4x as `benchmarks/kspace.py` does, its coil maps by
ESPIRiT; then, in two fresh processes with the same threads, one with glibc's default
allocator and one with `keep_freed_memory()`: the normal operator `A^H A` and one
data-consistency prox (10 conjugate-gradient iterations) on 2 chains, with the process's minor
page faults over the timed calls. Prints both and their ratio, measured in this run.

    python benchmarks/allocator.py
    python benchmarks/allocator.py --volume pyqmri_vfa_brain --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from recon.config import OperatorConfig, load_config
from recon.data.manifest import load_manifest, resolve
from recon.reconstruct.raw import scan_problems
from recon.reconstruct.scans import PreparedScan, prepare_scan


def timed(fn, repeats: int) -> tuple[float, int]:
    """Seconds per call and minor page faults over ``repeats`` calls (after one warm-up)."""
    fn()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    seconds = (time.perf_counter() - start) / repeats
    return seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) // repeats


def measure(volume: str, threads: int, keep: bool, repeats: int) -> dict:
    """This process's timings of the slice's normal operator and prox."""
    if keep:
        from recon.allocator import keep_freed_memory

        keep_freed_memory()
    torch.set_num_threads(threads)
    cfg = load_config("configs/kspace.yaml")
    entry = next(v for v in load_manifest(cfg.data.manifest).volumes() if v.id == volume)
    op_cfg = OperatorConfig(name="fourier", params={"acceleration": 4, "center_fraction": 0.08,
                                                    "kind": "random"})
    with tempfile.TemporaryDirectory() as tmp:
        scan = PreparedScan.open(prepare_scan(resolve(entry, cfg.data.data_root), tmp,
                                              max_slices=1, name=volume))
        problem = next(scan_problems(scan, op_cfg, seed=0)[1])
    op = problem.operator
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, *op.mask.shape, dtype=torch.complex64, generator=gen)
    y = problem.y.expand(2, *problem.y.shape[1:])
    with torch.inference_mode():
        normal = timed(lambda: op.normal(x), repeats)
        prox = timed(lambda: op.prox(x, y, 0.05, steps=10), max(1, repeats // 5))
    return {"coils": int(op.coil_maps.shape[0]), "shape": list(op.mask.shape),
            "normal": normal, "prox": prox}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--volume", default="fastmri_axt2_kspace")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--child", choices=("default", "keep"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.volume, args.threads, args.child == "keep", args.repeats)))
        return 0
    runs = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", mode,
                              "--volume", args.volume, "--threads", str(args.threads),
                              "--repeats", str(args.repeats)],
                             check=True, capture_output=True, text=True).stdout
        runs[mode] = json.loads(out.strip().splitlines()[-1])
    d, k = runs["default"], runs["keep"]
    print(f"{args.volume}: {d['coils']} coils, {d['shape'][0]} x {d['shape'][1]}, 2 chains, "
          f"{args.threads} threads")
    print("| call | glibc default | freed memory kept | ratio |\n| --- | --- | --- | --- |")
    for name, label in (("normal", "A^H A"), ("prox", "prox (10 CG iterations)")):
        (sd, fd), (sk, fk) = d[name], k[name]
        print(f"| {label} | {1e3 * sd:.1f} ms, {fd} faults | {1e3 * sk:.1f} ms, {fk} faults | "
              f"{sd / sk:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
