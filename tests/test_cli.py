"""The ``recon`` command line: wiring (flows faked), errors, and one real run end to end on
Prefect's embedded API in a subprocess (the default a user gets)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_pipelines import write_dataset, write_prior  # shared tiny data + prior helpers
from typer.testing import CliRunner

from recon import cli

pytestmark = pytest.mark.integration  # flows, servers, subprocesses: not in make test-fast

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def tiny_overrides(root: Path) -> list[str]:
    manifest = write_dataset(root)
    ckpt, prior_cfg = write_prior(root)
    return [f"work_dir={root / 'work'}", f"data.manifest={manifest}",
            f"data.data_root={root / 'data'}", "data.materialise=false", "data.image_size=32",
            "data.volumes=null", "data.max_slices=2", f"prior.checkpoint={ckpt}", f"prior.config={prior_cfg}",
            "reconstruct.operators=[{name: fourier, guidance: data_consistency}]",
            "reconstruct.steps=2", "reconstruct.n_samples=2", "reconstruct.num_threads=1",
            "reconstruct.device=cpu", "tracking.experiment=cli"]


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def test_help_lists_every_command():
    out = runner.invoke(cli.app, ["--help"])
    assert out.exit_code == 0
    for name in ("data", "train", "reconstruct", "compare", "pipeline", "schedule", "config"):
        assert name in out.output


def test_config_resolves_names_and_overrides():
    out = runner.invoke(cli.app, ["config", "demo", "--set", "reconstruct.steps=5"])
    assert out.exit_code == 0, out.output
    assert "steps: 5" in out.output and "name: demo" in out.output
    assert cli.config_path("demo") == ROOT / "configs" / "demo.yaml"


def test_invalid_config_exits_2_and_records_a_failed_run(tmp_path, monkeypatch):
    """An invalid config leaves a FAILED run in the user's store when there is one, and creates
    none where there is not (a first typo in a new folder)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["reconstruct", "demo", "--set", f"work_dir={tmp_path}", "--set",
            "reconstruct.integrator=rk4"]
    out = runner.invoke(cli.app, args)
    assert out.exit_code == 2
    assert "unknown integrator 'rk4'" in out.output and "euler" in out.output
    assert list(tmp_path.iterdir()) == []  # no store made for a refusal
    from pipelines import tracking
    from recon.config import load_config

    cfg = load_config(None, [f"work_dir={tmp_path}", "tracking.experiment=recon-demo"])
    c = tracking.client(cfg)  # the store now exists
    assert runner.invoke(cli.app, args).exit_code == 2
    runs = c.search_runs([tracking.experiment_id(cfg)])
    assert runs and runs[0].info.status == "FAILED" and "rk4" in runs[0].data.tags["error"]


def test_pipeline_command_prints_tables_margins_and_where(tmp_path, monkeypatch):
    import pipelines.flows as flows

    seen = {}

    def fake_pipeline(config, overrides=None):
        seen["config"] = config
        row = {"volume": "v", "operator": "fourier", "method": "diffusion", "label": "dc heun x2",
               "nfe": 5, "slices": 2, "psnr": 30.0, "psnr_naive": 25.0, "gain_db": 5.0,
               "ssim": 0.9, "ssim_naive": 0.8, "seconds": 1.0, "slices_per_s": 2.0}
        tv = {**row, "method": "tv", "label": "tv(lam=0.01)", "nfe": 0, "psnr": 31.5,
              "gain_db": 6.5}
        return {"run_id": "x", "rows": [row, tv]}

    monkeypatch.setattr(flows, "pipeline", fake_pipeline)
    out = runner.invoke(cli.app, ["pipeline", "demo", "--set", f"work_dir={tmp_path}",
                                  "--set", "reconstruct.steps=2"])
    assert out.exit_code == 0, out.output
    assert seen["config"].reconstruct.steps == 2
    assert "PSNR recon" in out.output and "+5.00 dB" in out.output and "tv(lam=0.01)" in out.output
    # the margin counts the diffusion rows; the baseline is measured against, not counted
    assert "best classical baseline (tv)" in out.output and "trails it by -1.50 dB" in out.output
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in out.output.replace("\n", "")


def test_failed_flow_exits_1_with_the_reason(tmp_path, monkeypatch):
    import pipelines.flows as flows

    def broken(config, overrides=None):
        raise ValueError("checkpoint does not match")

    monkeypatch.setattr(flows, "compare", broken)
    out = runner.invoke(cli.app, ["compare", "demo", "--set", f"work_dir={tmp_path}"])
    assert out.exit_code == 1 and "checkpoint does not match" in out.output


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "RECON_"))}
    env.update(PYTHONUNBUFFERED="1", COLUMNS="160")
    return env


