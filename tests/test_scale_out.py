"""Scale-out (issue 14): a volume cut into slabs that run anywhere and assemble into the same
outputs, slabs on a real local Dask cluster at the same time, and a killed job that redoes only
its unfinished slabs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from recon.config import load_config
from recon.reconstruct.reconstruction import assemble_volume, reconstruct_prepared, slab_ranges
from recon.reconstruct.volumes import read_stacks

pytestmark = pytest.mark.integration  # flows, servers, subprocesses: not in make test-fast

ROOT = Path(__file__).resolve().parents[1]


def _config(workspace, tmp_path, *extra: str):
    return load_config(None, [*workspace["overrides"], f"work_dir={tmp_path / 'work'}",
                              "data.max_slices=4", "reconstruct.operators=[fourier]", *extra])


def _prepared(cfg, tmp_path) -> str:
    from pipelines import tasks

    (vol,) = tasks.list_volumes.fn(str(cfg.data.manifest), str(cfg.data.data_root), "test")
    return tasks.prepare_volume.fn(vol, cfg.data, str(tmp_path / "cache"))


def test_slab_ranges_cover_every_slice_once():
    assert slab_ranges(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert slab_ranges(5, None) == [(0, 5)] and slab_ranges(3, 8) == [(0, 3)]


def test_slabs_assemble_into_the_single_pass_reconstruction(workspace, tmp_path):
    """Slabs of one slice give bit for bit the arrays of the volume in one slab (noise is
    seeded per slice), in NIfTI and slices.npz; slabs that miss a slice are refused."""
    cfg = _config(workspace, tmp_path)
    prepared, op = _prepared(cfg, tmp_path), cfg.reconstruct.operators[0]
    whole = reconstruct_prepared(prepared, op, cfg.reconstruct.model_copy(
        update={"slab_slices": None}), cfg.prior, tmp_path / "whole", progress=False)
    cut = reconstruct_prepared(prepared, op, cfg.reconstruct.model_copy(
        update={"slab_slices": 1}), cfg.prior, tmp_path / "cut", progress=False)
    assert (whole["slabs"], cut["slabs"], cut["slices"]) == (1, 4, 4)
    a, b = read_stacks(whole["stacks"]), read_stacks(cut["stacks"])
    assert all(np.array_equal(a[k], b[k]) for k in a)
    import nibabel as nib

    assert np.array_equal(nib.load(whole["recon"]).get_fdata(), nib.load(cut["recon"]).get_fdata())
    slabs = sorted((tmp_path / "cut" / "slabs").glob("*.npz"))
    assert [p.name for p in slabs] == ["00000-00001.npz", "00001-00002.npz", "00002-00003.npz",
                                       "00003-00004.npz"]
    runs = [{"slab": str(p), "span": [i, i + 1], "seconds": 0.0, "nfe": 1, "vjp": 0,
             "device": "cpu", "host": "h", "pid": 1, "started": 0.0, "finished": 0.0}
            for i, p in enumerate(slabs)]
    with pytest.raises(ValueError, match="do not cover"):
        assemble_volume(prepared, runs[:3], op, cfg.reconstruct, tmp_path / "gap")
    with pytest.raises(ValueError, match="do not cover"):
        assemble_volume(prepared, runs + runs[:1], op, cfg.reconstruct, tmp_path / "twice")


def test_the_flow_reconstructs_coupled_slabs_and_whole_volume_operators(workspace, harness,
                                                                       tmp_path):
    """``reconstruct.coupling: tv_z`` reaches the flow: slabs of 2 slices with a halo, the
    sampler's label names the coupling; ``kykz_fourier`` (k-space along z) is one slab whatever
    ``slab_slices`` says; ``slice_drop``'s measured slices come out closer to the truth than the
    dropped ones."""
    from pipelines.flows import reconstruct

    cfg = _config(workspace, tmp_path, "reconstruct.slab_slices=2", "reconstruct.coupling="
                  "{name: tv_z, weight: 0.01, halo: 1}", "reconstruct.operators=[mask, "
                  "{name: kykz_fourier, params: {acceleration: 2}}, slice_drop]")
    outs = {o["operator"]: o for o in reconstruct(cfg)["outputs"]}
    assert (outs["mask"]["slabs"], outs["kykz_fourier"]["slabs"], outs["slice_drop"]["slabs"]) \
        == (2, 1, 2)
    assert all("tv_z(0.01)" in o["label"] for o in outs.values())
    s = read_stacks(outs["slice_drop"]["stacks"])
    err = np.abs(s["recon"] - s["truth"]).mean(axis=(1, 2))
    kept = np.asarray(s["indices"]) % 2 == 0
    assert kept.any() and (~kept).any() and err[kept].max() < err[~kept].min()


@pytest.mark.slow
def test_slabs_run_at_once_on_a_local_dask_cluster(workspace, harness, tmp_path):
    """The reconstruct flow on ``runner.kind: dask`` starts a real local ``dask.distributed``
    cluster (2 worker processes, 1 thread each): the 4 slabs of a volume run in both workers,
    two of them at overlapping times, and the outputs equal those of the in-process runner."""
    from pipelines.flows import reconstruct

    slow = ("reconstruct.slab_slices=1", "reconstruct.steps=80")  # ~1 s per slab
    dask = _config(workspace, tmp_path / "dask", *slow, "runner.kind=dask", "runner.workers=2",
                   "runner.threads_per_worker=1")
    local = _config(workspace, tmp_path / "local", *slow)
    (out,) = reconstruct(dask)["outputs"]
    runs = out["slab_runs"]
    assert out["slabs"] == 4 and out["workers"] == 2 and len({r["pid"] for r in runs}) == 2
    assert os.getpid() not in {r["pid"] for r in runs}
    overlap = [(a["span"], b["span"]) for a in runs for b in runs if a["pid"] != b["pid"]
               and a["started"] < b["finished"] and b["started"] < a["finished"]]
    assert overlap, f"no two slabs ran at the same time: {runs}"
    (ref,) = reconstruct(local)["outputs"]
    assert ref["workers"] == 1 and {r["pid"] for r in ref["slab_runs"]} == {os.getpid()}
    a, b = read_stacks(out["stacks"]), read_stacks(ref["stacks"])
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
def test_a_killed_job_leaves_no_process_and_redoes_only_its_unfinished_slabs(workspace, tmp_path):
    """``recon reconstruct`` on a local Dask cluster (2 worker processes) gets SIGKILL after some
    of its 6 slabs are on disk: every child of the CLI (the workers, multiprocessing's resource
    tracker, the Prefect API) is gone within seconds, and the re-run (in-process runner) reuses
    the slabs the killed job finished (their runs name its workers) and computes only the rest."""
    from test_hostile_inputs import _children, _cmdline

    from pipelines import tracking

    work = tmp_path / "work"
    extra = [f"work_dir={work}", "data.max_slices=6", "reconstruct.operators=[fourier]",
             "reconstruct.slab_slices=1", "reconstruct.steps=150"]
    args = [sys.executable, "-m", "recon", "reconstruct", "default"]
    for o in [*workspace["overrides"], *extra]:
        args += ["--set", o]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    killed = subprocess.Popen([*args, "--set", "runner.kind=dask", "--set", "runner.workers=2"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    try:
        deadline = time.monotonic() + 240
        while len(list(work.glob("runs/*/*/fourier/slabs/*.npz"))) < 3:
            assert killed.poll() is None, killed.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "3 slabs did not finish in time"
            time.sleep(0.05)
        children = _children(killed.pid)
        workers = {c for c in children if "spawn_main" in _cmdline(c)}  # while they still run
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
    finished = {p.name for p in work.glob("runs/*/*/fourier/slabs/*.npz")}
    assert len(workers) == 2 and 3 <= len(finished) < 6, (children, finished)
    deadline = time.monotonic() + 15
    while (alive := [c for c in children if Path(f"/proc/{c}").exists()]) and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    for c in alive:
        os.kill(c, signal.SIGKILL)
    assert not alive, f"outlived the CLI: {[_cmdline(c) for c in alive]}"

    rerun = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    cfg = load_config(None, [*workspace["overrides"], *extra])
    client = tracking.client(cfg)
    (run,) = [r for r in client.search_runs([tracking.experiment_id(cfg)])
              if r.data.tags.get("mlflow.runName") == "reconstruct" and r.info.status == "FINISHED"]
    summary = next(work.glob(f"runs/{run.info.run_id}/*/fourier/summary.json"))
    runs = json.loads(summary.read_text())["slab_runs"]
    reused = [r for r in runs if r["pid"] in workers]
    redone = [r for r in runs if r["pid"] not in workers]
    names = {f"{r['span'][0]:05d}-{r['span'][1]:05d}.npz" for r in reused}
    # a slab renamed into place just before the kill may lack its cache record (one per worker)
    assert names <= finished and len(reused) >= len(finished) - 2 >= 1
    assert len(redone) == 6 - len(reused) and len({r["pid"] for r in redone}) == 1
    statuses = {r.info.status for r in client.search_runs([tracking.experiment_id(cfg)])}
    assert "KILLED" in statuses, "the killed job's runs are marked KILLED"


@pytest.mark.slow
def test_a_raw_scan_runs_in_slabs_on_a_local_dask_cluster(workspace, harness, tmp_path):
    """A raw multi-coil scan (ISMRMRD, 3 slices, its manifest entry from ``recon manifest
    describe``) goes through the reconstruct flow as image volumes do: slabs of 2 slices as
    ``reconstruct-slab`` tasks on ``runner.kind: dask`` (2 worker processes), its coil maps and
    scale computed once; the assembled outputs equal the in-process runner's."""
    import nibabel as nib
    from test_kspace import OBLIQUE, phantom
    from typer.testing import CliRunner

    from pipelines.flows import reconstruct
    from recon import cli
    from recon.data.kspace import write_ismrmrd
    from recon.data.simulate import simulate_scan

    data = tmp_path / "data"
    data.mkdir()
    nib.save(nib.Nifti1Image(phantom(), OBLIQUE), tmp_path / "head.nii.gz")
    write_ismrmrd(simulate_scan(tmp_path / "head.nii.gz", slices=3, coils=6, noise=0.01, seed=1),
                  data / "scan.h5")
    described = CliRunner().invoke(cli.app, ["manifest", "describe", str(data / "scan.h5"),
                                             "--data-root", str(data), "--split", "test"])
    assert described.exit_code == 0, described.output
    (tmp_path / "manifest.yaml").write_text(described.output)
    scan = (f"data.manifest={tmp_path / 'manifest.yaml'}", f"data.data_root={data}",
            "data.max_slices=null", "reconstruct.slab_slices=2", "reconstruct.operators=[{name: "
            "fourier, params: {acceleration: 3, center_fraction: 0.3}}]")
    dask = _config(workspace, tmp_path / "dask", *scan, "runner.kind=dask", "runner.workers=2",
                   "runner.threads_per_worker=1")
    (out,) = reconstruct(dask)["outputs"]
    assert (out["slabs"], out["slices"], out["has_reference"]) == (2, 3, True)
    assert [r["span"] for r in out["slab_runs"]] == [[0, 2], [2, 3]]
    assert os.getpid() not in {r["pid"] for r in out["slab_runs"]}
    assert len(list((tmp_path / "dask").rglob(".calibration/*/maps.npy"))) == 1
    (ref,) = reconstruct(_config(workspace, tmp_path / "local", *scan))["outputs"]
    assert {r["pid"] for r in ref["slab_runs"]} == {os.getpid()} and ref["scale"] == out["scale"]
    a, b = read_stacks(out["stacks"]), read_stacks(ref["stacks"])
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert np.array_equal(nib.load(out["recon"]).get_fdata(), nib.load(ref["recon"]).get_fdata())
