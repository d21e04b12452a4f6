"""Raw multi-coil k-space at 4x and 8x: the diffusion prior against zero-filled RSS, SENSE and
L1-wavelet (sigpy.mri.app), scored against the root-sum-of-squares of the fully sampled data.

Every acquisition of the test split of `data_manifests/public_kspace.yaml` (simulated 8-coil
ISMRMRD files of held-out subjects and PyQMRI's real 13-coil brain) is prepared as the
`reconstruct` flow prepares it (`recon.raw`: noise whitening or corner estimate, readout
oversampling removed), undersampled retrospectively with fastMRI-style random Cartesian lines
(4x with 8 % centre lines, 8x with 4 %), and reconstructed slice by slice on its own matrix
with coil maps from its calibration lines. SENSE and L1-wavelet run twice: with lam chosen
per acceleration on the validation acquisitions (never the test ones; rows "val lam") and
with lam chosen per slice from the slice's own noise level (rows "lam by discrepancy",
`recon.baselines.discrepancy_lambda`: ||y - A x||^2 <= max(tau m sigma^2, that of lam = 0 +
kappa m sigma^2), the chosen lam printed per slice). Prints one row
per volume x acceleration x method (measured acquisitions marked), then per baseline, rule and
acceleration the mean PSNR over the measured and over the simulated acquisitions, then per
acceleration the worst-volume margins of the diffusion sampler over zero-filled (bar >= 5 dB)
and over the best L1-wavelet row (bar >= 1 dB), and the bar that no classical row is below
zero-filled on a measured acquisition (one whose manifest entry is not `convert:
simulate_kspace`). Ceiling: the fully sampled data combined with the same maps, against the
same RSS (what a perfect magnitude reconstruction scores; the RSS keeps the noise floor of the
coils).

    python benchmarks/kspace.py --threads 1                  # configs/kspace.yaml
    python benchmarks/kspace.py --phase lowres sense none    # how the image phase is handled
    python benchmarks/kspace.py --volumes pyqmri_vfa_brain --accelerations 4x --rules   # val lam only
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from recon import coils
from recon.baselines import LAM_RULES
from recon.config import BaselineConfig, OperatorConfig, load_config
from recon.data.manifest import DataError, load_manifest, resolve
from recon.data.verify import verify
from recon.metrics import evaluate_stacks, psnr, worst_margins
from recon.raw import PHASES, scan_problems
from recon.reconstruction import reconstruct_prepared, tune_baseline
from recon.scans import PreparedScan, crop_phase, prepare_scan
from recon.volumes import read_stacks

ACCELERATIONS = {"4x": {"acceleration": 4, "center_fraction": 0.08},
                 "8x": {"acceleration": 8, "center_fraction": 0.04}}
BASELINES = ("sense", "l1_wavelet")
BARS = {"over_naive_db": 5.0, "over_l1_db": 1.0}
SIMULATED = ("simulate_kspace",)
"""Manifest conversions that simulate an acquisition; every other k-space entry is measured."""


class _ChosenLam(logging.Handler):
    """Collects the lam a rule chose per slice (``recon.baselines``' log records)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lams: list[float] = []

    def emit(self, record):
        if hasattr(record, "lam"):
            self.lams.append(record.lam)


def _prepare(manifest, root: Path, split: str, max_slices: int, tmp: Path,
             ids: list[str] | None = None) -> list[Path]:
    ok = {c.id for c in verify(manifest, root, split=split) if c.status == "ok"}
    return [prepare_scan(resolve(v, root), tmp / split, max_slices, name=v.id)
            for v in manifest.volumes(split) if v.id in ok and v.kind == "kspace"
            and (ids is None or v.id in ids)]


def _ceiling(prepared: Path, op: OperatorConfig, seed: int) -> float:
    """Mean PSNR of the fully sampled data combined with the maps of the undersampled data."""
    scan = PreparedScan.open(prepared)
    scale, problems = scan_problems(scan, op, seed)
    scores = []
    for rank, pr in enumerate(problems):
        full = coils.centered_ifft(scan.kspace[rank]) / scale
        x = crop_phase(np.abs(np.sum(np.conj(pr.operator.coil_maps.numpy()) * full, 0)),
                       pr.reference.shape[-1])
        scores.append(float(psnr(torch.from_numpy(x)[None, None].double(),
                                 torch.from_numpy(pr.reference)[None, None].double())))
    return sum(scores) / len(scores)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/kspace.yaml")
    p.add_argument("--max-slices", type=int, default=2, help="central slices per acquisition")
    p.add_argument("--accelerations", nargs="*", default=list(ACCELERATIONS))
    p.add_argument("--volumes", nargs="*", default=None, help="test ids (default: all)")
    p.add_argument("--phase", nargs="*", default=["lowres"], choices=PHASES,
                   help="phase handling(s) of the diffusion sampler (recon.raw.PHASES)")
    p.add_argument("--rules", nargs="*", default=list(LAM_RULES), choices=LAM_RULES,
                   help="lam rules the baselines also run with (recon.baselines.LAM_RULES; "
                        "none: the val lam only)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    chosen = _ChosenLam()
    logger = logging.getLogger("recon.baselines")
    logger.addHandler(chosen)
    logger.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [*args.overrides, f"reconstruct.num_threads={args.threads}",
                                    "reconstruct.progress=false"])
    rs, root = cfg.reconstruct, cfg.data.data_root
    manifest = load_manifest(cfg.data.manifest)
    measured = {v.id for v in manifest.volumes("test") if v.provenance.convert not in SIMULATED}
    rows, ceilings = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        test = _prepare(manifest, root, "test", args.max_slices, tmp, args.volumes)
        val = _prepare(manifest, root, cfg.data.val_split, rs.tune_slices, tmp)
        print(f"test: {', '.join(PreparedScan.open(t).name for t in test)}; lam chosen on "
              f"{', '.join(PreparedScan.open(v).name for v in val)}", flush=True)
        for acc in args.accelerations:
            op = OperatorConfig(name="fourier", params={**ACCELERATIONS[acc], "kind": "random"})
            baselines = []
            for name in BASELINES:
                t0 = time.perf_counter()
                r = tune_baseline(val, op, BaselineConfig(name=name), rs.sigma_y, rs.seed)
                baselines.append((f"{name} val lam {r['lam']:.2g}", BaselineConfig(
                    name=name, params={"lam": r["lam"]})))
                baselines += [(f"{name} lam by {rule}", BaselineConfig(
                    name=name, params={"lam": rule})) for rule in args.rules]
                print(f"{acc} {name:10s} lam = {r['lam']:.4g} (best mean PSNR "
                      f"{max(r['scores'].values()):.2f} dB on {r['slices']} validation slices; "
                      f"{time.perf_counter() - t0:.0f} s)", flush=True)
            for prepared in test:
                name = PreparedScan.open(prepared).name
                try:
                    ceilings[(name, acc)] = _ceiling(prepared, op, rs.seed)
                except DataError as err:  # e.g. too few calibration lines for ESPIRiT
                    print(f"{name:20s} {acc}: not reconstructed: {err}", flush=True)
                    continue
                runs = [(f"diffusion ({ph} phase)", None, ph) for ph in args.phase]
                runs += [(label, b, "lowres") for label, b in baselines]
                for label, baseline, phase in runs:
                    chosen.lams.clear()
                    out = reconstruct_prepared(prepared, op, rs.model_copy(update={
                        "kspace_phase": phase}), cfg.prior, tmp / "out" / name / acc / label,
                        progress=False, baseline=baseline)
                    s = read_stacks(out["stacks"])
                    m = evaluate_stacks(s["truth"], s["naive"], s["recon"])
                    rows.append({"volume": name, "operator": acc, "method": label,
                                 "kind": "baseline" if baseline else "diffusion",
                                 "measured": name in measured, **m, "nfe": out["nfe"],
                                 "s_per_slice": out["seconds"] / out["slices"],
                                 "shape": "x".join(map(str, s["truth"].shape[1:]))})
                    r = rows[-1]
                    lams = f"  lam {' '.join(f'{v:.2g}' for v in chosen.lams)}" if chosen.lams else ""
                    print(f"{name:20s}{'*' if r['measured'] else ' '} {r['shape']:>8s} {acc} "
                          f"{label:32s} PSNR {r['psnr_naive']:6.2f} -> {r['psnr']:6.2f}  SSIM "
                          f"{r['ssim_naive']:.3f} -> {r['ssim']:.3f}  NFE {r['nfe']:3d}  "
                          f"{r['s_per_slice']:6.1f} s/slice  (ceiling {ceilings[(name, acc)]:.2f})"
                          f"{lams}", flush=True)
    print(f"\ntest split, {args.max_slices} central slices per acquisition (* measured: "
          f"{', '.join(sorted(measured)) or 'none'}), {rs.n_samples} posterior samples averaged, "
          f"{rs.integrator.label} x{rs.steps}, prior {cfg.prior.checkpoint.name}; PSNR against the "
          f"fully sampled RSS")
    _rule_summary(rows, args.accelerations)
    passed = True
    l1 = [r["method"] for r in rows if r["method"].startswith("l1_wavelet")]
    for acc in args.accelerations:
        for ph in args.phase:
            label = f"diffusion ({ph} phase)"
            naive_db = worst_margins(rows, label).get(acc, float("nan"))
            l1_db = worst_margins(rows, label, l1).get(acc, float("nan"))
            good = naive_db >= BARS["over_naive_db"] and l1_db >= BARS["over_l1_db"]
            passed &= good
            print(f"  {acc} {label}: worst volume {naive_db:+.2f} dB over zero-filled "
                  f"({'meets' if naive_db >= BARS['over_naive_db'] else 'MISSES'} >= "
                  f"+{BARS['over_naive_db']:g}), {l1_db:+.2f} dB over L1-wavelet "
                  f"({'meets' if l1_db >= BARS['over_l1_db'] else 'MISSES'} >= "
                  f"+{BARS['over_l1_db']:g}; the best L1-wavelet row)")
    below = [r for r in rows if r["kind"] == "baseline" and r["measured"] and r["gain_db"] < 0]
    passed &= not below
    print("  no classical row below zero-filled on a measured acquisition: "
          + ("meets" if not below else "MISSES: " + "; ".join(
              f"{r['volume']} {r['operator']} {r['method']} {r['gain_db']:+.2f} dB" for r in below)))
    return 0 if passed else 1


def _rule_summary(rows: list[dict], accelerations: list[str]) -> None:
    """Per acceleration and baseline row (val lam or a rule): mean PSNR over the measured and
    over the simulated acquisitions, each with its worst gain over zero-filled."""
    print("mean PSNR (dB) of each baseline row over the measured | simulated acquisitions "
          "(worst gain over zero-filled)")
    for acc in accelerations:
        mine = [r for r in rows if r["operator"] == acc and r["kind"] == "baseline"]
        for label in dict.fromkeys(r["method"] for r in mine):
            parts = []
            for group, measured in (("measured", True), ("simulated", False)):
                sel = [r for r in mine if r["method"] == label and r["measured"] == measured]
                parts.append(f"{group} {np.mean([r['psnr'] for r in sel]):6.2f} (worst "
                             f"{min(r['gain_db'] for r in sel):+5.2f})" if sel else f"{group} -")
            print(f"  {acc} {label:32s} " + " | ".join(parts))


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"{time.perf_counter() - start:.0f} s")
    raise SystemExit(code)
