"""Where the pipelines keep their state, set up *before* Prefect is imported.

Prefect reads its settings from the environment when it is first imported, so ``configure``
must run before that: the ``recon`` command calls it (``recon.cli.runtime.use_work_dir``) before
it imports anything of ``pipelines``; a script that runs the flows itself calls it first.
Importing ``pipelines`` changes nothing.

- ``PREFECT_HOME`` -> ``<work_dir>/prefect`` (profiles, the embedded API's sqlite database,
  persisted task results and cache records), unless the user set ``PREFECT_HOME``;
- ``PREFECT_SERVER_ANALYTICS_ENABLED=false`` and ``DO_NOT_TRACK=1`` (no telemetry);
- ``MLFLOW_LOGGING_LEVEL=WARNING`` (MLflow reads it on import);
- without ``PREFECT_API_URL``: Prefect's embedded (ephemeral) API, started on demand
  (``PREFECT_SERVER_ALLOW_EPHEMERAL_MODE=true``). With ``PREFECT_API_URL`` set, the same flows run
  against that server.

``work_dir`` is ``$RECON_WORK_DIR`` when set, else ``<project root>/work`` (the project root is
the directory holding ``pyproject.toml`` above this package; for a non-editable install, the
current directory).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

WORK_DIR_ENV = "RECON_WORK_DIR"


def project_root() -> Path:
    """The checkout this package lives in (``pyproject.toml`` next to ``pipelines/``), else cwd."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


def default_work_dir() -> Path:
    """``$RECON_WORK_DIR`` or ``<project root>/work``."""
    env = os.environ.get(WORK_DIR_ENV)
    return Path(env).expanduser().resolve() if env else project_root() / "work"


def api_url(include_embedded: bool = False) -> str | None:
    """The Prefect API the flows talk to: a user's server, else None for an embedded API (the
    one ``pipelines.embedded_api`` started for the CLI, or Prefect's own ephemeral one).
    ``include_embedded``: the embedded API's URL too (what a Dask worker must be pointed at)."""
    url = None
    if "prefect" in sys.modules:
        from prefect.settings import get_current_settings

        url = get_current_settings().api.url
        url = str(url) if url else None
        if url is None and include_embedded:
            from prefect.server.api.server import SubprocessASGIServer

            server = SubprocessASGIServer()  # Prefect's ephemeral server, a singleton
            url = server.api_url if server.running else None
    else:
        url = os.environ.get("PREFECT_API_URL") or None
    if include_embedded:
        return url
    return None if url and url == os.environ.get("RECON_EMBEDDED_API_URL") else url


def configure(work_dir: str | Path | None = None) -> Path:
    """Point Prefect at ``<work_dir>/prefect`` and switch analytics off; returns the work dir.

    Only fills variables the user did not set and creates ``PREFECT_HOME``. Must run before
    ``import prefect`` to take effect.
    """
    work = Path(work_dir).expanduser().resolve() if work_dir else default_work_dir()
    os.environ.setdefault(WORK_DIR_ENV, str(work))
    home = Path(os.environ.setdefault("PREFECT_HOME", str(work / "prefect")))
    home.mkdir(parents=True, exist_ok=True)  # Prefect only creates the last level itself
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.5")
    # mlflow logs "Creating initial MLflow database tables..." on first use of a store
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
        # the embedded API's database lives under PREFECT_HOME; give it room to start on busy hosts
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    return work
