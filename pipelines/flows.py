"""Prefect flows: ``load_data``, ``train_prior``, ``reconstruct``, ``evaluate``, ``pipeline``
(the four chained as subflows) and ``compare`` (methods side by side).

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
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner

import pipelines  # noqa: F401  (Prefect settings before anything else)
from pipelines import services, tasks
from pipelines.figures import quality_cost
from pipelines.runners import check_scheduler, task_runner
from pipelines.tracking import (
    Run,
    create_run,
    fallback_config,
    run_context,
    run_failed,
    tracking_uri,
)
from recon.config import (
    BaselineConfig,
    Config,
    ConfigError,
    OperatorConfig,
    ReconstructSection,
    apply_override,
    load_config,
    parse_override,
    validate_config,
)
from recon.metrics import SLICE_METRICS, VOLUME_METRICS
from recon.raw import is_scan, open_prepared
from recon.reconstruction import load_network, slab_file, slab_ranges

DEFAULT_CONFIG = "configs/default.yaml"


# -- helpers ------------------------------------------------------------------------------------
def resolve(config: str | Mapping[str, Any] | Config, overrides: list[str] | None = None) -> Config:
    """A validated ``Config`` from a path, a dict (paths already absolute) or a ``Config``."""
    if not isinstance(config, Config | Mapping):
        return load_config(config, overrides or [])
    cfg = config if isinstance(config, Config) else validate_config(config)
    return _override(cfg, overrides) if overrides else cfg


def _override(cfg: Config, overrides: list[str]) -> Config:
    data = cfg.to_dict()
    for o in overrides:
        apply_override(data, *parse_override(o))
    return validate_config(data)


def start(config: Any, overrides: list[str] | None, name: str, parent_run_id: str | None) -> Config:
    """Resolve the config; an invalid one is recorded as a FAILED MLflow run, then raised."""
    try:
        return resolve(config, overrides)
    except ConfigError as err:
        run_failed(fallback_config(config, overrides), name, err, parent_run_id, tags=_tags(name))
        raise


def _tags(flow_name: str) -> dict[str, str]:
    tags = {"recon.flow": flow_name}
    try:
        if flow_run.id:
            tags.update({"prefect.flow_run_id": flow_run.id, "prefect.flow_run_name": flow_run.name})
    except Exception:  # noqa: BLE001 - outside a flow run
        pass
    return tags


def _missing(result: Any) -> bool:
    """True when a (cached) result names an absolute path that no longer exists."""
    if isinstance(result, str):
        return result.startswith("/") and not Path(result).exists()
    if isinstance(result, Mapping):
        return any(_missing(v) for v in result.values())
    if isinstance(result, list | tuple):
        return any(_missing(v) for v in result)
    return False


def cached_call(task, **kwargs):
    """Call a cached task; recompute when the cached result points at deleted files."""
    result = task(**kwargs)
    if _missing(result):
        result = task.with_options(refresh_cache=True)(**kwargs)
    return result


def _results(cfg: Config):
    """Persisted task results and cache records live under the work dir."""
    return Path(cfg.work_dir) / "prefect" / "results"


def _with_storage(task, cfg: Config):
    return task.with_options(result_storage=_results(cfg))


def _key(name: str) -> str:
    """An MLflow-safe metric key fragment."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def run_dir(cfg: Config, run: Run) -> Path:
    return Path(cfg.work_dir) / "runs" / run.run_id


