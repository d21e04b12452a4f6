"""Reconstructions fanned out on the task runner: every prepared volume x operator x method as
cached slab tasks (image volumes and raw k-space scans alike), submitted before any is awaited; the
baselines' and the warm start's lam, the operator's own or chosen on the validation split."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from prefect.task_runners import TaskRunner

from pipelines import tasks
from pipelines.flow_common import cached_call, fresh, metric_key, run_dir, with_storage
from pipelines.runners import check_scheduler, task_runner
from pipelines.tracking import Run
from recon.config import BaselineConfig, Config, OperatorConfig, ReconstructSection
from recon.reconstruct.reconstruction import load_network, slab_file, slab_ranges
from recon.reconstruct.scans import open_prepared


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
    prepare = with_storage(tasks.prepare_volume, cfg)
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
                key, rule = f"lam/{metric_key(op.name)}-{b.name}", isinstance(b.lam, str)
                if rule:  # discrepancy & co: chosen per acquisition at solve time
                    run.log_params({key: b.lam})
                else:
                    run.log_metrics({key: b.lam})
                shown = b.lam if rule else f"{b.lam:.4g}"
                print(f"{b.name} for {op.name}: lam = {shown} (the operator's lam in the config)")
            if b.lam is None:
                val = _tuning_volumes(cfg) if val is None else val
                r = cached_call(with_storage(tasks.tune_baseline, cfg), prepared=val, operator=op,
                                baseline=b, sigma_y=cfg.reconstruct.sigma_y, seed=cfg.reconstruct.seed)
                run.log_metrics({f"lam/{metric_key(op.name)}-{b.name}": r["lam"]})
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
    ws = settings.warm_start_for(op)
    if ws is None or ws.baseline.lam is not None:
        return settings
    b = tuned_baselines(cfg, run, [op], [ws.baseline])[(op.name, ws.baseline.name)]
    return settings.model_copy(update={"warm_start": ws.model_copy(update={"baseline": b})})


def reconstruct_all(cfg: Config, run: Run, prepared: list[str], checkpoint: str,
                     operators: list[OperatorConfig] | None = None, subdir: str = "",
                     diffusion: bool = True, baselines: list[BaselineConfig] | None = None,
                     runner: TaskRunner | None = None,
                     on_volume: Callable[[dict], None] | None = None) -> list[dict]:
    """Every prepared volume x operator x method (the diffusion sampler when ``diffusion``, and
    each baseline, default ``reconstruct.baselines``, on the same measurement), fanned out as
    slabs of ``reconstruct.slab_slices`` slices (cached ``reconstruct-slab`` tasks, for image
    volumes and raw k-space scans alike) on ``runner`` (default: a new one from
    ``cfg.runner``). Every slab is submitted before any is awaited; each volume is assembled
    (``assemble-volume``, atomic files) once its slabs are done and passed to ``on_volume``."""
    prior = cfg.prior.model_copy(update={"checkpoint": Path(checkpoint)})
    operators = operators or cfg.reconstruct.operators
    baselines = cfg.reconstruct.baselines if baselines is None else baselines
    tuned = tuned_baselines(cfg, run, operators, baselines)
    progress = cfg.reconstruct.progress
    per_op = {op.name: warm_started(cfg, run, cfg.reconstruct, op) if diffusion else cfg.reconstruct
              for op in operators}
    slab_task = with_storage(tasks.reconstruct_slab, cfg)
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
                jobs.append((common, out_dir, [
                    (slab_task, {**common, "span": list(span),
                                 "out_file": str(slab_file(out_dir, span))})
                    for span in slab_ranges(n, settings.slab_slices, op)]))
    outputs = []
    with nullcontext(runner) if runner is not None else task_runner(cfg.runner) as pool:
        submitted = [(common, out_dir, [(t, kw, pool.submit(t, kw)) for t, kw in parts])
                     for common, out_dir, parts in jobs]
        for common, out_dir, parts in submitted:
            results = [fresh(t, kw, future.result()) for t, kw, future in parts]
            out = cached_call(with_storage(tasks.assemble_volume, cfg), slabs=results,
                              out_dir=out_dir, **{k: common[k] for k in
                                                  ("prepared", "operator", "settings", "baseline")})
            if on_volume is not None:
                on_volume(out)
            outputs.append(out)
    return outputs


def preflight(cfg: Config, checkpoint: str) -> None:
    """Clear errors before any compute: the checkpoint must fit the network config, and a Dask
    scheduler named by ``runner.address`` must answer."""
    load_network(cfg.prior.model_copy(update={"checkpoint": Path(checkpoint)}), "cpu")
    if cfg.runner.kind == "dask" and cfg.runner.address:
        check_scheduler(cfg.runner.address)
