"""MLflow helpers: explicit run ids, synchronous logging, FAILED runs that say why.

MLflow's "active run" is thread-local and Prefect runs tasks in worker threads, so nothing here
uses ``mlflow.start_run``: a ``Run`` wraps an ``MlflowClient`` and a ``run_id`` that flows pass
explicitly into tasks, and every call logs synchronously.

Store: ``$MLFLOW_TRACKING_URI`` if set, else ``tracking.uri`` from the config, else
``sqlite:///<work_dir>/mlflow.db`` (MLflow 3 refuses ``file:`` stores). Each experiment gets an
explicit artifact location (``<work_dir>/mlartifacts/<experiment>``) so artefacts never land
relative to the current directory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import time
import traceback
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from recon.config import Config
from recon.filelock import exclusive_lock

PARENT_TAG = "mlflow.parentRunId"
FAILED_RUN_NOTE = "failed MLflow run:"
"""Prefix of the note a failing ``run_context`` adds to the exception (the run that failed)."""
RUN_NAME_TAG = "mlflow.runName"
MAX_PARAM_LEN = 6000


def tracking_uri(cfg: Config) -> str:
    """``$MLFLOW_TRACKING_URI`` > ``cfg.tracking.uri`` > ``sqlite:///<work_dir>/mlflow.db``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri
    if uri:
        if uri.startswith("file:") or "://" not in uri and not uri.startswith("databricks"):
            raise ValueError(f"MLflow tracking URI {uri!r}: file stores are refused by MLflow 3; "
                             "use sqlite:///path/to/mlflow.db or http(s)://host:port")
        return uri
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(cfg.work_dir).resolve() / 'mlflow.db'}"


def ui_command(cfg: Config) -> str:
    """What a user types to browse the runs."""
    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


_READY: set[str] = set()


def ready(uri: str) -> str:
    """``uri``, its store created and migrated. For a local sqlite store the first use in a
    process holds an exclusive lock (``<db>.lock``): MLflow creates and migrates a new store
    on first contact, and two processes doing it at once crash (``duplicate column name``,
    alembic's ``Online migration expected to match one row``)."""
    if uri in _READY or not uri.startswith("sqlite:///"):
        return uri
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(db.with_name(db.name + ".lock")):
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    _READY.add(uri)
    return uri


def client(cfg: Config):
    return MlflowClient(tracking_uri=ready(tracking_uri(cfg)))


def experiment_id(cfg: Config, name: str | None = None) -> str:
    """The id of experiment ``name`` (default ``cfg.tracking.experiment``), created with an
    explicit artifact location under ``cfg.tracking.artifact_root`` when missing."""
    name = name or cfg.tracking.experiment
    c = client(cfg)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    root = Path(cfg.tracking.artifact_root or Path(cfg.work_dir) / "mlartifacts")
    location = root.resolve() / name
    location.mkdir(parents=True, exist_ok=True)
    try:
        return c.create_experiment(name, artifact_location=location.as_uri())
    except Exception:  # created concurrently by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _param_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= MAX_PARAM_LEN else s[: MAX_PARAM_LEN - 3] + "..."


class Run:
    """One MLflow run addressed by id: safe to pass to (and use from) any thread or task."""

    def __init__(self, tracking: str, run_id: str):
        self.tracking_uri, self.run_id = tracking, run_id
        self.client = MlflowClient(tracking_uri=ready(tracking))

    def __repr__(self) -> str:
        return f"Run({self.run_id})"

    def __reduce__(self):  # tasks may receive it; rebuild the client on the other side
        return (Run, (self.tracking_uri, self.run_id))

    # -- logging --------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(str(k)[:250], _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i: i + 100], synchronous=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i: i + 1000], synchronous=True)

    def log_series(self, key: str, values: Sequence[float], steps: Sequence[int] | None = None) -> None:
        """A per-step metric series (e.g. PSNR per slice, step = slice index)."""
        now = int(time.time() * 1000)
        steps = list(range(len(values))) if steps is None else list(steps)
        items = [Metric(key, float(v), now, int(s)) for v, s in zip(values, steps, strict=True)
                 if math.isfinite(float(v))]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i: i + 1000], synchronous=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v), synchronous=True)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a finished file or directory (never a file still being written)."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
        """Rows of dicts as an MLflow table (JSON, shown in the UI) plus a CSV copy."""
        if not rows:
            return
        columns = list(rows[0])
        with warnings.catch_warnings():  # pandas 3 deprecation inside mlflow's log_table
            warnings.simplefilter("ignore")
            self.client.log_table(self.run_id, {c: [r.get(c) for r in rows] for c in columns},
                                  artifact_file)
        csv = ",".join(columns) + "\n" + "\n".join(
            ",".join(_csv_cell(r.get(c)) for c in columns) for r in rows) + "\n"
        self.client.log_text(self.run_id, csv, str(Path(artifact_file).with_suffix(".csv")))

    def log_figure(self, figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    # -- lifecycle ------------------------------------------------------------------------------
    def finish(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, error: BaseException | str) -> None:
        """Mark FAILED with the reason as tags (``error``, ``error_type``) and a traceback file."""
        reason = describe(error)
        tags = {"error": reason[:5000],
                "error_type": "str" if isinstance(error, str) else type(error).__name__}
        try:
            self.set_tags(tags)
            if isinstance(error, BaseException):
                self.log_text("".join(traceback.format_exception(error)), "error.txt")
        finally:
            self.client.set_terminated(self.run_id, "FAILED")

    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status


def describe(error: BaseException | str) -> str:
    """``Type: message``; a termination signal without a message says which signal."""
    if isinstance(error, str):
        return error
    text = str(error)
    number = getattr(error, "signal", None)
    if isinstance(number, int) and text in ("", str(number)):
        try:
            text = f"terminated by {signal.Signals(number).name}"
        except ValueError:
            text = f"terminated by signal {number}"
    return f"{type(error).__name__}: {text or 'no message'}"


def _csv_cell(v: Any) -> str:
    s = "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
    return f'"{s}"' if "," in s else s


# -- runs whose process died -----------------------------------------------------------------
def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat``, field 22), so a
    reused pid is not mistaken for the process that created a run; "" where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]


