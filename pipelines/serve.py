"""Serve a flow with a cron schedule against a Prefect server.

    prefect server start                                   # on the server host
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    recon schedule configs/default.yaml --cron "0 2 * * *"

Cron schedules are evaluated by the *server's* scheduler service. The embedded (ephemeral) API
that the other commands use by default lives only as long as one process and runs no scheduler,
so a schedule served against it would silently never fire: without ``PREFECT_API_URL`` this
command refuses with an explanation instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from prefect import serve as prefect_serve
from prefect.client.orchestration import get_client
from prefect.schedules import Cron

from pipelines.flows import FLOWS
from pipelines.settings import api_url
from recon.config import load_config

NO_SERVER = """\
Scheduling needs a running Prefect server, and PREFECT_API_URL is not set.

Cron schedules are evaluated by the scheduler service of a Prefect server. Without
PREFECT_API_URL the flows run on Prefect's embedded API, which exists only while one command
runs and has no scheduler: a schedule served against it would never fire. Start a server and
point this command at it:

    prefect server start                      # keep it running (another terminal / the server host)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    recon schedule {config} --cron "{cron}"

To run work on GPU hosts instead of this process, see prefect.yaml (work pool "gpu")."""


class ScheduleError(RuntimeError):
    """Scheduling is impossible as configured (no server, unreachable server, bad cron)."""


def check_server(config: str = "configs/default.yaml", cron: str = "0 2 * * *") -> str:
    """The API URL, or ``ScheduleError`` explaining how to start a server."""
    url = api_url()
    if not url:
        raise ScheduleError(NO_SERVER.format(config=config, cron=cron))
    with get_client(sync_client=True) as client:
        try:
            err = client.api_healthcheck()
        except Exception as exc:  # noqa: BLE001 - any transport error means "unreachable"
            err = exc
    if err is not None:
        raise ScheduleError(f"the Prefect server at PREFECT_API_URL={url} is not reachable "
                            f"({type(err).__name__}: {err}); is `prefect server start` running?")
    return url


def check_cron(cron: str, timezone: str | None = None):
    """A ``prefect.schedules.Schedule`` for ``cron`` or ``ScheduleError``."""
    try:
        return Cron(cron, timezone=timezone)
    except Exception as err:  # noqa: BLE001 - pydantic/croniter errors
        raise ScheduleError(f"invalid cron expression {cron!r}: {err}") from None


def build_deployment(config: str | Path, overrides: Sequence[str] = (), cron: str = "0 2 * * *",
                     name: str = "nightly", flow: str = "reconstruct", timezone: str | None = None):
    """A ``RunnerDeployment`` of ``flow`` with a cron schedule; the config is validated first
    (a broken config must not be scheduled) and passed by path + overrides."""
    if flow not in FLOWS:
        raise ScheduleError(f"unknown flow {flow!r}; valid flows: {sorted(FLOWS)}")
    load_config(config, list(overrides))
    schedule = check_cron(cron, timezone)
    return FLOWS[flow].to_deployment(
        name=name, schedules=[schedule], tags=["recon", "scheduled"],
        parameters={"config": str(Path(config).resolve()), "overrides": list(overrides)},
        description=f"{flow} on {config} at cron {cron!r}")


def serve(config: str | Path, overrides: Sequence[str] = (), cron: str = "0 2 * * *",
          name: str = "nightly", flow: str = "reconstruct", timezone: str | None = None,
          limit: int | None = 1) -> None:
    """Check the server, build the deployment and serve it (blocks until interrupted)."""
    check_server(str(config), cron)
    deployment = build_deployment(config, overrides, cron, name, flow, timezone)
    prefect_serve(deployment, limit=limit, pause_on_shutdown=False)