# -- load_data ----------------------------------------------------------------------------------
@flow(name="load_data", log_prints=True)
def load_data(config: str | dict[str, Any] | Config = DEFAULT_CONFIG, overrides: list[str] | None = None,
              parent_run_id: str | None = None) -> dict[str, Any]:
    """Materialise the data (when configured), verify the manifest's test volumes and prepare
    their slices (cached). Returns ``{"run_id", "data_root", "manifest", "volumes", "prepared"}``."""
    cfg = start(config, overrides, "load_data", parent_run_id)
    with run_context(cfg, "load_data", parent_run_id, tags=_tags("load_data")) as run:
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
        prepare = _with_storage(tasks.prepare_volume, cfg)
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
    with run_context(cfg, "train_prior", parent_run_id, tags=_tags("train_prior")) as run:
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
                result = cached_call(_with_storage(tasks.train_prior, cfg), prior=prior_cfg,
                                     data_root=data["data_root"], manifest=data["manifest"],
                                     out_dir=str(out_dir), axis=cfg.data.axis,
                                     resume=cfg.train.resume,
                                     progress=cfg.reconstruct.progress, run_id=run.run_id,
                                     tracking_uri=tracking_uri(cfg))
                checkpoint, trained = result["checkpoint"], True
                reason = f"trained {result['step']} steps"
                run.log_metrics({k: result[k] for k in ("train_loss", "val_loss", "seconds")
                                 if result.get(k) is not None})
        _preflight(cfg, checkpoint)  # the checkpoint must fit the configured network
        print(f"prior: {checkpoint} ({reason})")
        run.set_tags({"train.trained": trained, "train.reason": reason, "prior.checkpoint": checkpoint,
                      "prior.sha256": tasks.file_digest(checkpoint)})
        tasks.log_artifacts(tracking_uri(cfg), run.run_id, [checkpoint], "checkpoints")
        run.log_metrics({"wall_seconds": time.perf_counter() - t0})
        return {"run_id": run.run_id, "checkpoint": checkpoint, "trained": trained}


# -- reconstruct --------------------------------------------------------------------------------
def series(out: Mapping[str, Any]) -> str:
    """The name of a result's metric series: the operator, plus the method for a baseline
    (``fourier``, ``fourier-tv``)."""
    return out["operator"] if out["method"] == "diffusion" else f"{out['operator']}-{out['method']}"


def _tuning_volumes(cfg: Config) -> list[str]:
    """Prepared validation volumes (``tune_slices`` central slices each) on which baselines'
    ``lam`` is chosen; never the test split."""
    d = cfg.data
    volumes = tasks.list_volumes(str(d.manifest), str(d.data_root), d.val_split, verify=True)
    if not volumes:
        raise ValueError(f"baselines with lam: null need validation volumes to choose lam on, "
                         f"but split {d.val_split!r} of {d.manifest} has none; give each "
                         f"operator its lam (reconstruct.operators: ... lam: {{tv: 3.2e-3}}) as "
                         f"configs/default.yaml does")
    volumes = volumes[: cfg.reconstruct.tune_volumes]
    data = d.model_copy(update={"max_slices": cfg.reconstruct.tune_slices})
    prepare = _with_storage(tasks.prepare_volume, cfg)
    return [cached_call(prepare, volume=v, data=data, out_dir=str(d.cache_dir)) for v in volumes]


def tuned_baselines(cfg: Config, run: Run, operators: list[OperatorConfig],
                    baselines: list[BaselineConfig]) -> dict[tuple[str, str], BaselineConfig]:
    """``{(operator, baseline): BaselineConfig with lam}``: a ``lam`` left null is the
    operator's own (``OperatorConfig.lam``), else chosen per operator on the validation split
    (cached task) and logged as ``lam/<operator>-<baseline>``."""
    out, val = {}, None
    for op in operators:
        for b in baselines:
            if b.lam is None and b.name in op.lam:
                b = b.model_copy(update={"params": {**b.params, "lam": op.lam[b.name]}})
                run.log_metrics({f"lam/{_key(op.name)}-{b.name}": b.lam})
                print(f"{b.name} for {op.name}: lam = {b.lam:.4g} (the operator's lam in the config)")
            if b.lam is None:
                val = _tuning_volumes(cfg) if val is None else val
                r = cached_call(_with_storage(tasks.tune_baseline, cfg), prepared=val, operator=op,
                                baseline=b, sigma_y=cfg.reconstruct.sigma_y, seed=cfg.reconstruct.seed)
                run.log_metrics({f"lam/{_key(op.name)}-{b.name}": r["lam"]})
                print(f"{b.name} for {op.name}: lam = {r['lam']:.4g}, chosen on {r['slices']} "
                      f"validation slices of {r['volumes']} volumes (mean PSNR "
                      f"{max(r['scores'].values()):.2f} dB)")
                b = b.model_copy(update={"params": {**b.params, "lam": r["lam"]}})
            out[(op.name, b.name)] = b
    return out


