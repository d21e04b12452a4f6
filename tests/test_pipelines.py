"""Orchestration and tracking: tasks through ``.fn`` (fast), then real flows under
``prefect_test_harness`` with a temporary MLflow sqlite store.

Everything runs on a synthetic NIfTI 'head' (tiny manifest in tmp), a tiny untrained prior
(32 x 32 slices, channels (16, 16)) and 2-4 integration steps, so the whole module stays well
under a minute of compute on 2 shared cores (plus the harness' start-up).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

# Prefect reads its settings when first imported: keep its home out of the repository.
_PREFECT_HOME = tempfile.mkdtemp(prefix="recon-test-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RECON_WORK_DIR", str(Path(_PREFECT_HOME) / "work"))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from pipelines import tasks, tracking  # noqa: E402
from pipelines.figures import quality_cost, volume_figure  # noqa: E402
from recon.classical.baselines import LAMBDA_GRID  # noqa: E402
from recon.config import ConfigError, load_config  # noqa: E402
from recon.prior.network import (  # noqa: E402
    CHECKPOINT_FORMAT,
    CheckpointError,
    build_network,
)

pytestmark = pytest.mark.integration  # flows, servers, subprocesses: not in make test-fast

SIZE = 32
TINY_NET = {"channels": [16, 16], "attention_levels": [False, False], "norm_num_groups": 8,
            "num_head_channels": 16}


# -- fixtures: data, prior, config ----------------------------------------------------------------
def head(shape=(28, 32, 8), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1.25, 1.25, n) for n in shape], indexing="ij")
    r = grids[0] ** 2 + grids[1] ** 2 + 0.3 * grids[2] ** 2
    img = (r < 1.0) * (100 + 40 * np.sin(4 * grids[0]) * np.cos(3 * grids[1])
                       + 5 * rng.standard_normal(shape))
    return np.clip(img, 0, None).astype(np.float32)


def write_dataset(root: Path, corrupt: bool = False) -> Path:
    """A manifest with one train, one validation and one test volume under ``root/data``."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    entries = []
    for vid, split, seed in (("train_head", "train", 1), ("val_head", "val", 3),
                             ("test_head", "test", 2)):
        path = data / f"{vid}.nii.gz"
        affine = np.array([[2.0, 0, 0, -30], [0, 2.0, 0, -34], [0, 0, 3.0, -12], [0, 0, 0, 1]])
        nib.save(nib.Nifti1Image(head(seed=seed), affine), path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if corrupt and split == "test":
            digest = "0" * 64
        entries.append({"id": vid, "path": path.name, "sha256": digest, "subject": vid,
                        "split": split, "modality": "T1w"})
    manifest = root / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({"name": "synthetic", "volumes": entries}))
    return manifest


def write_native_prior(root: Path) -> tuple[Path, Path]:
    """A tiny untrained fully convolutional prior for native-grid slices and its config."""
    from recon.config.prior import PriorConfig

    net = {**TINY_NET, "mid_attention": False}
    pcfg = PriorConfig.model_validate({"network": net, "data": {
        "image_size": None, "patch_size": SIZE, "normalise": "foreground"}})
    config = root / "prior_native.yaml"
    config.write_text(yaml.safe_dump(pcfg.model_dump(mode="json")))
    ckpt = root / "prior_native.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "kind": "prior", "config": pcfg.model_dump(mode="json"),
                "step": 0, "ema": build_network(pcfg.network, pcfg.diffusion.build()).state_dict()},
               ckpt)
    return ckpt, config


def write_prior(root: Path, seed: int = 0, channels=(16, 16)) -> tuple[Path, Path]:
    """A tiny untrained prior checkpoint (state dict + config) and its config YAML."""
    from recon.config.prior import PriorConfig

    net = {**TINY_NET, "channels": list(channels)}
    cfg = PriorConfig.model_validate({"network": net, "data": {"image_size": SIZE}})
    config = root / f"prior_{'_'.join(map(str, channels))}.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    torch.manual_seed(seed)
    state = build_network(cfg.network, cfg.diffusion.build()).state_dict()
    ckpt = root / f"prior_{'_'.join(map(str, channels))}.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "kind": "prior", "config": cfg.model_dump(mode="json"),
                "step": 0, "ema": state}, ckpt)
    return ckpt, config


