"""Volumes that agree with themselves: the 2-D prior slice by slice, the same prior with the
slab's slices coupled by through-plane TV in each data-consistency step (DiffusionMBIR), and
3-D total variation, on the isotropic held-out volume (Colin27, 1 mm).

The test volume's central ``--slices`` axial slices are one slab (at their native matrix,
foreground-normalised as the prior was trained), measured as one volume with the same seeds for
every method:

- ``mask``: the config's random-pixel mask (the same pattern on every slice), sigma_y 0.01;
- ``kykz_fourier``: 4x variable-density undersampling of the (kz, ky) phase-encode plane, the
  readout (left-right) fully sampled, as a 3-D MPRAGE is accelerated;
- ``slice_drop``: every other slice missing (through-plane super-resolution).

Methods:

- ``2-D``: the config's sampler with ``coupling: none`` (each slice's prior on its own; the data
  consistency is still the volume's), started from the operator's in-plane TV solution noised to
  t0, as the config says;
- ``3-D coupled``: the same sampler with ``coupling: tv_z`` (the weight chosen on the validation
  split from ``--weights``), started from the better of TV and 3-D TV on the validation split
  noised to t0;
- ``tv3d``: total variation over the volume (sigpy).

Every lam and weight is chosen on the validation split's 3-D volumes (not its single slices).
Prints PSNR / SSIM (volume PSNR over the slab, mean slice SSIM), the mean |d/dz| of the error
volume (how much the error flickers from slice to slice) and the seconds per slice; then the
bars: coupled >= +1 dB over 2-D and over 3-D TV on every operator, and the error's mean |d/dz|
down by >= 30 % against 2-D.

    python benchmarks/volume3d.py                    # 12 slices, configs/demo.yaml's sampler
    python benchmarks/volume3d.py --slices 8 --operators slice_drop --weights 1e-3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from recon.config import BaselineConfig, CouplingConfig, OperatorConfig, load_config
from recon.data.manifest import load_manifest, resolve
from recon.data.verify import verify
from recon.metrics import evaluate_stacks
from recon.reconstruct.reconstruction import reconstruct_prepared, tune_baseline
from recon.reconstruct.volumes import PreparedVolume, prepare_volume, read_stacks

OPERATORS = {"mask": None,  # the config's own
             "kykz_fourier": {"acceleration": 4, "center_fraction": 0.08, "kind": "random"},
             "slice_drop": {"factor": 2}}
BARS = {"over_2d_db": 1.0, "over_tv3d_db": 1.0, "dz_drop": 0.30}


def z_flicker(truth: np.ndarray, recon: np.ndarray) -> float:
    """Mean ``|e[s+1] - e[s]|`` of the error ``e = recon - truth`` over the slab ``(S, H, W)``."""
    e = np.asarray(recon, np.float64) - np.asarray(truth, np.float64)
    return float(np.abs(np.diff(e, axis=0)).mean()) if len(e) > 1 else float("nan")


def prepare(manifest, cfg, split: str, slices: int, tmp: Path, ids=None) -> list[Path]:
    d = cfg.data
    ok = {c.id for c in verify(manifest, d.data_root, split=split) if c.status == "ok"}
    return [prepare_volume(resolve(v, d.data_root), d, tmp / "prepared" / split, slices, name=v.id)
            for v in manifest.volumes(split) if v.id in ok and v.modality == "T1w"
            and (ids is None or v.id in ids)]


def measure(prepared, op, settings, prior, out_dir, baseline) -> dict:
    """Reconstruct and score one slab: PSNR / SSIM, the error's flicker, seconds per slice."""
    out = reconstruct_prepared(prepared, op, settings, prior, out_dir, progress=False,
                               baseline=baseline)
    st = read_stacks(out["stacks"])
    m = evaluate_stacks(st["truth"], st["naive"], st["recon"])
    return {**m, "dz": z_flicker(st["truth"], st["recon"]),
            "s_per_slice": out["seconds"] / out["slices"], "nfe": out["nfe"]}


