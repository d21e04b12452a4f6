"""The prepared GPU check (``benchmarks/gpu.py``) and the parts of the GPU path that run here:
batch sizing from free memory, bf16 sampling against fp32 (on every device present: the CPU
here, CUDA where lent), and the whole script's ``--dry-run`` on the CPU, so that it cannot rot
between GPU sessions."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from recon.config import load_config
from recon.metrics import psnr
from recon.reconstruct.reconstruction import SliceReconstructor, batch_size_for, load_network

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("free_gib, shape, samples, per_pixel, expected", [
    (80, (256, 256), 2, 4096.0, 128),   # 0.8 * 80 GiB / (2 * 65536 px * 4 KiB) = 128
    (80, (256, 256), 4, 4096.0, 64),
    (80, (512, 512), 2, 4096.0, 32),
    (2, (256, 256), 2, 4096.0, 3),
    (0.001, (256, 256), 2, 4096.0, 1),  # never below one slice
    (10_000, (64, 64), 1, 16.0, 1024),  # never above the limit
])
def test_batch_size_from_free_memory(free_gib, shape, samples, per_pixel, expected):
    assert batch_size_for(int(free_gib * 2**30), shape, samples, per_pixel) == expected


def test_batch_size_refuses_nonsense():
    for bad in ({"free_bytes": 0}, {"bytes_per_pixel": 0.0}, {"fraction": 1.5},
                {"n_samples": 0}):
        args = {"free_bytes": 2**30, "slice_shape": (8, 8), "n_samples": 1,
                "bytes_per_pixel": 1.0, **bad}
        with pytest.raises(ValueError):
            batch_size_for(**args)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_sampling_matches_fp32(device):
    """The shipped prior's forward passes under bf16 autocast (``reconstruct.precision``)
    reconstruct a held-out slice within 0.05 dB of float32, the same measurement and seeds."""
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    rs = cfg.reconstruct.model_copy(update={"warm_start": None, "steps": 4})
    op_cfg = next(o for o in rs.operators if o.name == "fourier")
    held = np.load(ROOT / "tests" / "data" / "heldout_native.npz")
    truth = torch.from_numpy(held["antspyx_r85_t1"].astype(np.float32))[:, :, 80:176, 80:176]
    network, diffusion = load_network(cfg.prior, device)
    op = op_cfg.build(tuple(truth.shape[-2:]), rs.sigma_y, rs.seed)
    scores = {}
    for precision in ("fp32", "bf16"):
        rec = SliceReconstructor.diffusion(
            network, diffusion, op, rs.guidance_for(op_cfg).build(), rs.integrator.build(),
            rs.timer.build(rs.steps), x0_range=rs.x0_range, n_samples=1, device=device,
            precision=precision)
        scores[precision] = float(psnr(torch.from_numpy(rec(truth, [0]).mean)[:, None], truth))
    assert scores["fp32"] > 20 and abs(scores["bf16"] - scores["fp32"]) < 0.05, scores


@pytest.mark.slow
def test_the_gpu_check_runs_dry_on_the_cpu_and_writes_every_field(tmp_path):
    """``python benchmarks/gpu.py --dry-run``: exit 0 in under 2 minutes on 2 CPU cores, and
    the JSON has every field the GPU run fills (CPU values here)."""
    out = tmp_path / "gpu.json"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "benchmarks/gpu.py", "--dry-run", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"cuda_tests", "training", "sampling", "volume", "cohort_300"} <= set(report)
    assert {"passed", "failed", "skipped", "summary"} <= set(report["cuda_tests"])
    for name in ("shipped", "large"):
        assert {"steps_per_s", "samples_per_s", "gpu_util_percent", "loader_workers"} <= \
            set(report["training"][name])
    s = report["sampling"]
    assert set(s["seconds_per_slice"]) == {"fp32", "bf16"}
    assert {"peak_memory_gb", "bytes_per_chain_pixel", "psnr_bf16_minus_fp32_db",
            "warm_start_tv_s"} <= set(s)
    assert {"seconds", "batch_size", "nfe", "n_samples", "shape"} <= set(report["volume"])
    assert report["cohort_300"]["hours"] > 0
    assert seconds < 120, f"the dry run took {seconds:.0f} s"
