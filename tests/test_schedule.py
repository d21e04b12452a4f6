"""Scheduling against a real Prefect server on loopback; refusing clearly without one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration  # flows, servers, subprocesses: not in make test-fast

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "default.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(tmp / "prefect"), RECON_WORK_DIR=str(tmp / "work"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1",
               **extra)
    return env


def _stop(proc: subprocess.Popen, timeout: float = 15) -> str:
    """Stop a process group we started (SIGTERM, then SIGKILL); return its output."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)
    out = proc.stdout.read() if proc.stdout else ""
    return out[-4000:]


def _wait_for_api(api: str, alive: Callable[[], None], output: Callable[[], str],
                  timeout: float = 120) -> None:
    """Poll ``api``/health until it answers 200; ``alive`` asserts the processes still run,
    ``output`` gives their output for the failure message."""
    deadline = time.monotonic() + timeout
    while True:
        alive()
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"server did not start:\n{output()}"
        time.sleep(0.5)


def test_schedule_without_server_explains(tmp_path):
    env = _env(tmp_path)
    out = subprocess.run([sys.executable, "-m", "recon", "schedule", str(CONFIG),
                          "--cron", "0 2 * * *"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "PREFECT_API_URL" in out.stdout and "prefect server start" in out.stdout
    assert "never fire" in out.stdout


@pytest.mark.slow
def test_serve_creates_scheduled_runs_on_a_real_server(tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    server_env = _env(tmp_path, PREFECT_SERVER_DATABASE_CONNECTION_URL=(
        f"sqlite+aiosqlite:///{tmp_path / 'server.db'}"), PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS="2")
    prefect_bin = str(Path(sys.executable).with_name("prefect"))
    server = subprocess.Popen([prefect_bin, "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], cwd=tmp_path, env=server_env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    served = None
    try:
        def alive() -> None:
            assert server.poll() is None, f"prefect server exited:\n{_stop(server)}"

        _wait_for_api(api, alive, lambda: _stop(server))

        served = subprocess.Popen(
            [sys.executable, "-m", "recon", "schedule", str(CONFIG), "--cron",
             "0 3 * * *", "--name", "nightly-test", "--set", "reconstruct.steps=4"],
            cwd=ROOT, env=_env(tmp_path, PREFECT_API_URL=api), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)

        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterName,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType
        from prefect.settings import PREFECT_API_URL, temporary_settings

        runs, deployments = [], []
        deadline = time.monotonic() + 150
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                assert served.poll() is None, f"serve exited:\n{_stop(served)}"
                deployments = client.read_deployments(deployment_filter=DeploymentFilter(
                    name=DeploymentFilterName(any_=["nightly-test"])))
                if deployments:
                    runs = client.read_flow_runs(
                        deployment_filter=DeploymentFilter(name=DeploymentFilterName(
                            any_=["nightly-test"])),
                        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                            type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
                    if runs:
                        break
                time.sleep(2)
        assert deployments, f"no deployment was created:\n{_stop(served)}"
        assert runs, f"no scheduled run was created:\n{_stop(served)}"
        dep = deployments[0]
        assert dep.schedules and dep.schedules[0].schedule.cron == "0 3 * * *"
        assert dep.parameters["overrides"] == ["reconstruct.steps=4"]
        assert all(r.expected_start_time.hour == 3 and r.expected_start_time.minute == 0
                   for r in runs)

        # prefect.yaml: the GPU work-pool deployments register as written
        env = _env(tmp_path, PREFECT_API_URL=api)
        for cmd in ([prefect_bin, "work-pool", "create", "gpu", "--type", "process"],
                    [prefect_bin, "--no-prompt", "deploy", "--all"]):
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            deps = {d.name: d for d in client.read_deployments(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["gpu-nightly", "gpu-pipeline", "gpu-compare"])))}
        assert set(deps) == {"gpu-nightly", "gpu-pipeline", "gpu-compare"}
        assert all(d.work_pool_name == "gpu" for d in deps.values())
        assert deps["gpu-nightly"].entrypoint == "pipelines/flows.py:reconstruct"
        assert deps["gpu-nightly"].schedules[0].schedule.cron == "0 2 * * *"
        assert deps["gpu-pipeline"].job_variables["env"]["RECON_WORK_DIR"] == "/opt/recon/work"
    finally:
        if served is not None:
            _stop(served)
        _stop(server)
