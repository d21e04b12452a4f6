"""Serve a flow with a cron schedule against a Prefect server.

    prefect server start                                   # on the server host
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m pipelines.serve --config configs/default.yaml --cron "0 2 * * *"
    # or: recon schedule configs/default.yaml --cron "0 2 * * *"

Cron schedules are evaluated by the *server's* scheduler service. The embedded (ephemeral) API
that the other commands use by default lives only as long as one process and runs no scheduler,
so a schedule served against it would silently never fire: without ``PREFECT_API_URL`` this
command refuses with an explanation instead.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import pipelines  # noqa: F401  (Prefect settings before prefect is imported)
from pipelines.settings import api_url

NO_SERVER = """\
Scheduling needs a running Prefect server, and PREFECT_API_URL is not set.

Cron schedules are evaluated by the scheduler service of a Prefect server. Without
PREFECT_API_URL the flows run on Prefect's embedded API, which exists only while one command
runs and has no scheduler: a schedule served against it would never fire. Start a server and
point this command at it:

    prefect server start                      # keep it running (another terminal / the server host)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    recon schedule {config} --cron "{cron}"    # or: python -m pipelines.serve ...

To run work on GPU hosts instead of this process, see prefect.yaml (work pool "gpu")."""


class ScheduleError(RuntimeError):
    """Scheduling is impossible as configured (no server, unreachable server, bad cron)."""


def check_server(config: str = "configs/default.yaml", cron: str = "0 2 * * *") -> str:
    """The API URL, or ``ScheduleError`` explaining how to start a server."""
    url = api_url()
    if not url:
        raise ScheduleError(NO_SERVER.format(config=config, cron=cron))
    from prefect.client.orchestration import get_client

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
    from prefect.schedules import Cron

    try:
        return Cron(cron, timezone=timezone)
    except Exception as err:  # noqa: BLE001 - pydantic/croniter errors
        raise ScheduleError(f"invalid cron expression {cron!r}: {err}") from None


def build_deployment(config: str | Path, overrides: Sequence[str] = (), cron: str = "0 2 * * *",
                     name: str = "nightly", flow: str = "reconstruct", timezone: str | None = None):
    """A ``RunnerDeployment`` of ``flow`` with a cron schedule; the config is validated first
    (a broken config must not be scheduled) and passed by path + overrides."""
    from pipelines.flows import FLOWS
    from recon.config import load_config

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
    from prefect import serve as prefect_serve

    check_server(str(config), cron)
    deployment = build_deployment(config, overrides, cron, name, flow, timezone)
    prefect_serve(deployment, limit=limit, pause_on_shutdown=False)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.serve", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="dotted override, e.g. reconstruct.steps=32 (repeatable)")
    p.add_argument("--cron", default="0 2 * * *", help='cron expression (default "0 2 * * *")')
    p.add_argument("--timezone", default=None, help="IANA time zone of the cron (default UTC)")
    p.add_argument("--name", default="nightly", help="deployment name")
    p.add_argument("--flow", default="reconstruct", help="flow to serve (default reconstruct)")
    args = p.parse_args(argv)
    try:
        serve(args.config, args.overrides, args.cron, args.name, args.flow, args.timezone)
    except ScheduleError as err:
        print(err)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
