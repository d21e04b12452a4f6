"""Reconstruction quality at the native matrix: diffusion vs the naive pseudo-inverse.

For every T1 volume of a split (default: test) of the manifest, its central slices are measured
and reconstructed on their native in-plane grid (no resampling: a 256 x 256 slice stays
256 x 256, a 62 x 128 one stays 62 x 128) with each operator of the config, exactly as the
`reconstruct` flow does (`recon.reconstruct.reconstruction.reconstruct_prepared`); PSNR/SSIM against the
ground truth are computed on that grid (`recon.metrics.evaluate_stacks`). Prints one row per
volume x operator with NFE, seconds per slice and slices/s, then the worst-volume margins
against the bars (>= 3 dB PSNR and >= 0.05 SSIM over naive).

    python benchmarks/native_quality.py                       # configs/demo.yaml, test split
    python benchmarks/native_quality.py --split val --set reconstruct.steps=24   # tuning
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from recon.config import load_config
from recon.data.manifest import load_manifest, resolve
from recon.data.verify import verify
from recon.metrics import evaluate_stacks
from recon.reconstruct.reconstruction import reconstruct_prepared
from recon.reconstruct.volumes import prepare_volume, read_stacks

BARS = {"psnr": 3.0, "ssim": 0.05}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--split", default="test")
    p.add_argument("--max-slices", type=int, default=None, help="default: data.max_slices")
    p.add_argument("--volumes", nargs="*", default=None, help="ids (default: every T1 volume)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    d = cfg.data
    manifest = load_manifest(d.manifest)
    ok = {c.id for c in verify(manifest, d.data_root, split=args.split) if c.status == "ok"}
    entries = [v for v in manifest.volumes(args.split) if v.id in ok and v.modality == "T1w"
               and (args.volumes is None or v.id in args.volumes)]
    max_slices = args.max_slices or d.max_slices
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in entries:
            prepared = prepare_volume(resolve(v, d.data_root), d, Path(tmp) / "prepared",
                                      max_slices, name=v.id)
            for op in cfg.reconstruct.operators:
                out = reconstruct_prepared(prepared, op, cfg.reconstruct, cfg.prior,
                                           Path(tmp) / v.id / op.name, progress=False)
                s = read_stacks(out["stacks"])
                m = evaluate_stacks(s["truth"], s["naive"], s["recon"])
                rows.append({"volume": v.id, "shape": "x".join(map(str, s["truth"].shape[1:])),
                             "operator": op.name, **m, "nfe": out["nfe"],
                             "s_per_slice": out["seconds"] / out["slices"],
                             "slices_per_s": out["slices_per_s"], "slices": out["slices"]})
                r = rows[-1]
                print(f"{r['volume']:16s} {r['shape']:>8s} {r['operator']:8s} PSNR "
                      f"{r['psnr_naive']:6.2f} -> {r['psnr']:6.2f} ({r['gain_db']:+5.2f} dB)  SSIM "
                      f"{r['ssim_naive']:.3f} -> {r['ssim']:.3f} ({r['ssim'] - r['ssim_naive']:+.3f})"
                      f"  NFE {r['nfe']}  {r['s_per_slice']:.1f} s/slice  "
                      f"{r['slices_per_s']:.3f} slices/s  ({r['slices']} slices)", flush=True)
    rs = cfg.reconstruct
    print(f"\nnative matrix, split {args.split}, {rs.integrator.label} {rs.steps} steps, "
          f"{rs.n_samples} samples, sigma_y={rs.sigma_y:g}, prior {cfg.prior.checkpoint.name}")
    passed = True
    for op in dict.fromkeys(r["operator"] for r in rows):
        sel = [r for r in rows if r["operator"] == op]
        dpsnr = min(r["gain_db"] for r in sel)
        dssim = min(r["ssim"] - r["ssim_naive"] for r in sel)
        good = dpsnr >= BARS["psnr"] and dssim >= BARS["ssim"]
        passed &= good
        print(f"  {op:8s} worst volume: {dpsnr:+.2f} dB PSNR, {dssim:+.3f} SSIM over naive "
              f"({'meets' if good else 'MISSES'} >= +{BARS['psnr']} dB, >= +{BARS['ssim']})")
    return 0 if passed else 1


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"{time.perf_counter() - start:.0f} s")
    raise SystemExit(code)
