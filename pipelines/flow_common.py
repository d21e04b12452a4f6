"""What every flow does around its tasks: resolve the config (an invalid one becomes a FAILED
MLflow run), tag its run with the Prefect flow run, call cached tasks whose results must still
exist on disk, and name metrics and output folders."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect.runtime import flow_run

from pipelines.tracking import Run, run_failed
from recon.config import (
    Config,
    ConfigError,
    apply_override,
    fallback_config,
    load_config,
    parse_override,
    validate_config,
)


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
        run_failed(fallback_config(config, overrides), name, err, parent_run_id, tags=run_tags(name))
        raise


def run_tags(flow_name: str) -> dict[str, str]:
    tags = {"recon.flow": flow_name}
    try:
        if flow_run.id:
            tags.update({"prefect.flow_run_id": flow_run.id, "prefect.flow_run_name": flow_run.name})
    except Exception:  # noqa: BLE001 - outside a flow run
        pass
    return tags


def missing_files(result: Any) -> bool:
    """True when a (cached) result names an absolute path that no longer exists."""
    if isinstance(result, str):
        return result.startswith("/") and not Path(result).exists()
    if isinstance(result, Mapping):
        return any(missing_files(v) for v in result.values())
    if isinstance(result, list | tuple):
        return any(missing_files(v) for v in result)
    return False


def cached_call(task, **kwargs):
    """Call a cached task; recompute when the cached result points at deleted files."""
    result = task(**kwargs)
    if missing_files(result):
        result = task.with_options(refresh_cache=True)(**kwargs)
    return result


def results_dir(cfg: Config):
    """Persisted task results and cache records live under the work dir."""
    return Path(cfg.work_dir) / "prefect" / "results"


def with_storage(task, cfg: Config):
    return task.with_options(result_storage=results_dir(cfg))


def metric_key(name: str) -> str:
    """An MLflow-safe metric key fragment."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def run_dir(cfg: Config, run: Run) -> Path:
    return Path(cfg.work_dir) / "runs" / run.run_id


def fresh(task, kwargs: dict, result: Any) -> Any:
    """``result`` of a submitted cached task, or recomputed here when its files were deleted."""
    return task.with_options(refresh_cache=True)(**kwargs) if missing_files(result) else result
