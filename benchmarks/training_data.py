"""Can the data path feed the optimiser? Crops/s of the training data and steps/s of the real
training loop with the batches made in the training process or in DataLoader workers.

On the shipped native prior config's training slices (``recon.prior.files.load_slices``: MONAI
crops and augmentation, plus ``--synthetic`` domain-randomised crops), measured in one run:

- crops/s: ``CropDataset.batch`` alone, in this process;
- steps/s: ``Trainer.run`` for ``--steps`` steps (model, loss, backward, AdamW, EMA) with
  ``training.loader_workers`` = 0 (crops on the training thread) and each of ``--workers``,
  and the speed-up of workers over none.

    python benchmarks/training_data.py [--threads 1] [--steps 60] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from recon.config.prior import load_prior_config
from recon.prior.batches import BatchSampler
from recon.prior.files import load_slices
from recon.prior.training import Trainer


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/prior_native.yaml")
    p.add_argument("--data-root", default="data/public")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    p.add_argument("--synthetic", type=float, default=None, help="default: the config's")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_prior_config(args.config)
    if args.synthetic is not None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"synthetic": args.synthetic})})
    tc = cfg.training
    data = load_slices(cfg, args.data_root, cfg.data.train_split)
    sampler = BatchSampler(len(data), tc.batch_size, tc.seed)
    start = time.perf_counter()
    n = 0
    for step in range(20):
        n += len(data.batch(sampler.indices(step), step))
    crops = n / (time.perf_counter() - start)
    print(f"{len(data)} training slices, synthetic {cfg.data.synthetic:g}: {crops:.0f} crops/s "
          f"({crops / tc.batch_size:.1f} batches of {tc.batch_size}/s) on the training thread")
    out = {"crops_per_s": crops}
    short = tc.model_copy(update={"steps": args.steps, "val_every": 10**6, "log_every": 10,
                                  "checkpoint_every": 10**6, "device": "cpu"})
    for workers in [0, *args.workers]:
        run_cfg = cfg.model_copy(update={"training": short.model_copy(
            update={"loader_workers": workers})})
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer.setup(run_cfg, data, None, Path(tmp), resume=False)
            t0 = time.perf_counter()
            trainer.run(progress=False)
            seconds = time.perf_counter() - t0
        out[f"steps_per_s_workers{workers}"] = args.steps / seconds
        print(f"loader_workers={workers}: {args.steps / seconds:.2f} steps/s "
              f"({args.steps * tc.batch_size / seconds:.0f} samples/s), "
              f"x{out[f'steps_per_s_workers{workers}'] / out['steps_per_s_workers0']:.2f} "
              f"against none", flush=True)
    return out


if __name__ == "__main__":
    main()