def _owner_tags() -> dict[str, str]:
    """Who runs this run: host, pid and the pid's start time (``reap_stale_runs``)."""
    pid = os.getpid()
    return {"recon.host": socket.gethostname(), "recon.pid": str(pid),
            "recon.pid_start": _start_time(pid)}


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return not start or _start_time(pid) in ("", start)


_REAPED: set[str] = set()


def reap_stale_runs(cfg: Config) -> list[str]:
    """Mark KILLED, with the reason, every RUNNING run of the store created on this host by a
    process that no longer exists (``kill -9``, a crash, a lost node), and remove the streaming
    scratch (``.stream-*``) it left under its run folder. Returns their ids. Runs of live
    processes and of other hosts are left alone. Done once per process and store, when the
    first run is created."""
    c = client(cfg)
    host = socket.gethostname()
    experiments = [e.experiment_id for e in c.search_experiments()]
    reaped = []
    for run in (c.search_runs(experiments, filter_string="attributes.status = 'RUNNING'",
                              max_results=10_000) if experiments else []):
        t = run.data.tags
        if t.get("recon.host") != host or not t.get("recon.pid", "").isdigit():
            continue
        pid = int(t["recon.pid"])
        if _alive(pid, t.get("recon.pid_start", "")):
            continue
        reason = (f"the process that ran it (pid {pid} on {host}) ended without closing it: "
                  "killed (e.g. kill -9) or crashed; marked when the store was next used")
        c.set_tag(run.info.run_id, "error", reason, synchronous=True)
        c.set_tag(run.info.run_id, "error_type", "Killed", synchronous=True)
        c.set_terminated(run.info.run_id, "KILLED")
        work = run.data.params.get("work_dir")
        if work:
            for scratch in (Path(work) / "runs" / run.info.run_id).rglob(".stream-*"):
                shutil.rmtree(scratch, ignore_errors=True)
        reaped.append(run.info.run_id)
    return reaped


def create_run(cfg: Config, run_name: str, parent_run_id: str | None = None,
               tags: Mapping[str, Any] | None = None, experiment: str | None = None) -> Run:
    """A new RUNNING run; nested under ``parent_run_id`` (``mlflow.parentRunId`` tag) when given.
    It carries its host and pid, so that a later process can tell it was killed
    (``reap_stale_runs``, run once per process and store here)."""
    uri = tracking_uri(cfg)
    if uri not in _REAPED:
        _REAPED.add(uri)
        reap_stale_runs(cfg)
    c = client(cfg)
    all_tags = {RUN_NAME_TAG: run_name, "recon.config_name": cfg.name, **_owner_tags(),
                **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = c.create_run(experiment_id(cfg, experiment), run_name=run_name,
                       tags={k: str(v) for k, v in all_tags.items()})
    return Run(tracking_uri(cfg), run.info.run_id)


@contextmanager
def run_context(cfg: Config, run_name: str, parent_run_id: str | None = None,
                tags: Mapping[str, Any] | None = None, log_config: bool = True,
                experiment: str | None = None) -> Iterator[Run]:
    """Create a run, log the resolved config (params + ``config.yaml``), yield it; FINISHED on
    success, FAILED with the reason on any exception (re-raised)."""
    run = create_run(cfg, run_name, parent_run_id, tags, experiment)
    try:
        if log_config:
            run.log_params(cfg.resolved())
            run.log_text(cfg.to_yaml(), "config/resolved.yaml")
        yield run
    except BaseException as err:
        run.fail(err)
        if not any(n.startswith(FAILED_RUN_NOTE) for n in getattr(err, "__notes__", [])):
            err.add_note(f"{FAILED_RUN_NOTE} {run.run_id} ({run_name})")  # the innermost run
        raise
    else:
        run.finish()


def run_failed(cfg: Config, run_name: str, error: BaseException | str,
               parent_run_id: str | None = None, tags: Mapping[str, Any] | None = None) -> Run:
    """Record a run that failed before it could start (e.g. invalid inputs)."""
    run = create_run(cfg, run_name, parent_run_id, tags)
    run.fail(error)
    return run


def child_runs(cfg: Config, parent_run_id: str) -> list:
    """MLflow runs whose ``mlflow.parentRunId`` is ``parent_run_id`` (oldest first)."""
    c = client(cfg)
    exp = c.get_run(parent_run_id).info.experiment_id
    runs = c.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                         order_by=["attributes.start_time ASC"], max_results=1000)
    return list(runs)