def warm_started(cfg: Config, run: Run, settings: ReconstructSection,
                 op: OperatorConfig) -> ReconstructSection:
    """``settings`` for ``op`` with the warm start's ``lam`` chosen on the validation split when
    it is null (``tuned_baselines``, the same cached task as the baselines')."""
    ws = settings.warm_start
    if ws is None or ws.baseline.lam is not None:
        return settings
    b = tuned_baselines(cfg, run, [op], [ws.baseline])[(op.name, ws.baseline.name)]
    return settings.model_copy(update={"warm_start": ws.model_copy(update={"baseline": b})})


def _reconstruct_all(cfg: Config, run: Run, prepared: list[str], checkpoint: str,
                     operators: list[OperatorConfig] | None = None, subdir: str = "",
                     diffusion: bool = True, baselines: list[BaselineConfig] | None = None,
                     runner: TaskRunner | None = None,
                     on_volume: Callable[[dict], None] | None = None) -> list[dict]:
    """Every prepared volume x operator x method (the diffusion sampler when ``diffusion``, and
    each baseline, default ``reconstruct.baselines``, on the same measurement), fanned out as
    slabs of ``reconstruct.slab_slices`` slices (cached ``reconstruct-slab`` tasks; a raw
    k-space scan is one ``reconstruct-volume`` task) on ``runner`` (default: a new one from
    ``cfg.runner``). Every slab is submitted before any is awaited; each volume is assembled
    (``assemble-volume``, atomic files) once its slabs are done and passed to ``on_volume``."""
    prior = cfg.prior.model_copy(update={"checkpoint": Path(checkpoint)})
    operators = operators or cfg.reconstruct.operators
    baselines = cfg.reconstruct.baselines if baselines is None else baselines
    tuned = tuned_baselines(cfg, run, operators, baselines)
    progress = cfg.reconstruct.progress
    per_op = {op.name: warm_started(cfg, run, cfg.reconstruct, op) if diffusion else cfg.reconstruct
              for op in operators}
    slab_task = _with_storage(tasks.reconstruct_slab, cfg)
    volume_task = _with_storage(tasks.reconstruct_volume, cfg)
    jobs = []
    for p in prepared:
        volume = open_prepared(p)
        name, n = volume.name, len(volume.indices)
        for op in operators:
            methods = ([(op.name, None)] if diffusion else []) + \
                [(f"{op.name}-{b.name}", tuned[(op.name, b.name)]) for b in baselines]
            settings = per_op[op.name]
            for folder, baseline in methods:
                out_dir = str(run_dir(cfg, run) / subdir / name / folder)
                common = {"prepared": p, "operator": op, "settings": settings, "prior": prior,
                          "progress": progress, "baseline": baseline}
                if is_scan(p):  # coil maps per slice, scale per scan: one task per scan
                    jobs.append((common, out_dir, [(volume_task, {**common, "out_dir": out_dir})]))
                else:
                    jobs.append((common, out_dir, [
                        (slab_task, {**common, "span": list(span),
                                     "out_file": str(slab_file(out_dir, span))})
                        for span in slab_ranges(n, settings.slab_slices)]))
    outputs = []
    with nullcontext(runner) if runner is not None else task_runner(cfg.runner) as pool:
        submitted = [(common, out_dir, [(t, kw, pool.submit(t, kw)) for t, kw in parts])
                     for common, out_dir, parts in jobs]
        for common, out_dir, parts in submitted:
            results = [_fresh(t, kw, future.result()) for t, kw, future in parts]
            if parts[0][0] is volume_task:
                out = results[0]
            else:
                out = cached_call(_with_storage(tasks.assemble_volume, cfg), slabs=results,
                                  out_dir=out_dir, **{k: common[k] for k in
                                                      ("prepared", "operator", "settings", "baseline")})
            if on_volume is not None:
                on_volume(out)
            outputs.append(out)
    return outputs


def _fresh(task, kwargs: dict, result: Any) -> Any:
    """``result`` of a submitted cached task, or recomputed here when its files were deleted."""
    return task.with_options(refresh_cache=True)(**kwargs) if _missing(result) else result


def _preflight(cfg: Config, checkpoint: str) -> None:
    """Clear errors before any compute: the checkpoint must fit the network config, and a Dask
    scheduler named by ``runner.address`` must answer."""
    load_network(cfg.prior.model_copy(update={"checkpoint": Path(checkpoint)}), "cpu")
    if cfg.runner.kind == "dask" and cfg.runner.address:
        check_scheduler(cfg.runner.address)