def test_schedule_without_server_says_how(tmp_path):
    out = subprocess.run([sys.executable, "-m", "recon", "schedule", "demo", "--set",
                          f"work_dir={tmp_path}"], cwd=ROOT, env=_clean_env(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "prefect server start" in out.stdout and "PREFECT_API_URL" in out.stdout


@pytest.mark.slow
def test_reconstruct_end_to_end_on_the_embedded_api(tmp_path):
    """The default a user gets: no PREFECT_API_URL -> embedded API with PREFECT_HOME inside the
    work dir, MLflow in <work_dir>/mlflow.db, a readable table and where to look."""
    overrides = tiny_overrides(tmp_path)
    out = subprocess.run([sys.executable, "-m", "recon", "reconstruct", "demo", *sets(overrides)],
                         cwd=ROOT, env=_clean_env(tmp_path), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    work = tmp_path / "work"
    assert (work / "prefect").is_dir() and (work / "mlflow.db").is_file()
    assert "PSNR recon" in out.stdout and "fourier" in out.stdout
    assert "mlflow ui --backend-store-uri" in out.stdout
    assert list((work / "runs").rglob("recon.nii.gz"))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.data.tags["mlflow.runName"] for r in top] == ["evaluate"]
    nested = {r.data.tags["mlflow.runName"]: r.data.tags.get("mlflow.parentRunId") for r in runs}
    assert nested["reconstruct"] == top[0].info.run_id
    assert all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.slow
def test_a_new_users_own_nifti_start_to_finish(tmp_path):
    """A new user's path with their own scan and a shipped config, no hand edits anywhere:
    ``manifest describe --split test --subject s1`` -> ``manifest check`` -> ``recon
    reconstruct default`` (the operators' lam shipped in the config: no validation volumes
    needed for the baselines or the warm start)."""
    import nibabel as nib
    import numpy as np

    data = tmp_path / "mydata"
    data.mkdir()
    yy, xx = np.meshgrid(np.linspace(-1, 1, 40), np.linspace(-1, 1, 36), indexing="ij")
    head = (xx**2 / 0.8 + yy**2 < 0.7) * (300 + 200 * (xx**2 + yy**2 < 0.2))
    scan = np.stack([head * (1 + 0.1 * k) for k in range(3)], -1).astype(np.int16)
    nib.save(nib.Nifti1Image(scan, np.diag([1.2, 1.2, 3.0, 1.0])), data / "scan.nii.gz")
    env = _clean_env(tmp_path)

    def recon(*args, timeout=120):
        return subprocess.run([sys.executable, "-m", "recon", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)

    described = recon("manifest", "describe", str(data / "scan.nii.gz"), "--data-root", str(data),
                      "--split", "test", "--subject", "s1")
    assert described.returncode == 0, described.stderr
    manifest = tmp_path / "mine.yaml"
    manifest.write_text(described.stdout)
    checked = recon("manifest", "check", str(manifest), "--data-root", str(data))
    assert checked.returncode == 0 and "1 volume(s) ok" in checked.stdout, checked.stdout
    out = recon("reconstruct", "default", *sets([
        f"work_dir={tmp_path / 'work'}", f"data.manifest={manifest}", f"data.data_root={data}",
        "reconstruct.steps=3", "reconstruct.n_samples=1", "reconstruct.num_threads=1"]),
        timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for op in ("mask", "blur", "fourier"):
        assert list((tmp_path / "work" / "runs").rglob(f"scan/{op}/recon.nii.gz")), op
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.`mlflow.runName` = 'reconstruct'")
    assert runs[0].data.metrics["lam/fourier-tv"] == pytest.approx(3.2e-3)  # the config's


def test_a_fully_sampled_measurement_is_said_to_have_nothing_to_reconstruct(capsys):
    """A fully sampled acquisition scored against itself (naive = reference, ~300 dB) is named
    as such, not reported as a reconstruction that trails the naive one by -263 dB."""
    from recon.config import load_config

    rows = [{"volume": "scan", "operator": "acquired", "method": "diffusion", "label": "dc",
             "psnr_naive": 297.0, "psnr": 34.0, "gain_db": -263.0, "ssim_naive": 1.0,
             "ssim": 0.9},
            {"volume": "vol", "operator": "fourier", "method": "diffusion", "label": "dc",
             "psnr_naive": 21.0, "psnr": 27.0, "gain_db": 6.0, "ssim_naive": 0.5, "ssim": 0.8}]
    assert cli.print_reconstruction(load_config(None), rows)
    margins = capsys.readouterr().out.split("PSNR margins over the naive")[1]
    assert "acquired the measurement is fully sampled" in " ".join(margins.split())
    assert "-263" not in margins and "does NOT beat" not in margins and "+6.00 dB" in margins
