"""How the default sampler was chosen: every knob of the conditional sampler on the validation
split only (never the test volumes), one table per operator.

The central ``--slices`` slices of every T1 validation volume are measured as a test slice would
be (configs/demo.yaml: operators, sigma_y, seeds) and reconstructed by each setting below; TV
(lam chosen on these same slices, so the rival is at its best) is the row to beat. Rows: mean
and worst-volume PSNR, mean SSIM, NFE per sample, seconds per slice.

Settings (every one <= 30 NFE per sample), grouped as they were decided, each group starting
from the previous winner:

- ``step``: DDIM eta = 1 (partial re-noising, the sampler shipped before) vs DiffPIR's
  re-noising step with zeta = 1 (full) and 0.5;
- ``weight``: the prior's weight in the data-consistency prox (DiffPIR's lambda);
- ``tv``: total variation inside the data-consistency step, as a fraction of TV's own lam;
- ``warm``: a warm start from the TV solution noised to t0, with and without TV in the step;
- ``samples``: the posterior mean over n samples (one batch) of the config's own sampler (the
  winner of the groups above);
- ``end``: where the chains stop, the timer's ``t_min``: the output is the guided Tweedie
  estimate there (the config's own sampler otherwise), nearer the posterior mean the later;
- ``cost``: the quality-per-second curve of the config's own sampler: steps x posterior
  samples, the network's evaluations per slice from 10 to 60;
- ``lean``: what the warm start and TV in the step cost and buy at fewer steps: without both
  (from noise), and the warm start's TV stopped at 30 iterations;
- ``adapt``: the config's own sampler with the prior adapted to each measurement
  (``reconstruct.adapt: norms``) at a few learning rates and end times.

    python benchmarks/sampler_choice.py                       # every group, every operator
    python benchmarks/sampler_choice.py --groups warm samples --operators fourier
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from methods import prepare_split  # benchmarks/methods.py, beside this script

from recon.config import MethodConfig, load_config
from recon.data.manifest import load_manifest
from recon.metrics import evaluate_stacks
from recon.reconstruct.reconstruction import reconstruct_prepared, tune_baseline
from recon.reconstruct.volumes import read_stacks


def _method(integrator=("diffpir", {}), steps=29, weight=None, tv=None, t0=None,
            lam=None) -> dict:
    params = {**({"prior_weight": weight} if weight else {}), **({"tv": tv} if tv else {})}
    m = {"integrator": {"name": integrator[0], "params": integrator[1]}, "steps": steps,
         "guidance": {"name": "data_consistency", "params": params}}
    m["warm_start"] = None if t0 is None else {"baseline": {"name": "tv", "params": {"lam": lam}},
                                               "t0": t0}  # null: from noise, not the config's
    return m


def groups(lam: float) -> dict[str, dict[str, dict]]:
    """The settings of each group for an operator whose TV lam (chosen on val) is ``lam``."""
    return {
        "step": {"ddim eta=1": _method(("ddim", {"eta": 1.0})),
                 "diffpir zeta=1": _method(),
                 "diffpir zeta=0.5": _method(("diffpir", {"zeta": 0.5}))},
        "weight": {f"prior_weight={w:g}": _method(weight=w) for w in (0.3, 1.0, 3.0, 10.0)},
        "tv": {f"tv={f:g} lam": _method(tv=f * lam) for f in (0.1, 0.3, 1.0)},
        "warm": {**{f"warm t0={t0:g}": _method(t0=t0, lam=lam) for t0 in (0.2, 0.3, 0.5)},
                 **{f"warm t0={t0:g} tv={f:g} lam": _method(t0=t0, lam=lam, tv=f * lam)
                    for t0 in (0.2, 0.3) for f in (0.1, 0.3)}},
        "samples": {f"the config's sampler, n={n}": {"n_samples": n} for n in (1, 2, 4, 8)},
        "end": {f"the config's sampler, t_min={t:g}": {"timer": {"name": "cosine",
                                                               "params": {"t_min": t}}}
                for t in (0.001, 0.01, 0.03, 0.06, 0.1)},
        "cost": {f"the config's sampler, {n} x {steps + 1} NFE": {"steps": steps, "n_samples": n}
                 for n in (1, 2) for steps in (9, 14, 19, 29)},
        "lean": {**{f"no warm start, no TV, {steps + 1} NFE": _method(steps=steps)
                    for steps in (9, 14, 29)},
                 **{f"the config's sampler, warm start's TV at {it} iterations": {
                     "warm_start": {"baseline": {"name": "tv", "params": {"lam": lam,
                                                                         "iterations": it}},
                                    "t0": 0.2}} for it in (30, 50)}},
        "adapt": {"the config's sampler, not adapted": {}, **{
            f"the config's sampler, adapt lr={lr:g} t_max={tm:g}": {"adapt": {
                "name": "norms", "lr": lr, "t_max": tm}} for lr, tm in ((1e-2, 0.5), (3e-2, 0.5))}},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--slices", type=int, default=2, help="central slices per validation volume")
    p.add_argument("--operators", nargs="*", default=None)
    p.add_argument("--groups", nargs="*", default=None,
                   help="of step weight tv warm samples end cost lean adapt")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override, e.g. prior.checkpoint=PATH")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [*args.overrides, f"reconstruct.num_threads={args.threads}"])
    rs = cfg.reconstruct
    with tempfile.TemporaryDirectory() as tmp:
        val = prepare_split(load_manifest(cfg.data.manifest), cfg, cfg.data.val_split,
                            args.slices, tmp)
        for op in rs.operators:
            if args.operators and op.name not in args.operators:
                continue
            tv = MethodConfig.model_validate("tv").baseline
            lam = tune_baseline(val, op, tv, rs.sigma_y, rs.seed)["lam"]
            tuned = tv.model_copy(update={"params": {"lam": lam}})
            rows = [("TV (lam on these slices)", None, tuned)]
            for name, settings in groups(lam).items():
                if args.groups is None or name in args.groups:
                    rows += [(f"{name}: {label}", MethodConfig.model_validate(m), None)
                             for label, m in settings.items()]
            print(f"\n{op.name}: {len(val)} validation volumes, {args.slices} slices each; "
                  f"TV lam {lam:.3g}")
            print("| setting | PSNR mean | PSNR worst | SSIM mean | NFE | s / slice |\n"
                  "| --- | --- | --- | --- | --- | --- |")
            for label, method, baseline in rows:
                settings = rs if method is None else method.setting(rs)
                own = next(o for o in settings.operators if o.name == op.name)  # its guidance
                scores, seconds, slices, nfe = [], 0.0, 0, 0
                for v in val:
                    out = reconstruct_prepared(v, own, settings, cfg.prior,
                                               Path(tmp) / op.name / label / str(len(scores)),
                                               progress=False,
                                               baseline=baseline)
                    s = read_stacks(out["stacks"])
                    scores.append(evaluate_stacks(s["truth"], s["naive"], s["recon"]))
                    seconds, slices, nfe = seconds + out["seconds"], slices + out["slices"], out["nfe"]
                psnrs = [m["psnr"] for m in scores]
                print(f"| {label} | {np.mean(psnrs):.3f} | {min(psnrs):.3f} | "
                      f"{np.mean([m['ssim'] for m in scores]):.3f} | {nfe} | "
                      f"{seconds / slices:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"{time.perf_counter() - start:.0f} s")
    raise SystemExit(code)