@flow(name="reconstruct", log_prints=True)
def reconstruct(config: str | dict[str, Any] | Config = DEFAULT_CONFIG, overrides: list[str] | None = None,
                data: dict[str, Any] | None = None, checkpoint: str | None = None,
                parent_run_id: str | None = None) -> dict[str, Any]:
    """Reconstruct every test volume with every operator (slice-batched, streaming); NIfTI
    outputs (reconstruction, naive pseudo-inverse, std over samples, ground truth on the same
    grid) are logged as artefacts. Returns ``{"run_id", "outputs": [...]}``."""
    cfg = start(config, overrides, "reconstruct", parent_run_id)
    with run_context(cfg, "reconstruct", parent_run_id, tags=_tags("reconstruct")) as run:
        checkpoint = checkpoint or str(cfg.prior.checkpoint)
        _preflight(cfg, checkpoint)
        if data is None:
            data = load_data(cfg, parent_run_id=run.run_id)
        t0 = time.perf_counter()

        def log_volume(out: dict) -> None:  # as each volume is assembled
            key = f"{_key(series(out))}/{_key(out['volume'])}"
            run.log_metrics({f"nfe/{key}": out["nfe"], f"seconds/{key}": out["seconds"],
                             f"slices_per_s/{key}": out["slices_per_s"]})
            tasks.log_artifacts(tracking_uri(cfg), run.run_id,
                                {k: out[k] for k in ("recon", "naive", "std", "stacks", "summary")},
                                f"nifti/{_key(out['volume'])}/{_key(series(out))}")

        outputs = _reconstruct_all(cfg, run, data["prepared"], checkpoint, on_volume=log_volume)
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
    evaluate_task = _with_storage(tasks.evaluate_volume, cfg)
    for out in outputs:
        if out.get("has_reference") is False:  # raw k-space as acquired, undersampled: nothing to score
            print(f"{out['volume']} {series(out)}: no fully sampled reference, reconstructed "
                  "but not scored")
            continue
        m = cached_call(evaluate_task, stacks=out["stacks"])
        key = f"{_key(series(out))}/{_key(out['volume'])}"
        run.log_metrics({f"{name}/{key}": m[name] for name in VOLUME_METRICS})
        for metric in SLICE_METRICS:
            run.log_series(f"{metric}_slice/{key}", m[f"{metric}_slices"], steps=m["indices"])
        title = (f"{out['volume']} | {out['operator']} ({out['label']}) | PSNR {m['psnr']:.2f} dB "
                 f"vs naive {m['psnr_naive']:.2f}")
        tasks.log_volume_figure(tracking_uri(cfg), run.run_id, out["stacks"], m, title,
                                f"figures/{_key(out['volume'])}_{_key(series(out))}.png")
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
            out[f"{k}/{_key(name)}"] = sum(r[k] for r in sel) / len(sel)
    return out


@flow(name="evaluate", log_prints=True)
def evaluate(config: str | dict[str, Any] | Config = DEFAULT_CONFIG, overrides: list[str] | None = None,
             outputs: list[dict[str, Any]] | None = None,
             parent_run_id: str | None = None) -> dict[str, Any]:
    """PSNR/SSIM per slice (step series) and per volume for the reconstruction and the naive
    baseline, the gain in dB, a figure per volume and a summary table. Without ``outputs`` it
    runs ``reconstruct`` first (nested). Returns ``{"run_id", "rows"}``."""
    cfg = start(config, overrides, "evaluate", parent_run_id)
    with run_context(cfg, "evaluate", parent_run_id, tags=_tags("evaluate")) as run:
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
    with run_context(cfg, "pipeline", None, tags=_tags("pipeline")) as run:
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
    with run_context(cfg, "compare", parent_run_id, tags=_tags("compare")) as parent:
        checkpoint = checkpoint or str(cfg.prior.checkpoint)
        _preflight(cfg, checkpoint)
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
                child = create_run(setting, label, parent.run_id, tags={**_tags("compare"), **tags})
                children.append(child.run_id)
                try:
                    child.log_params(setting.resolved())
                    outs = _reconstruct_all(setting, child, prepared, checkpoint, [op],
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