def with_lam(baseline: BaselineConfig, lam: float) -> BaselineConfig:
    return baseline.model_copy(update={"params": {**baseline.params, "lam": lam}})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--volume", default="colin27_t1", help="the isotropic test volume")
    p.add_argument("--slices", type=int, default=12, help="central slices: the slab")
    p.add_argument("--operators", nargs="*", default=list(OPERATORS))
    p.add_argument("--weights", nargs="*", type=float, default=[3e-4, 1e-3, 3e-3, 1e-2],
                   help="coupling weights (mu_z) tried on the validation split")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [*args.overrides, f"reconstruct.num_threads={args.threads}",
                                    "reconstruct.progress=false", "reconstruct.slab_slices=null",
                                    "reconstruct.coupling.halo=0"])
    rs = cfg.reconstruct
    manifest = load_manifest(cfg.data.manifest)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        test = prepare(manifest, cfg, "test", args.slices, tmp, [args.volume])
        val = [v for v in prepare(manifest, cfg, cfg.data.val_split, args.slices, tmp)
               if len(PreparedVolume.open(v).indices) >= 3]  # volumes, not single slices
        if not test:
            raise SystemExit(f"test volume {args.volume} is not available (verify the manifest)")
        print(f"test: {args.volume}, {args.slices} central slices; lam and the coupling weight "
              f"chosen on {len(val)} validation volumes", flush=True)
        for name in args.operators:
            own = next((o for o in rs.operators if o.name == name), None)
            op = own or OperatorConfig(name=name, params=OPERATORS[name])
            if own is None:  # the config's guidance for its operators (TV weight) does not apply
                op = op.model_copy(update={"guidance": rs.operators[0].guidance})
            lam, val_db = {}, {}
            for b in ("tv", "tv3d"):
                t0 = time.perf_counter()
                r = tune_baseline(val, op, BaselineConfig(name=b), rs.sigma_y, rs.seed)
                lam[b], val_db[b] = r["lam"], max(r["scores"].values())
                print(f"{name:12s} {b:5s} lam = {r['lam']:.4g} (val PSNR {val_db[b]:.2f} dB; "
                      f"{time.perf_counter() - t0:.0f} s)", flush=True)
            op = op.model_copy(update={"lam": {**op.lam, **lam}})  # the warm starts'
            settings = rs.model_copy(update={"operators": [op]})
            # the coupled sampler starts from the better of TV and 3-D TV on the validation split
            warm3d = rs.warm_start and rs.warm_start.model_copy(
                update={"baseline": BaselineConfig(name=max(val_db, key=val_db.get))})

            def run(prepared, coupling, baseline=None, label="", op=op, settings=settings,
                    warm3d=warm3d):
                s = settings.model_copy(update={"coupling": coupling})
                if coupling.name != "none":  # a volume's sampler starts from a volume's solution
                    s = s.model_copy(update={"warm_start": warm3d})
                return measure(prepared, op, s, cfg.prior, tmp / "out" / label, baseline)

            scores = {}
            for w in args.weights:
                t0 = time.perf_counter()
                coupled = CouplingConfig(name="tv_z", weight=w, halo=0)
                scores[w] = np.mean([run(v, coupled, label=f"val-{name}-{w}-{i}")["psnr"]
                                     for i, v in enumerate(val)])
                print(f"{name:12s} tv_z({w:.4g}): val PSNR {scores[w]:.2f} dB "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
            weight = max(scores, key=scores.get)
            methods = {"2-D": (CouplingConfig(name="none"), None),
                       f"3-D coupled tv_z({weight:.4g}) from {warm3d.baseline.name}": (
                           CouplingConfig(name="tv_z", weight=weight, halo=0), None),
                       f"tv3d(lam={lam['tv3d']:.4g})": (
                           CouplingConfig(name="none"), with_lam(BaselineConfig(name="tv3d"),
                                                                 lam["tv3d"]))}
            for label, (coupling, baseline) in methods.items():
                r = run(test[0], coupling, baseline, label=f"test-{name}-{label}")
                rows.append({"operator": name, "method": label, **r})
                print(f"{args.volume:12s} {name:12s} {label:34s} PSNR {r['psnr_naive']:6.2f} -> "
                      f"{r['psnr']:6.2f}  SSIM {r['ssim_naive']:.3f} -> {r['ssim']:.3f}  "
                      f"|dz err| {r['dz']:.4f}  NFE {r['nfe']:3d}  {r['s_per_slice']:6.2f} "
                      f"s/slice", flush=True)
    print(f"\n{args.volume}, {args.slices} central slices at the native matrix, sigma_y "
          f"{rs.sigma_y:g}, {rs.n_samples} posterior samples averaged, {rs.integrator.label} "
          f"x{rs.steps}, prior {cfg.prior.checkpoint.name}; lam and weights on the val split")
    passed = True
    for name in args.operators:
        by = {r["method"].split(" tv_z")[0].split("(")[0]: r for r in rows if r["operator"] == name}
        two, three, tv3d = by["2-D"], by["3-D coupled"], by["tv3d"]
        over_2d, over_tv = three["psnr"] - two["psnr"], three["psnr"] - tv3d["psnr"]
        drop = 1.0 - three["dz"] / two["dz"]
        good = (over_2d >= BARS["over_2d_db"], over_tv >= BARS["over_tv3d_db"],
                drop >= BARS["dz_drop"])
        passed &= all(good)
        verdict = ["meets" if g else "MISSES" for g in good]
        print(f"  {name:12s} coupled: {over_2d:+.2f} dB over 2-D ({verdict[0]} >= +1), "
              f"{over_tv:+.2f} dB over 3-D TV ({verdict[1]} >= +1); error |d/dz| "
              f"{100 * drop:+.0f} % lower than 2-D ({verdict[2]} >= 30 %); SSIM "
              f"{two['ssim']:.3f} / {three['ssim']:.3f} / {tv3d['ssim']:.3f} (2-D / coupled / "
              f"3-D TV)")
    return 0 if passed else 1


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"{time.perf_counter() - start:.0f} s")
    raise SystemExit(code)
