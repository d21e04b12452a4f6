"""Training-data recipes compared: how well each trained prior fits its own training scans, how
well it generalises to the validation scans, and what that buys in reconstruction on them.

For each exported prior (``recon prior train ... --export``), with its own stored config:

- train / val v-loss: the training objective on ``--crops`` fixed crops (no augmentation, no
  synthetic heads: the real slices only) of its training split and of the validation split,
  with the same stratified t and noise for every prior (``recon.prior.objective.ValidationSet``);
  their ratio is the prior's health (1 = no memorisation);
- val PSNR / SSIM: the reconstruction of ``configs/demo.yaml`` (its sampler, operators and
  seeds; lam of the warm start chosen on the same validation slices) of the central
  ``--slices`` slices of every validation volume, per operator.

Never the test split: the recipe is chosen here, the test volumes are scored by
``benchmarks/methods.py`` only.

    python benchmarks/prior_recipes.py work/recipes/*.pt [--crops 256] [--slices 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from methods import prepare_split, warm_settings  # benchmarks/methods.py, beside this script

from recon.config import MethodConfig, load_config
from recon.config.prior import PriorConfig
from recon.data.loading import SliceDataset
from recon.data.manifest import load_manifest
from recon.data.patches import CropDataset
from recon.data.slicing import SliceConfig
from recon.metrics import evaluate_stacks
from recon.prior.network import load_prior, read_checkpoint
from recon.prior.objective import ValidationSet
from recon.reconstruct.reconstruction import reconstruct_prepared, tune_baseline
from recon.reconstruct.volumes import read_stacks


def real_crops(cfg: PriorConfig, data_root: str, split: str, manifest: Path) -> CropDataset:
    """Fixed crops of the real slices of ``split`` (no augmentation, no synthetic heads)."""
    d = cfg.data
    ds = SliceDataset(manifest, data_root, split, SliceConfig(size=d.image_size, axis=d.axis,
                      normalise=d.normalise, **d.loader), d.cache_dir)
    return CropDataset([ds[i]["image"] for i in range(len(ds))], d.patch_size, augment=False,
                       seed=0)


def losses(path: Path, data_root: str, crops: int) -> dict[str, float]:
    """Train and val v-loss of the prior at ``path`` on fixed crops of its own splits."""
    cfg = PriorConfig.model_validate(read_checkpoint(path)["config"])
    network, diffusion, _ = load_prior(path, "cpu")
    out = {}
    for name, split in (("train", cfg.data.train_split), ("val", cfg.data.val_split)):
        data = real_crops(cfg, data_root, split, cfg.data.manifest)
        fixed = ValidationSet.build(data, crops, cfg.training.t_eps, diffusion.t_max, seed=0)
        out[name] = fixed.loss(network, diffusion, 64, torch.device("cpu"))
    out["ratio"] = out["val"] / out["train"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("priors", nargs="+", type=Path, help="exported priors (.pt)")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--crops", type=int, default=256)
    p.add_argument("--slices", type=int, default=2, help="central slices per validation volume")
    p.add_argument("--operators", nargs="*", default=None)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"reconstruct.num_threads={args.threads}"])
    rs = cfg.reconstruct
    operators = [o for o in rs.operators if args.operators is None or o.name in args.operators]
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        val = prepare_split(load_manifest(cfg.data.manifest), cfg, cfg.data.val_split, args.slices, tmp)
        tuned = {}
        for op in operators:
            b = MethodConfig.model_validate("tv").baseline
            lam = tune_baseline(val, op, b, rs.sigma_y, rs.seed)["lam"]
            tuned[op.name] = {"tv": b.model_copy(update={"params": {"lam": lam}})}
        for path in args.priors:
            t0 = time.perf_counter()
            row = {"prior": path.stem, **losses(path, str(cfg.data.data_root), args.crops)}
            prior = cfg.prior.model_copy(update={"checkpoint": path.resolve()})
            for op in operators:
                settings = warm_settings(rs, tuned[op.name])
                scores = []
                for v in val:
                    out = reconstruct_prepared(v, op, settings, prior,
                                               Path(tmp) / path.stem / op.name / Path(v).name,
                                               progress=False)
                    s = read_stacks(out["stacks"])
                    scores.append(evaluate_stacks(s["truth"], s["naive"], s["recon"]))
                row[f"{op.name}_psnr"] = float(np.mean([m["psnr"] for m in scores]))
                row[f"{op.name}_ssim"] = float(np.mean([m["ssim"] for m in scores]))
            table.append(row)
            print(f"{row['prior']:24s} train {row['train']:.4f}  val {row['val']:.4f}  ratio "
                  f"{row['ratio']:.2f}  " + "  ".join(
                      f"{op.name} {row[f'{op.name}_psnr']:.2f} / {row[f'{op.name}_ssim']:.3f}"
                      for op in operators) + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    print("\n| prior | train v-loss | val v-loss | val / train | "
          + " | ".join(f"val {op.name} PSNR / SSIM" for op in operators) + " |")
    print("| --- " * (4 + len(operators)) + "|")
    for r in table:
        print(f"| {r['prior']} | {r['train']:.4f} | {r['val']:.4f} | {r['ratio']:.2f} | "
              + " | ".join(f"{r[f'{op.name}_psnr']:.2f} / {r[f'{op.name}_ssim']:.3f}"
                           for op in operators) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
