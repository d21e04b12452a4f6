"""Prefect flows: ``load_data``, ``train_prior``, ``reconstruct``, ``evaluate``, ``pipeline``
(the four chained as subflows) and ``compare`` (methods side by side). What every flow does
around its tasks is in ``pipelines.flow_common``; the fan-out of reconstructions as slab tasks
on the runner in ``pipelines.fan_out``.

Flows only orchestrate: every computation is a library call made inside a task
(``pipelines.tasks``). Each flow run is one MLflow run (``pipelines.tracking``): params = the
resolved config, metrics and artefacts as they become final; a flow called inside another
becomes a nested run (``mlflow.parentRunId``). Any error marks the MLflow run FAILED with the
reason (tags ``error``/``error_type`` and ``error.txt``) before the flow fails.

Every flow takes ``config`` (a YAML path or an already resolved config dict) and ``overrides``
(``["reconstruct.steps=32", ...]``), so deployments can pass a path and parameters.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow

from pipelines import services, tasks
from pipelines.fan_out import preflight, reconstruct_all, series, tuned_baselines
from pipelines.figures import quality_cost
from pipelines.flow_common import cached_call, metric_key, run_tags, start, with_storage
from pipelines.runners import task_runner
from pipelines.tracking import Run, create_run, run_context, tracking_uri
from recon.config import Config
from recon.metrics import SLICE_METRICS, VOLUME_METRICS
from recon.reconstruct.scans import open_prepared

DEFAULT_CONFIG = "configs/default.yaml"


# -- load_data ----------------------------------------------------------------------------------
@flow(name="load_data", log_prints=True)
def load_data(config: str | dict[str, Any] | Config = DEFAULT_CONFIG, overrides: list[str] | None = None,
              parent_run_id: str | None = None) -> dict[str, Any]:
    """Materialise the data (when configured), verify the manifest's test volumes and prepare
    their slices (cached). Returns ``{"run_id", "data_root", "manifest", "volumes", "prepared"}``."""
    cfg = start(config, overrides, "load_data", parent_run_id)
    with run_context(cfg, "load_data", parent_run_id, tags=run_tags("load_data")) as run:
        t0 = time.perf_counter()
        d = cfg.data
        if d.materialise:
            tasks.materialise_data(str(d.manifest), str(d.data_root))
        volumes = tasks.list_volumes(str(d.manifest), str(d.data_root), d.test_split, verify=True,
                                     ids=d.volumes)
        if not volumes:
            raise ValueError(f"the manifest {d.manifest} has no volume in split {d.test_split!r}")
        if d.max_volumes is not None:
            volumes = volumes[: d.max_volumes]
        prepare = with_storage(tasks.prepare_volume, cfg)
        prepared = [cached_call(prepare, volume=v, data=d, out_dir=str(d.cache_dir))
                    for v in volumes]
        n_slices = sum(len(open_prepared(p).indices) for p in prepared)
        run.log_metrics({"volumes": len(volumes), "slices": n_slices,
                         "seconds": time.perf_counter() - t0})
        run.set_tags({"data.volumes": ", ".join(v["id"] for v in volumes)})
        return {"run_id": run.run_id, "data_root": str(d.data_root), "manifest": str(d.manifest),
                "volumes": volumes, "prepared": prepared}


# -- train_prior --------------------------------------------------------------------------------
@flow(name="train_prior", log_prints=True)
def train_prior(config: str | dict[str, Any] | Config = DEFAULT_CONFIG, overrides: list[str] | None = None,
                data: dict[str, Any] | None = None, parent_run_id: str | None = None) -> dict[str, Any]:
    """Train the prior, or use the shipped checkpoint when ``train.enabled`` is false or the
    checkpoint already holds weights trained with this config. Returns ``{"run_id",
    "checkpoint", "trained"}``; the checkpoint (a state dict + config) is logged as an artefact."""
    cfg = start(config, overrides, "train_prior", parent_run_id)
    with run_context(cfg, "train_prior", parent_run_id, tags=run_tags("train_prior")) as run:
        t0 = time.perf_counter()
        checkpoint, trained, reason = str(cfg.prior.checkpoint), False, ""
        if not cfg.train.enabled:
            reason = "train.enabled is false: using the configured checkpoint"
        else:
            prior_cfg = services.training_config(cfg)
            if cfg.train.skip_if_matching and services.checkpoint_matches(checkpoint, prior_cfg):
                reason = "the checkpoint already holds weights trained with this config"
            else:
                if data is None:
                    data = load_data(cfg, parent_run_id=run.run_id)
                key = tasks.digest_of(prior_cfg.model_dump(mode="json"))[:12]
                out_dir = Path(cfg.work_dir) / "prior" / key
                result = cached_call(with_storage(tasks.train_prior, cfg), prior=prior_cfg,
                                     data_root=data["data_root"], manifest=data["manifest"],
                                     out_dir=str(out_dir), axis=cfg.data.axis,
                                     resume=cfg.train.resume,
                                     progress=cfg.reconstruct.progress, run_id=run.run_id,
                                     tracking_uri=tracking_uri(cfg))
                checkpoint, trained = result["checkpoint"], True
                reason = f"trained {result['step']} steps"
                run.log_metrics({k: result[k] for k in ("train_loss", "val_loss", "seconds")
                                 if result.get(k) is not None})
        preflight(cfg, checkpoint)  # the checkpoint must fit the configured network
        print(f"prior: {checkpoint} ({reason})")
        run.set_tags({"train.trained": trained, "train.reason": reason, "prior.checkpoint": checkpoint,
                      "prior.sha256": tasks.file_digest(checkpoint)})
        tasks.log_artifacts(tracking_uri(cfg), run.run_id, [checkpoint], "checkpoints")
        run.log_metrics({"wall_seconds": time.perf_counter() - t0})
        return {"run_id": run.run_id, "checkpoint": checkpoint, "trained": trained}


# -- reconstruct --------------------------------------------------------------------------------
@flow(name="reconstruct", log_prints=True)
def reconstruct(config: str | dict[str, Any] | Config = DEFAULT_CONFIG, overrides: list[str] | None = None,
                data: dict[str, Any] | None = None, checkpoint: str | None = None,
                parent_run_id: str | None = None) -> dict[str, Any]:
    """Reconstruct every test volume with every operator (slice-batched, streaming); NIfTI
    outputs (reconstruction, naive pseudo-inverse, std over samples, ground truth on the same
    grid) are logged as artefacts. Returns ``{"run_id", "outputs": [...]}``."""
    cfg = start(config, overrides, "reconstruct", parent_run_id)
    with run_context(cfg, "reconstruct", parent_run_id, tags=run_tags("reconstruct")) as run:
        checkpoint = checkpoint or str(cfg.prior.checkpoint)
        preflight(cfg, checkpoint)
        if data is None:
            data = load_data(cfg, parent_run_id=run.run_id)
        t0 = time.perf_counter()

        def log_volume(out: dict) -> None:  # as each volume is assembled
            key = f"{metric_key(series(out))}/{metric_key(out['volume'])}"
            run.log_metrics({f"nfe/{key}": out["nfe"], f"seconds/{key}": out["seconds"],
                             f"slices_per_s/{key}": out["slices_per_s"]})
            tasks.log_artifacts(tracking_uri(cfg), run.run_id,
                                {k: out[k] for k in ("recon", "naive", "std", "stacks", "summary")},
                                f"nifti/{metric_key(out['volume'])}/{metric_key(series(out))}")
            if out.get("adapters"):  # the prior's weights adapted to this volume, per slab
                run.log_metrics({f"adapt_seconds/{key}": out["adapt_seconds"]})
                tasks.log_artifacts(tracking_uri(cfg), run.run_id, out["adapters"],
                                    f"adapters/{metric_key(out['volume'])}/{metric_key(series(out))}")

        outputs = reconstruct_all(cfg, run, data["prepared"], checkpoint, on_volume=log_volume)
        total = sum(o["slices"] for o in outputs)
        compute = sum(o["seconds"] for o in outputs)
        wall = time.perf_counter() - t0
        run.log_metrics({"nfe": outputs[0]["nfe"] if outputs else 0, "slices": total,
                         "seconds": compute, "wall_seconds": wall,
                         "slices_per_s": total / compute if compute > 0 else 0.0,
                         "slices_per_wall_s": total / wall if wall > 0 else 0.0})
        return {"run_id": run.run_id, "outputs": outputs, "checkpoint": checkpoint}


# -- evaluate -----------------------------------------------------------------------------------
def _evaluate_outputs(cfg: Config, run: Run, outputs: list[dict]) -> list[dict]:
    rows = []
    evaluate_task = with_storage(tasks.evaluate_volume, cfg)
    for out in outputs:
        if out.get("has_reference") is False:  # raw k-space as acquired, undersampled: nothing to score
            print(f"{out['volume']} {series(out)}: no fully sampled reference, reconstructed "
                  "but not scored")
            continue
        m = cached_call(evaluate_task, stacks=out["stacks"])
        key = f"{metric_key(series(out))}/{metric_key(out['volume'])}"
        run.log_metrics({f"{name}/{key}": m[name] for name in VOLUME_METRICS})
        for metric in SLICE_METRICS:
            run.log_series(f"{metric}_slice/{key}", m[f"{metric}_slices"], steps=m["indices"])
        title = (f"{out['volume']} | {out['operator']} ({out['label']}) | PSNR {m['psnr']:.2f} dB "
                 f"vs naive {m['psnr_naive']:.2f}")
        tasks.log_volume_figure(tracking_uri(cfg), run.run_id, out["stacks"], m, title,
                                f"figures/{metric_key(out['volume'])}_{metric_key(series(out))}.png")
        rows.append({**{k: out[k] for k in ("volume", "operator", "method", "label", "guidance",
                                             "integrator", "steps", "nfe", "vjp", "slices")},
                     **{name: m[name] for name in VOLUME_METRICS},
                     "seconds": out["seconds"], "slices_per_s": out["slices_per_s"]})
    return rows


def _operator_means(rows: list[dict]) -> dict[str, float]:
    """Mean PSNR/SSIM/gain per operator (and baseline) over volumes (headline metrics)."""
    out: dict[str, float] = {}
    for name in dict.fromkeys(series(r) for r in rows):
        sel = [r for r in rows if series(r) == name]
        for k in VOLUME_METRICS:
            out[f"{k}/{metric_key(name)}"] = sum(r[k] for r in sel) / len(sel)
    return out


@flow(name="evaluate", log_prints=True)
def evaluate(config: str | dict[str, Any] | Config = DEFAULT_CONFIG, overrides: list[str] | None = None,
             outputs: list[dict[str, Any]] | None = None,
             parent_run_id: str | None = None) -> dict[str, Any]:
    """PSNR/SSIM per slice (step series) and per volume for the reconstruction and the naive
    baseline, the gain in dB, a figure per volume and a summary table. Without ``outputs`` it
    runs ``reconstruct`` first (nested). Returns ``{"run_id", "rows"}``."""
    cfg = start(config, overrides, "evaluate", parent_run_id)
    with run_context(cfg, "evaluate", parent_run_id, tags=run_tags("evaluate")) as run:
        if outputs is None:
            outputs = reconstruct(cfg, parent_run_id=run.run_id)["outputs"]
        rows = _evaluate_outputs(cfg, run, outputs)
        run.log_metrics(_operator_means(rows))
        run.log_table(rows, "summary.json")
        return {"run_id": run.run_id, "rows": rows}


# -- pipeline -----------------------------------------------------------------------------------
@flow(name="pipeline", log_prints=True)
def pipeline(config: str | dict[str, Any] | Config = DEFAULT_CONFIG,
             overrides: list[str] | None = None) -> dict[str, Any]:
    """``load_data`` -> ``train_prior`` -> ``reconstruct`` -> ``evaluate`` as subflows, each a
    nested MLflow run under this one, which holds the summary table and headline metrics."""
    cfg = start(config, overrides, "pipeline", None)
    with run_context(cfg, "pipeline", None, tags=run_tags("pipeline")) as run:
        t0 = time.perf_counter()
        data = load_data(cfg, parent_run_id=run.run_id)
        prior = train_prior(cfg, data=data, parent_run_id=run.run_id)
        rec = reconstruct(cfg, data=data, checkpoint=prior["checkpoint"], parent_run_id=run.run_id)
        ev = evaluate(cfg, outputs=rec["outputs"], parent_run_id=run.run_id)
        run.log_metrics({**_operator_means(ev["rows"]), "wall_seconds": time.perf_counter() - t0})
        run.log_table(ev["rows"], "summary.json")
        return {"run_id": run.run_id, "rows": ev["rows"], "checkpoint": prior["checkpoint"],
                "data": data, "children": {"load_data": data["run_id"], "train_prior": prior["run_id"],
                                           "reconstruct": rec["run_id"], "evaluate": ev["run_id"]}}


# -- compare ----------------------------------------------------------------------------------
COMPARE_COLUMNS = ("method", "kind", "nfe", "vjp", "psnr", "ssim", "seconds", "slices_per_s",
                   "psnr_naive", "gain_db")


@flow(name="compare", log_prints=True)
def compare(config: str | dict[str, Any] | Config = DEFAULT_CONFIG,
            overrides: list[str] | None = None, data: dict[str, Any] | None = None,
            checkpoint: str | None = None, parent_run_id: str | None = None) -> dict[str, Any]:
    """Compare methods on the same data, seed and measurement (``compare.operator``): the
    diffusion settings (``compare.integrators`` x ``compare.steps``, then the diffusion rows of
    ``compare.methods``) and the classical baselines (``lam`` chosen on the validation split).
    One parent MLflow run, one child per method with PSNR, SSIM, NFE, VJP, seconds and
    slices/s; the parent holds the table and the PSNR-vs-seconds frontier. Returns
    ``{"run_id", "rows", "children"}``."""
    cfg = start(config, overrides, "compare", parent_run_id)
    with run_context(cfg, "compare", parent_run_id, tags=run_tags("compare")) as parent:
        checkpoint = checkpoint or str(cfg.prior.checkpoint)
        preflight(cfg, checkpoint)
        if data is None:
            data = load_data(cfg, parent_run_id=parent.run_id)
        prepared = data["prepared"][: cfg.compare.max_volumes]
        op = cfg.compare_operator
        methods = cfg.compare.rows()
        baselines = [m.baseline for m in methods if m.baseline is not None]
        tuned = tuned_baselines(cfg, parent, [op], baselines)
        rows, children = [], []
        with task_runner(cfg.runner) as pool:  # one runner (cluster) for every method
            for method in methods:
                setting = cfg.model_copy(update={"reconstruct": method.setting(cfg.reconstruct)})
                op = next(o for o in setting.reconstruct.operators if o.name == op.name)
                if method.baseline is not None:
                    b = tuned[(op.name, method.baseline.name)]
                    label, family, kind = b.label, b.name, "baseline"
                    tags = {"compare.method": label, "compare.baseline": b.name}
                else:
                    rs = setting.reconstruct
                    label, family, kind = rs.label(op), rs.family(op), "diffusion"
                    tags = {"compare.method": label, "compare.guidance": rs.guidance_for(op).label,
                            "compare.integrator": rs.integrator.label, "compare.steps": rs.steps}
                child = create_run(setting, label, parent.run_id, tags={**run_tags("compare"), **tags})
                children.append(child.run_id)
                try:
                    child.log_params(setting.resolved())
                    outs = reconstruct_all(setting, child, prepared, checkpoint, [op],
                                            diffusion=method.baseline is None,
                                            baselines=[] if method.baseline is None else [b],
                                            runner=pool)
                    ev = _evaluate_outputs(setting, child, outs)
                    seconds = sum(o["seconds"] for o in outs)
                    slices = sum(o["slices"] for o in outs)
                    row = {"method": label, "kind": kind, "family": family, "nfe": outs[0]["nfe"],
                           "vjp": outs[0]["vjp"], "psnr": _mean(ev, "psnr"), "ssim": _mean(ev, "ssim"),
                           "seconds": seconds, "slices_per_s": slices / seconds if seconds > 0 else 0.0,
                           "psnr_naive": _mean(ev, "psnr_naive"), "gain_db": _mean(ev, "gain_db"),
                           "run_id": child.run_id}
                    child.log_metrics({k: row[k] for k in COMPARE_COLUMNS if k not in ("method", "kind")})
                    child.finish()
                except BaseException as err:
                    child.fail(err)
                    raise
                rows.append(row)
                print(f"{label}: NFE {row['nfe']}, VJP {row['vjp']}, PSNR {row['psnr']:.2f} dB, "
                      f"SSIM {row['ssim']:.3f}, {row['seconds']:.1f} s")
        table = [{k: r[k] for k in COMPARE_COLUMNS} for r in rows]
        parent.log_table(table, "comparison.json")
        parent.log_figure(quality_cost(rows, f"{op.name}: PSNR vs seconds, {len(prepared)} "
                                             f"volume(s)"), "psnr_vs_seconds.png")
        best = max(rows, key=lambda r: r["psnr"])
        parent.log_metrics({"best_psnr": best["psnr"], "settings": len(rows)})
        parent.set_tags({"compare.best": best["method"], "compare.operator": op.name})
        return {"run_id": parent.run_id, "rows": table, "children": children}


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


FLOWS = {"load_data": load_data, "train_prior": train_prior, "reconstruct": reconstruct,
         "evaluate": evaluate, "pipeline": pipeline, "compare": compare}
