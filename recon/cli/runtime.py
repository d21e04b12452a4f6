"""How the ``recon`` command runs a flow: the config loaded (exit 2 with the reasons), Prefect set
up for its work dir before Prefect is imported, and the flow run with one line on failure and
within seconds on Ctrl-C or SIGTERM (exit 130 / 143)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import typer

from recon.cli.console import console
from recon.config import Config, ConfigError, fields_only, load_config
from recon.config.prior import CheckpointError
from recon.data.manifest import DataError
from recon.reconstruct.input_checks import check_files, check_prior, dangling_link

ROOT = Path(__file__).resolve().parents[2]


def config_path(config: str) -> Path:
    """``demo`` -> ``configs/demo.yaml`` when no such file exists as given."""
    p = Path(config)
    if p.is_file():
        return p
    for root in (Path.cwd(), ROOT):
        for cand in (root / "configs" / config, root / "configs" / f"{config}.yaml"):
            if cand.is_file():
                return cand
    return p


def load(config: str, overrides: list[str] | None, record: bool = False,
         base_dir: Path | None = None) -> Config:
    """The validated config, checked against the files it names (``check_files``), or exit 2
    with the reasons (``record``: also leave a FAILED MLflow run saying why). The fields and
    the files are checked before any component is built (nothing imports torch for a refusal)."""
    path = config_path(config)
    try:
        with fields_only():
            check_files(load_config(path, overrides or [], base_dir=base_dir))
        cfg = load_config(path, overrides or [], base_dir=base_dir)
        check_prior(cfg)
        return cfg
    except ConfigError as err:
        console.print(f"[bold red]invalid configuration[/]\n{err}", highlight=False)
        if record:
            _record_config_failure(config, overrides, err)
        raise typer.Exit(2) from None


def prepare(config: str, overrides: list[str] | None, verbose: bool = False,
            base_dir: Path | None = None, embedded_api: bool = True,
            operator_check: bool = False) -> Config:
    """Validate the config (exit 2 with the reasons if invalid; ``operator_check``: its
    ``compare.operator`` too) and set up Prefect's settings for its work dir *before* Prefect
    is imported (``embedded_api``: and start Prefect's embedded API as a child of this process
    unless ``PREFECT_API_URL`` names a server)."""
    cfg = load(config, overrides, record=True, base_dir=base_dir)
    if operator_check:
        try:
            _ = cfg.compare_operator
        except ConfigError as err:
            console.print(f"[bold red]invalid configuration[/]\n{err}", highlight=False)
            raise typer.Exit(2) from None
    problem = unwritable(cfg.work_dir)
    if problem:
        console.print(f"[bold red]invalid configuration[/]\n  work_dir: {problem}",
                      highlight=False)
        raise typer.Exit(2)
    setup_prefect(cfg, verbose, embedded_api)
    return cfg


WORK_SUBFOLDERS = ("runs", "cache", "prefect", "mlartifacts", "prior")
"""What the flows create below ``work_dir`` (a user may link them to a bigger disk)."""


def unwritable(folder: Path) -> str | None:
    """Why nothing can be written under ``folder`` (created if missing), or None; a link in it
    (``runs``, ``cache``, ...) to a folder that does not exist is named too."""
    for sub in (Path(folder), *(Path(folder) / name for name in WORK_SUBFOLDERS)):
        if link := dangling_link(sub):
            return link
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        return (f"{folder} is not a writable folder ({err.strerror or type(err).__name__}); "
                "set work_dir to one you can write to")
    return None


VERBOSE = False
"""``--verbose``: Prefect's INFO logs and the traceback of a failure."""


def setup_prefect(cfg, verbose: bool = False, embedded_api: bool = True) -> None:
    """Quiet Prefect's INFO logs unless ``verbose``; its state under ``cfg.work_dir``; its
    embedded API started now, from this (main) thread, as a child that dies with this process
    (``pipelines.embedded_api``), unless ``PREFECT_API_URL`` is set."""
    global VERBOSE
    VERBOSE = verbose
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # a local cluster's chatter
    use_work_dir(cfg.work_dir)
    if embedded_api:
        from pipelines.embedded_api import start

        try:
            start()
        except RuntimeError as err:
            console.print(f"[bold red]Prefect API:[/] {err}", highlight=False)
            raise typer.Exit(1) from None


def use_work_dir(work_dir: str | Path) -> None:
    """Make ``work_dir`` the pipelines' work dir (PREFECT_HOME below it unless set by the
    user, ``pipelines.settings.configure``). Must happen before Prefect is first imported: it
    reads its settings once."""
    if "prefect" in sys.modules:
        from pipelines.settings import default_work_dir

        if Path(work_dir).resolve() != default_work_dir():
            console.print(f"[yellow]note:[/] Prefect was already set up for "
                          f"{default_work_dir()}; PREFECT_HOME stays there", highlight=False)
        return
    os.environ["RECON_WORK_DIR"] = str(Path(work_dir).resolve())
    from pipelines.settings import configure

    configure(work_dir)


