"""Prefect tasks: thin wrappers around library calls. They take and return small things
(paths, dicts of paths and numbers), never big arrays.

Caching: expensive tasks (volume preparation, training, reconstruction, evaluation) persist
their results and use ``EXPENSIVE_CACHE`` = the task's inputs (minus ``out_dir`` and
bookkeeping arguments such as the MLflow run id) + the task's source + the *contents* of every
existing file passed in (so a changed checkpoint or volume under the same path is a cache
miss). A cache hit returns the paths written by the run that computed them; ``pipelines.flows``
re-runs a task with ``refresh_cache=True`` when a cached path has since been deleted.

Retries: I/O tasks retry on ``OSError`` (transient file-system / network trouble) but not on
validation errors, which would fail the same way again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from pydantic import BaseModel

from pipelines import services
from pipelines.figures import volume_figure
from pipelines.tracking import Run
from recon.config import BaselineConfig, DataConfig, OperatorConfig, PriorSection, ReconstructSection
from recon.config.prior import PriorConfig
from recon.data.nifti import atomic_write_bytes
from recon.metrics import evaluate_stacks
from recon.reconstruct.reconstruction import assemble_volume as assemble
from recon.reconstruct.reconstruction import reconstruct_prepared
from recon.reconstruct.reconstruction import reconstruct_slab as reconstruct_span
from recon.reconstruct.reconstruction import tune_baseline as tune
from recon.reconstruct.scans import prepare_scan
from recon.reconstruct.volumes import prepare_volume as prepare
from recon.reconstruct.volumes import read_stacks

# -- cache policy -------------------------------------------------------------------------------
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path) -> str:
    """sha256 of a file (memoised on path, size and mtime) or of a directory's files."""
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file() and not any(
                part.startswith(".") for part in q.relative_to(path).parts)):
            h.update(str(p.relative_to(path)).encode())
            h.update(file_digest(p).encode())
        return h.hexdigest()
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def digest_of(value: Any) -> str:
    """sha256 of a JSON-serialisable value (stable key order)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _paths_in(value: Any) -> list[str]:
    if isinstance(value, BaseModel):
        return _paths_in(value.model_dump(mode="json"))
    if isinstance(value, str | Path):
        s = str(value)
        if len(s) < 4096 and s.startswith("/") and Path(s).exists():
            return [s]
        return []
    if isinstance(value, Mapping):
        return [p for v in value.values() for p in _paths_in(v)]
    if isinstance(value, list | tuple):
        return [p for v in value for p in _paths_in(v)]
    return []


class FileContents(CachePolicy):
    """Cache key from the contents of the existing files named (by absolute path) in the inputs,
    skipping ``exclude`` arguments (e.g. output directories)."""

    def __init__(self, exclude: Sequence[str] = ()):
        self.exclude = list(exclude)

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any],
                    flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        paths = sorted({p for k, v in (inputs or {}).items() if k not in self.exclude
                        for p in _paths_in(v)})
        if not paths:
            return None
        h = hashlib.sha256()
        for p in paths:
            h.update(p.encode())
            h.update(file_digest(p).encode())
        return h.hexdigest()


_IGNORED = ("out_dir", "out_file", "run_id", "tracking_uri", "progress")
"""Arguments that say where to write or whom to tell, not what to compute."""
_INPUTS = INPUTS
for _name in _IGNORED:
    _INPUTS = _INPUTS - _name
EXPENSIVE_CACHE = _INPUTS + TASK_SOURCE + FileContents(exclude=_IGNORED)


def transient(task, task_run, state) -> bool:
    """Retry only on ``OSError`` that is not a missing file (validation errors would recur)."""
    try:
        state.result()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    except BaseException:  # noqa: BLE001 - anything else is not transient
        return False
    return False


IO_RETRIES = {"retries": 2, "retry_delay_seconds": [1, 4], "retry_condition_fn": transient}
IO = {**IO_RETRIES, "cache_policy": NO_CACHE}
EXPENSIVE = {"cache_policy": EXPENSIVE_CACHE, "persist_result": True}


# -- data ---------------------------------------------------------------------------------------
@task(name="materialise-data", **IO)
def materialise_data(manifest: str, data_root: str) -> str:
    """Build the offline public data set under ``data_root`` when missing (idempotent)."""
    return str(services.materialise(manifest, data_root))


@task(name="list-volumes", **IO)
def list_volumes(manifest: str, data_root: str, split: str, verify: bool = True,
                 ids: list[str] | None = None) -> list[dict]:
    """``[{"id", "path"}]`` of the ``split`` volumes of the manifest (only ``ids`` if given);
    ``verify`` checks every file (existence, sha256, readable NIfTI) and raises naming the bad
    volume."""
    return services.manifest_volumes(manifest, data_root, split, verify=verify, ids=ids)


@task(name="prepare-volume", **EXPENSIVE, **IO_RETRIES)
def prepare_volume(volume: dict, data: DataConfig, out_dir: str) -> str:
    """Preprocess one volume (``{"id", "path", "kind"}``) into slices on disk
    (``recon.reconstruct.volumes.prepare_volume``; raw k-space:
    ``recon.reconstruct.scans.prepare_scan``); returns the prepared directory."""
    if volume.get("kind") == "kspace":
        return str(prepare_scan(volume["path"], out_dir, data.max_slices, name=volume["id"]))
    return str(prepare(volume["path"], data, out_dir, data.max_slices, name=volume["id"]))


# -- training -----------------------------------------------------------------------------------
@task(name="train-prior", **EXPENSIVE)
def train_prior(prior: PriorConfig, data_root: str, manifest: str, out_dir: str, axis: int = 2,
                resume: bool = True, progress: bool = True, run_id: str | None = None,
                tracking_uri: str | None = None) -> dict:
    """Train the prior (``recon.prior.training.train_prior``) and export the EMA weights to
    ``out_dir/prior.pt``; training metrics go to the MLflow run ``run_id`` as they come."""
    run = Run(tracking_uri, run_id) if run_id and tracking_uri else None

    def callback(step: int, metrics: dict[str, float]) -> None:
        if run is not None:
            run.log_metrics({f"train/{k}": v for k, v in metrics.items() if k != "step"}, step=step)

    return services.train_and_export(prior, data_root, manifest, out_dir, resume=resume,
                            progress=progress, callback=callback, axis=axis)


# -- reconstruction -----------------------------------------------------------------------------
@task(name="reconstruct-volume", **EXPENSIVE)
def reconstruct_volume(prepared: str, operator: OperatorConfig, settings: ReconstructSection,
                       prior: PriorSection, out_dir: str, progress: bool = True,
                       baseline: BaselineConfig | None = None) -> dict:
    """Slice-batched streaming reconstruction of one prepared volume with one operator, by the
    diffusion sampler or a classical ``baseline``: NIfTI ``truth``, ``naive``, ``recon``,
    ``std`` in ``out_dir`` plus ``summary.json`` (``recon.reconstruct.reconstruction.reconstruct_prepared``;
    either kind: image volume or raw k-space)."""
    return reconstruct_prepared(prepared, operator, settings, prior, out_dir, progress=progress,
                                baseline=baseline)


def _slab_run_name() -> str:
    """``<volume> <operator>[-<baseline>] [start:stop]``: what the Prefect UI lists as running."""
    from prefect.runtime import task_run

    p = task_run.parameters
    method = f"-{p['baseline'].name}" if p.get("baseline") is not None else ""
    return f"{Path(p['prepared']).name} {p['operator'].name}{method} [{p['span'][0]}:{p['span'][1]}]"


@task(name="reconstruct-slab", task_run_name=_slab_run_name, **EXPENSIVE)
def reconstruct_slab(prepared: str, operator: OperatorConfig, settings: ReconstructSection,
                     prior: PriorSection, span: list[int], out_file: str, progress: bool = True,
                     baseline: BaselineConfig | None = None) -> dict:
    """One slab (slice positions ``span = [start, stop)``) of a prepared volume, reconstructed by
    the diffusion sampler or a classical ``baseline`` into ``out_file``
    (``recon.reconstruct.reconstruction.reconstruct_slab``). Cached: a re-run skips finished slabs."""
    return reconstruct_span(prepared, operator, settings, prior, out_file, span,
                            progress=progress, baseline=baseline)


@task(name="assemble-volume", **EXPENSIVE)
def assemble_volume(prepared: str, slabs: list[dict], operator: OperatorConfig,
                    settings: ReconstructSection, out_dir: str,
                    baseline: BaselineConfig | None = None) -> dict:
    """A volume's NIfTI outputs, ``slices.npz`` and ``summary.json`` from its finished slabs
    (``recon.reconstruct.reconstruction.assemble_volume``; each file written atomically)."""
    return assemble(prepared, slabs, operator, settings, out_dir, baseline)


@task(name="tune-baseline", **EXPENSIVE)
def tune_baseline(prepared: list[str], operator: OperatorConfig, baseline: BaselineConfig,
                  sigma_y: float, seed: int) -> dict:
    """Choose a baseline's ``lam`` for one operator on validation volumes
    (``recon.reconstruct.reconstruction.tune_baseline``, image volumes or raw k-space):
    ``{"lam", "scores", "slices", "volumes"}``."""
    return tune(prepared, operator, baseline, sigma_y, seed)


@task(name="evaluate-volume", **EXPENSIVE)
def evaluate_volume(stacks: str) -> dict:
    """PSNR/SSIM per slice and per volume for the reconstruction and the naive baseline, over
    the whole image and inside the head (``recon.metrics.evaluate_stacks``; from the
    ``slices.npz`` of ``reconstruct-volume``); also written next to it as ``metrics.json``.
    (The source is part of the cache key: results cached before the head metrics are not
    reused.)"""
    s = read_stacks(stacks)
    metrics = evaluate_stacks(s["truth"], s["naive"], s["recon"])
    metrics["indices"] = [int(i) for i in s["indices"]]
    path = atomic_write_bytes(Path(stacks).parent / "metrics.json",
                              json.dumps(metrics, indent=1).encode())
    return {**metrics, "metrics": str(path)}


# -- tracking -----------------------------------------------------------------------------------
@task(name="log-artifacts", **IO)
def log_artifacts(tracking_uri: str, run_id: str, files: Mapping[str, str] | Sequence[str],
                  artifact_path: str) -> int:
    """Log finished files to the run (explicit run id, synchronous); returns how many."""
    run = Run(tracking_uri, run_id)
    items = files.values() if isinstance(files, Mapping) else files
    n = 0
    for f in items:
        if f and Path(f).exists():
            run.log_artifact(f, artifact_path)
            n += 1
    return n


@task(name="log-figure", **IO)
def log_volume_figure(tracking_uri: str, run_id: str, stacks: str, metrics: dict, title: str,
                      artifact_file: str) -> str:
    """The per-volume figure: ground truth | naive | reconstruction | |error| | std, axial
    slices then (3 slices or more) sagittal and coronal reformats, drawn with the slices'
    spacing over the pixel size (``slice_aspect`` of ``slices.npz``; 1 where it is absent)."""
    s = read_stacks(stacks)
    fig = volume_figure(s["truth"], s["naive"], s["recon"], s["std"], title,
                        psnr={"naive": metrics["psnr_naive_slices"], "recon": metrics["psnr_slices"]},
                        slice_aspect=float(s.get("slice_aspect", 1.0)),
                        labels=[int(i) for i in s["indices"]])
    Run(tracking_uri, run_id).log_figure(fig, artifact_file)
    return artifact_file