def mlflow_client(cfg):
    return tracking.client(cfg)


def runs_by_name(cfg, name: str):
    c = mlflow_client(cfg)
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    return c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.runName` = '{name}'",
                         order_by=["attributes.start_time DESC"])


def artifact_paths(cfg, run_id: str, path: str | None = None) -> list[str]:
    c = mlflow_client(cfg)
    out = []
    for f in c.list_artifacts(run_id, path):
        out += artifact_paths(cfg, run_id, f.path) if f.is_dir else [f.path]
    return out


# -- unit: tracking, cache policy, figures (no Prefect server) ------------------------------------
def test_tracking_sqlite_store_explicit_artifacts_and_failed_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, [f"work_dir={tmp_path / 'w'}", "tracking.experiment=unit"])
    assert tracking.tracking_uri(cfg) == f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}"
    with tracking.run_context(cfg, "ok") as run:
        run.log_metrics({"a": 1.0})
        run.log_series("s", [1.0, 2.0, 3.0])
        run.log_table([{"x": 1, "y": 2.5}], "table.json")
    c = tracking.client(cfg)
    exp = c.get_experiment_by_name("unit")
    assert exp.artifact_location == (tmp_path / "w" / "mlartifacts" / "unit").as_uri()
    info = c.get_run(run.run_id)
    assert info.info.status == "FINISHED" and info.data.params["reconstruct.steps"] == "29"
    assert [m.step for m in c.get_metric_history(run.run_id, "s")] == [0, 1, 2]
    assert set(artifact_paths(cfg, run.run_id)) == {"config/resolved.yaml", "table.json", "table.csv"}

    with pytest.raises(RuntimeError, match="boom"), tracking.run_context(cfg, "bad", run.run_id):
        raise RuntimeError("boom")
    bad = tracking.child_runs(cfg, run.run_id)
    assert len(bad) == 1 and bad[0].info.status == "FAILED"
    assert bad[0].data.tags["error"] == "RuntimeError: boom"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///tmp/mlruns")
    with pytest.raises(ValueError, match="file stores are refused"):
        tracking.tracking_uri(cfg)


def test_file_contents_cache_key_follows_file_bytes(tmp_path):
    f = tmp_path / "ckpt.pt"
    f.write_bytes(b"one")
    policy = tasks.FileContents(exclude=["out_dir"])
    k1 = policy.compute_key(None, {"prior": {"checkpoint": str(f)}, "out_dir": str(tmp_path)}, {})
    assert k1 == policy.compute_key(None, {"prior": {"checkpoint": str(f)}}, {})
    f.write_bytes(b"two")
    os.utime(f, ns=(1, 1))
    assert policy.compute_key(None, {"prior": {"checkpoint": str(f)}}, {}) != k1
    assert policy.compute_key(None, {"x": 3, "y": "relative/path"}, {}) is None


def test_figures_are_built_without_a_display():
    rng = np.random.default_rng(0)
    a = rng.random((5, 16, 16))
    fig = volume_figure(a, a * 0.5, a * 0.9, a * 0.1, "t", psnr={"naive": [1.0] * 5, "recon": [2.0] * 5})
    # 3 axial rows + sagittal and coronal reformats, 5 images and 2 colour bars (error, std) each
    assert len(fig.axes) == (3 + 2) * 5 + (3 + 2) * 2
    rows = [{"family": "dc ddim", "seconds": 5.0, "psnr": 20.0, "psnr_naive": 15.0},
            {"family": "dc ddim", "seconds": 9.0, "psnr": 22.0, "psnr_naive": 15.0},
            {"family": "tv", "seconds": 1.0, "psnr": 19.0, "psnr_naive": 15.0},
            {"family": "dps ddim", "seconds": 20.0, "psnr": 21.0, "psnr_naive": 15.0}]
    fig = quality_cost(rows)
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("seconds")
    front = next(line for line in ax.get_lines() if line.get_label() == "frontier")
    # the frontier: tv (fastest), then dc at 5 s and 9 s; dps is slower and worse than dc 9 s
    assert list(front.get_xdata()) == [1.0, 5.0, 9.0] and list(front.get_ydata()) == [19.0, 20.0, 22.0]


def test_tasks_fn_prepare_reconstruct_evaluate(workspace, tmp_path):
    cfg = workspace["config"]
    vols = tasks.list_volumes.fn(str(cfg.data.manifest), str(cfg.data.data_root), "test")
    assert [v["id"] for v in vols] == ["test_head"]
    prepared = tasks.prepare_volume.fn(vols[0], cfg.data, str(tmp_path / "cache"))
    out = tasks.reconstruct_volume.fn(prepared, cfg.reconstruct.operators[1], cfg.reconstruct,
                                      cfg.prior, str(tmp_path / "out"), progress=False)
    assert out["nfe"] == 3 * 2 + 1 and out["slices"] == 2
    src, rec = nib.load(vols[0]["path"]), nib.load(out["recon"])
    assert rec.shape == src.shape and np.allclose(rec.affine, src.affine)
    assert not list((tmp_path / "out").glob(".*")), "no temporary files left behind"
    m = tasks.evaluate_volume.fn(out["stacks"])
    assert len(m["psnr_slices"]) == 2 and np.isfinite(m["psnr_naive"])
    assert m["gain_db"] == pytest.approx(m["psnr"] - m["psnr_naive"])


def test_bad_manifest_volume_is_named(workspace, tmp_path):
    manifest = write_dataset(tmp_path, corrupt=True)
    from recon.data.manifest import DataError

    with pytest.raises(DataError, match="test_head.*checksum mismatch"):
        tasks.list_volumes.fn(str(manifest), str(tmp_path / "data"), "test")
    with pytest.raises(DataError, match=r"\['nope'\] are not in split 'test'.*valid ids: test_head"):
        tasks.list_volumes.fn(str(manifest), str(tmp_path / "data"), "test", ids=["nope"])


# -- integration: real flows on the test harness --------------------------------------------------
def test_pipeline_runs_nested_mlflow_runs_with_metrics_and_artifacts(workspace, harness):
    from pipelines.flows import pipeline

    cfg = workspace["config"]
    out = pipeline(cfg.to_dict())
    c = mlflow_client(cfg)
    parent = c.get_run(out["run_id"])
    assert parent.info.status == "FINISHED"
    children = {r.data.tags["mlflow.runName"]: r for r in tracking.child_runs(cfg, out["run_id"])}
    assert set(children) == {"load_data", "train_prior", "reconstruct", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert parent.data.params["reconstruct.steps"] == "3"
    for op in ("mask", "fourier"):
        assert f"psnr/{op}" in parent.data.metrics and f"gain_db/{op}" in parent.data.metrics

    ev = children["evaluate"]
    for key in ("psnr", "ssim", "psnr_naive", "ssim_naive", "gain_db"):
        assert f"{key}/fourier/test_head" in ev.data.metrics
    assert len(c.get_metric_history(ev.info.run_id, "psnr_slice/fourier/test_head")) == 2
    assert {"figures/test_head_mask.png", "figures/test_head_fourier.png", "summary.json",
            "summary.csv"} <= set(artifact_paths(cfg, ev.info.run_id))

    rec = children["reconstruct"]
    assert rec.data.metrics["nfe"] == 7 and rec.data.metrics["slices_per_s"] > 0
    arts = set(artifact_paths(cfg, rec.info.run_id))
    assert {f"nifti/test_head/{op}/{f}" for op in ("mask", "fourier")
            for f in ("recon.nii.gz", "naive.nii.gz", "std.nii.gz", "slices.npz")} <= arts
    local = Path(c.download_artifacts(rec.info.run_id, "nifti/test_head/fourier/recon.nii.gz",
                                      str(workspace["root"] / "dl")))
    src = nib.load(workspace["root"] / "data" / "test_head.nii.gz")
    assert np.allclose(nib.load(local).affine, src.affine) and nib.load(local).shape == src.shape

    train = children["train_prior"]
    assert "checkpoints/" + workspace["checkpoint"].name in artifact_paths(cfg, train.info.run_id)
    assert train.data.tags["train.trained"] == "False"
    assert "config/resolved.yaml" in artifact_paths(cfg, out["run_id"])
    assert [r["operator"] for r in out["rows"]] == ["mask", "fourier"]


def test_reconstruct_is_cached_across_runs(workspace, harness):
    from pipelines.flows import reconstruct

    cfg = workspace["config"]
    first = reconstruct(cfg.to_dict())
    second = reconstruct(cfg.to_dict())
    assert [o["recon"] for o in second["outputs"]] == [o["recon"] for o in first["outputs"]]
    # a deleted output is recomputed, not returned stale from the cache
    Path(first["outputs"][0]["recon"]).unlink()
    third = reconstruct(cfg.to_dict())
    assert all(Path(o["recon"]).exists() for o in third["outputs"])
    assert third["outputs"][0]["recon"] != first["outputs"][0]["recon"]


def test_baselines_are_rows_of_the_same_tables(workspace, harness):
    """``reconstruct.baselines``: TV with lam chosen on the validation volume and L1-wavelet at a
    given lam run on the same y as the sampler, write the same NIfTI outputs and metrics, and
    appear as rows of the evaluate table."""
    from pipelines.flows import evaluate

    cfg = load_config(None, [*workspace["overrides"], "reconstruct.operators=[fourier]",
                             "reconstruct.baselines=[tv, {name: l1_wavelet, params: {lam: 0.001}}]"])
    out = evaluate(cfg.to_dict())
    rows = {r["method"]: r for r in out["rows"]}
    assert set(rows) == {"diffusion", "tv", "l1_wavelet"}
    assert len({round(r["psnr_naive"], 9) for r in rows.values()}) == 1  # the same y
    assert rows["tv"]["nfe"] == 0 and rows["l1_wavelet"]["label"] == "l1_wavelet(lam=0.001)"
    assert rows["tv"]["psnr"] > rows["tv"]["psnr_naive"]
    c = mlflow_client(cfg)
    ev = c.get_run(out["run_id"])
    assert {"psnr/fourier-tv/test_head", "psnr/fourier-l1_wavelet/test_head",
            "psnr/fourier/test_head", "psnr/fourier-tv"} <= set(ev.data.metrics)
    rec = next(r for r in tracking.child_runs(cfg, out["run_id"])
               if r.data.tags["mlflow.runName"] == "reconstruct")
    assert "lam/fourier-tv" in rec.data.metrics and "lam/fourier-l1_wavelet" not in rec.data.metrics
    arts = set(artifact_paths(cfg, rec.info.run_id))
    assert {"nifti/test_head/fourier-tv/recon.nii.gz", "nifti/test_head/fourier/recon.nii.gz"} <= arts
    assert "figures/test_head_fourier-l1_wavelet.png" in artifact_paths(cfg, ev.info.run_id)


def test_a_warm_start_takes_the_operators_lam_or_chooses_it_on_validation(workspace, harness):
    """``reconstruct.warm_start`` from TV: with the operator's ``lam`` in the config it is used
    as is; without, it is chosen on the validation volume (the cached task the baselines use)
    and logged. The chains start at t0: the method's label says so and the NFE is steps + 1."""
    from pipelines.flows import reconstruct

    common = [*workspace["overrides"], "reconstruct.baselines=[]", "reconstruct.steps=3",
              "reconstruct.integrator=diffpir",
              "reconstruct.warm_start={baseline: tv, t0: 0.3}"]
    cfg = load_config(None, [*common, "reconstruct.operators=[{name: fourier, lam: {tv: 0.002}}]"])
    out = reconstruct(cfg.to_dict())
    assert out["outputs"][0]["nfe"] == 4 and "warm tv t0=0.3" in out["outputs"][0]["label"]
    run = mlflow_client(cfg).get_run(out["run_id"])
    assert run.data.metrics["lam/fourier-tv"] == pytest.approx(0.002)
    cfg = load_config(None, [*common, "reconstruct.operators=[fourier]"])
    out = reconstruct(cfg.to_dict())
    lam = mlflow_client(cfg).get_run(out["run_id"]).data.metrics["lam/fourier-tv"]
    assert lam in LAMBDA_GRID and np.isfinite(out["outputs"][0]["seconds"])


def test_compare_methods_parent_and_children(workspace, harness):
    """Integrators x steps, a DPS setting and a TV baseline whose lam is chosen on the
    validation volume: one child run each on the same measurement, the table and the
    quality-cost figure on the parent."""
    from pipelines.flows import compare

    cfg = load_config(None, [*workspace["overrides"], "compare.methods=[{guidance: dps, steps: 2}, tv]",
                             "compare.integrators=[euler, ddim]", "compare.steps=[2, 3]"])
    out = compare(cfg.to_dict())
    nested = tracking.child_runs(cfg, out["run_id"])
    assert [r.data.tags["mlflow.runName"] for r in nested].count("load_data") == 1
    children = [r for r in nested if "compare.method" in r.data.tags]
    assert len(children) == 6 and all(r.info.status == "FINISHED" for r in children)
    assert sorted(r.info.run_id for r in children) == sorted(out["children"])
    grid = {(r.data.tags["compare.integrator"], r.data.tags["compare.steps"]) for r in children
            if "compare.integrator" in r.data.tags}
    assert grid == {("euler", "2"), ("euler", "3"), ("ddim", "2"), ("ddim", "3"), ("heun", "2")}
    by = {r.data.tags["compare.method"]: r.data.metrics for r in children}
    assert by["data_consistency euler x2"]["nfe"] == 3 and by["data_consistency ddim x3"]["nfe"] == 4
    assert by["dps heun x2"]["nfe"] == 5 and by["dps heun x2"]["vjp"] == 5
    assert by["data_consistency euler x2"]["vjp"] == 0
    tv = next(m for label, m in by.items() if label.startswith("tv(lam="))
    assert tv["nfe"] == 0 and tv["vjp"] == 0 and tv["slices_per_s"] > 0
    lam = mlflow_client(cfg).get_run(out["run_id"]).data.metrics["lam/fourier-tv"]
    from recon.classical.baselines import LAMBDA_GRID
    assert lam in LAMBDA_GRID
    # same data, seed and measurement: the naive baseline is identical in every child
    assert len({round(m["psnr_naive"], 9) for m in by.values()}) == 1
    assert {"comparison.json", "comparison.csv", "psnr_vs_seconds.png"} <= set(
        artifact_paths(cfg, out["run_id"]))
    for child in children:  # each child shows its own reconstruction next to the others
        paths = artifact_paths(cfg, child.info.run_id)
        assert {"figures/test_head_fourier.png", "figures/test_head_fourier-tv.png"} & set(paths)
    table = json.loads(Path(mlflow_client(cfg).download_artifacts(
        out["run_id"], "comparison.json", str(workspace["root"] / "dl2"))).read_text())
    assert table["columns"][:7] == ["method", "kind", "nfe", "vjp", "psnr", "ssim", "seconds"]
    assert [r[1] for r in table["data"]].count("baseline") == 1


def test_io_tasks_retry_transient_errors_only(harness, tmp_path, monkeypatch):
    """An ``OSError`` (e.g. a network file system hiccup) is retried; a missing file or a
    validation error fails at once, since trying again would fail the same way."""
    from prefect import flow

    artefact = tmp_path / "a.txt"
    artefact.write_text("x")
    calls: list[str] = []
    errors: list[BaseException] = []

    def log_artifact(self, path, artifact_path=None):
        calls.append(path)
        if errors:
            raise errors.pop(0)

    monkeypatch.setattr(tracking.Run, "log_artifact", log_artifact)
    quick = tasks.log_artifacts.with_options(retry_delay_seconds=0)

    @flow
    def upload() -> int:
        return quick(f"sqlite:///{tmp_path / 'mlflow.db'}", "run-id", [str(artefact)], "files")

    errors[:] = [OSError("stale file handle"), OSError("stale file handle")]
    assert upload() == 1 and len(calls) == 3          # two transient failures, then success
    calls.clear()
    errors[:] = [OSError("1"), OSError("2"), OSError("3")]
    with pytest.raises(OSError, match="3"):
        upload()
    assert len(calls) == 3                             # retries=2: three attempts in all
    for error in (FileNotFoundError("gone"), ValueError("bad value")):
        calls.clear()
        errors[:] = [error]
        with pytest.raises(type(error)):
            upload()
        assert len(calls) == 1, error                   # not transient: no retry


def test_bad_inputs_fail_early_with_failed_runs(workspace, harness, tmp_path):
    from pipelines.flows import load_data, reconstruct

    cfg = workspace["config"]
    # a checkpoint that does not match the configured network
    other_ckpt, _ = write_prior(tmp_path, channels=(16, 32))
    before = {p for p in (Path(cfg.work_dir) / "runs").rglob("*.nii.gz")}
    with pytest.raises(CheckpointError, match="do not match the network config"):
        reconstruct(cfg.to_dict(), overrides=[f"prior.checkpoint={other_ckpt}"])
    run = runs_by_name(cfg, "reconstruct")[0]
    assert run.info.status == "FAILED" and "do not match" in run.data.tags["error"]
    assert {p for p in (Path(cfg.work_dir) / "runs").rglob("*.nii.gz")} == before

    # a manifest whose test volume is corrupt
    bad_manifest = write_dataset(tmp_path, corrupt=True)
    with pytest.raises(Exception, match="checksum mismatch"):
        load_data(cfg.to_dict(), overrides=[f"data.manifest={bad_manifest}",
                                            f"data.data_root={tmp_path / 'data'}"])
    run = runs_by_name(cfg, "load_data")[0]
    assert run.info.status == "FAILED" and "test_head" in run.data.tags["error"]

    # an invalid config value and an unknown integrator name
    with pytest.raises(ConfigError, match="unknown integrator 'rk4'"):
        reconstruct(cfg.to_dict(), overrides=["reconstruct.integrator=rk4"])
    run = runs_by_name(cfg, "reconstruct")[0]
    assert run.info.status == "FAILED" and "rk4" in run.data.tags["error"]


def test_train_prior_trains_exports_and_caches(workspace, harness):
    from pipelines.flows import train_prior
    from recon.reconstruct.reconstruction import load_network

    cfg = workspace["config"]
    overrides = ["train.enabled=true", "train.steps=2", "train.batch_size=2"]
    first = train_prior(cfg.to_dict(), overrides=overrides)
    assert first["trained"] and Path(first["checkpoint"]).is_file()
    load_network(cfg.prior.model_copy(update={"checkpoint": Path(first["checkpoint"])}), "cpu")
    run = mlflow_client(cfg).get_run(first["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["train.trained"] == "True"
    assert "checkpoints/prior.pt" in artifact_paths(cfg, first["run_id"])
    again = train_prior(cfg.to_dict(), overrides=overrides)  # cached: same exported weights
    assert again["checkpoint"] == first["checkpoint"]


def test_native_grid_reconstruction_end_to_end(workspace, tmp_path):
    """data.image_size null: a 28 x 32 (non-square) volume is measured and reconstructed on
    its own grid with a fully convolutional prior trained on crops; the NIfTI outputs have the
    input's shape and affine, and the per-slice arrays the native slice shape."""

    ckpt, config = write_native_prior(tmp_path)
    cfg = load_config(None, [*workspace["overrides"], "data.image_size=null",
                             "data.normalise=foreground", f"prior.checkpoint={ckpt}",
                             f"prior.config={config}", "reconstruct.x0_range=[0, 1.5]",
                             "reconstruct.operators=[{name: blur, params: {sigma: 1.0}}, fourier]"])
    vols = tasks.list_volumes.fn(str(cfg.data.manifest), str(cfg.data.data_root), "test")
    prepared = tasks.prepare_volume.fn(vols[0], cfg.data, str(tmp_path / "cache"))
    src = nib.load(vols[0]["path"])
    for op in cfg.reconstruct.operators:
        out = tasks.reconstruct_volume.fn(prepared, op, cfg.reconstruct, cfg.prior,
                                          str(tmp_path / op.name), progress=False)
        rec = nib.load(out["recon"])
        assert rec.shape == src.shape and np.allclose(rec.affine, src.affine)
        stacks = np.load(out["stacks"])
        assert stacks["truth"].shape[1:] == (32, 28) == stacks["recon"].shape[1:]
        assert np.isfinite(stacks["recon"]).all() and stacks["recon"].min() >= -1e-6
        assert stacks["recon"].max() <= 1.5 + 1e-6


def test_raw_kspace_through_the_flows(workspace, harness, tmp_path):
    """A manifest of raw k-space (kind: kspace): an 8-coil ISMRMRD test acquisition and a
    fastMRI validation one, simulated from synthetic heads. ``evaluate`` reconstructs the test
    file retrospectively undersampled with the prior and with SENSE (lam chosen on the
    validation file), scores both against the fully sampled RSS, and writes NIfTI with the
    header's affine; ``acquired`` on an undersampled file without reference reconstructs it
    and says it cannot score it."""
    from pipelines.flows import evaluate
    from recon.data.kspace import KSpaceScan, read_kspace, write_fastmri, write_ismrmrd
    from recon.data.simulate import simulate_scan

    data = tmp_path / "data"
    data.mkdir()
    affine = np.array([[2.0, 0, 0, -30], [0, 2.0, 0, -34], [0, 0, 3.0, -12], [0, 0, 0, 1]])
    entries = []
    for vid, split, seed, writer in (("test_raw", "test", 2, write_ismrmrd),
                                     ("val_raw", "val", 3, write_fastmri)):
        nib.save(nib.Nifti1Image(head(shape=(28, 32, 8), seed=seed), affine),
                 tmp_path / f"{vid}.nii")
        scan = simulate_scan(tmp_path / f"{vid}.nii", slices=2, coils=4, noise=0.01, seed=seed)
        path = writer(scan, data / f"{vid}.h5")
        entries.append({"id": vid, "path": path.name, "subject": vid, "split": split,
                        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                        "modality": "T1w", "kind": "kspace"})
    lines = np.zeros(32, bool)
    lines[::2] = True
    lines[12:20] = True
    under = KSpaceScan(**{**scan.__dict__, "reference": None,
                          "mask": np.broadcast_to(lines, (2, 32)).copy()})
    path = write_ismrmrd(under, data / "under_raw.h5")
    entries.append({"id": "under_raw", "path": path.name, "subject": "under", "split": "test",
                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                    "modality": "T1w", "kind": "kspace"})
    manifest = tmp_path / "kspace.yaml"
    manifest.write_text(yaml.safe_dump({"name": "raw", "volumes": entries}))

    ckpt, config = write_native_prior(tmp_path)
    base = [*workspace["overrides"], f"data.manifest={manifest}", f"data.data_root={data}",
            "data.image_size=null", f"prior.checkpoint={ckpt}", f"prior.config={config}",
            "reconstruct.x0_range=[0, 1.5]", "reconstruct.tune_slices=1"]
    cfg = load_config(None, [*base, "data.volumes=[test_raw]", "reconstruct.operators=[{name: "
                             "fourier, params: {acceleration: 2, center_fraction: 0.3}}]",
                             "reconstruct.baselines=[sense]"])
    out = evaluate(cfg.to_dict())
    rows = {r["method"]: r for r in out["rows"]}
    assert set(rows) == {"diffusion", "sense"} and rows["sense"]["label"].startswith("sense(lam=")
    assert rows["sense"]["psnr"] > rows["sense"]["psnr_naive"]
    rec = next(r for r in tracking.child_runs(cfg, out["run_id"])
               if r.data.tags["mlflow.runName"] == "reconstruct")
    assert "lam/fourier-sense" in rec.data.metrics
    c = mlflow_client(cfg)
    local = c.download_artifacts(rec.info.run_id, "nifti/test_raw/fourier/recon.nii.gz", str(tmp_path))
    img = nib.load(local)
    assert img.shape == (28, 32, 2)
    np.testing.assert_allclose(img.affine, read_kspace(data / "test_raw.h5").affine(), atol=1e-5)

    cfg = load_config(None, [*base, "data.volumes=[under_raw]", "reconstruct.operators=[acquired]",
                             "compare.operator=null"])
    out = evaluate(cfg.to_dict())
    assert out["rows"] == []  # reconstructed, but nothing to score it against
    bad = load_config(None, [*base, "data.volumes=[test_raw]", "reconstruct.operators=[mask]",
                             "compare.operator=null"])
    with pytest.raises(Exception, match="does not apply to raw k-space"):
        evaluate(bad.to_dict())