def _record_config_failure(config: str, overrides: list[str] | None, err: Exception) -> None:
    """An invalid config leaves a FAILED MLflow run saying why in the user's store, when there is
    one: a first typo in a new folder creates no store (nor imports MLflow). Best effort, and
    quiet, so the reason stays the last line on screen."""
    from recon.config import fallback_config

    try:
        cfg = fallback_config(str(config_path(config)), overrides or [])
        if not _store_exists(cfg):
            return
        from pipelines.tracking import run_failed

        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        run_failed(cfg, "config", err, tags={"recon.flow": "config",
                                             "recon.overrides": " ".join(overrides or [])})
    except Exception:  # noqa: BLE001 - never hide the config error behind a tracking error
        pass


def _store_exists(cfg: Config) -> bool:
    """Whether ``cfg``'s MLflow store is already there: a server, or a sqlite file that exists
    (``pipelines.tracking.tracking_uri``, which would create it)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri
    if uri is None:
        return (Path(cfg.work_dir) / "mlflow.db").is_file()
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).is_file()
    return True


class _NoTracebacks(logging.Filter):
    """Keeps Prefect's console quiet about a failure the CLI reports in one line: drops its
    ``Encountered exception`` records (with their tracebacks), ``Finished in state Failed`` and
    ``Crashed`` (a slab stopped by Ctrl-C, ``recon.classical.cancellation``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect"):
            return True
        return record.exc_info is None and not record.getMessage().startswith(
            ("Encountered exception", "Finished in state Failed", "Finished in state Crashed",
             "Crash detected"))


def _quiet_failures() -> None:
    """``_NoTracebacks`` on the console handlers Prefect put on the root logger when it was
    imported (its API log shipping, on the flow and task run loggers, keeps everything)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not any(
                isinstance(f, _NoTracebacks) for f in handler.filters):
            handler.addFilter(_NoTracebacks())


USER_ERRORS = (DataError, ConfigError, CheckpointError)
"""What the user can fix in their files: exit code 2, like an invalid config on load."""


class Terminated(BaseException):
    """SIGTERM (``timeout``, systemd, Slurm) while a flow runs; ``signal`` names it for the
    FAILED run's reason (``pipelines.tracking.describe``)."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signal = signum


def _terminated(signum: int, _frame) -> None:
    raise Terminated(signum)


def _stop_now(code: int, message: str) -> None:
    """Print ``message`` and end the process with ``code`` at once. The flow's MLflow runs are
    already marked (the interrupt passed through their contexts); what is left are task threads
    busy in a slab, which an ordinary exit would wait for (minutes); Prefect's embedded API and
    a local Dask cluster's workers end with this process (``pipelines.embedded_api``, Dask's
    parent watch)."""
    console.print(message, highlight=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_flow(fn, *args, **kwargs) -> Any:
    """Run a flow; a failure prints one line (the reason and the FAILED MLflow run, whose
    ``error.txt`` holds the traceback) and exits 2 for bad data, config or checkpoint
    (``USER_ERRORS``), else 1; ``--verbose`` also prints the traceback.
    Ctrl-C (SIGINT) and SIGTERM stop it within seconds, its runs marked FAILED with the signal:
    one line, exit 130 / 143."""
    if not VERBOSE:
        _quiet_failures()
    previous = signal.signal(signal.SIGTERM, _terminated)  # Prefect hands SIGTERM back to it
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        _stop_now(130, f"[red]{fn.__name__} interrupted (SIGINT); its runs are marked FAILED[/]")
    except Terminated:
        _stop_now(143, f"[red]{fn.__name__} terminated (SIGTERM); its runs are marked FAILED[/]")
    except Exception as err:  # noqa: BLE001 - the flow's error, shown plainly
        from pipelines.tracking import FAILED_RUN_NOTE, describe

        if VERBOSE:
            console.print_exception()
        reason = " ".join(line.strip() for line in describe(err).splitlines() if line.strip())
        notes = [n for n in getattr(err, "__notes__", []) if n.startswith(FAILED_RUN_NOTE)]
        where_ = f" ({notes[0]}; its error.txt has the traceback)" if notes else ""
        console.print(f"[bold red]{fn.__name__} failed:[/] {reason[:500]}{where_}",
                      highlight=False, soft_wrap=True)
        raise typer.Exit(2 if isinstance(err, USER_ERRORS) else 1) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
