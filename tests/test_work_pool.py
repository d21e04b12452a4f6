"""The ``gpu`` process work pool on a real Prefect server: two workers run two flow runs at once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_schedule import _env, _free_port, _stop, _wait_for_api

pytestmark = pytest.mark.integration  # flows, servers, subprocesses: not in make test-fast

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = """\
from prefect import flow
flow.from_source(source={root!r}, entrypoint="pipelines/flows.py:reconstruct").deploy(
    name="wp-test", work_pool_name="gpu", print_next_steps=False, ignore_warnings=True)
"""


def _ancestors(pid: int) -> set[int]:
    """``pid`` and its parents, read from /proc (empty once the process is gone)."""
    out: set[int] = set()
    while pid > 1 and pid not in out:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        out.add(pid)
        pid = int(stat.rpartition(")")[2].split()[1])  # the field after "(comm) state" is ppid
    return out


def _tails(procs: dict[str, subprocess.Popen]) -> str:
    return "\n".join(f"--- {name}:\n{_stop(p)[-2500:]}" for name, p in procs.items())


@pytest.mark.slow
def test_two_workers_run_two_flow_runs_at_the_same_time(tmp_path):
    """Two ``prefect worker start --pool gpu --limit 1`` processes each take one of two
    ``reconstruct`` flow runs of a deployment registered from this checkout, and the runs execute
    concurrently: both COMPLETED, their Running intervals overlap, each was labelled with a
    different worker by Prefect, and each flow-run process descends from that worker's process."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc to tie flow-run processes to their workers")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    prefect_bin = str(Path(sys.executable).with_name("prefect"))
    procs: dict[str, subprocess.Popen] = {}

    def spawn(name: str, cmd: list[str], env: dict[str, str]) -> None:
        procs[name] = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def alive() -> None:
        for name, p in procs.items():
            assert name == "deploy" or p.poll() is None, f"{name} exited:\n{_tails(procs)}"

    spawn("server", [prefect_bin, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
          _env(tmp_path, PREFECT_SERVER_DATABASE_CONNECTION_URL=(
              f"sqlite+aiosqlite:///{tmp_path / 'server.db'}"), PREFECT_UI_ENABLED="false"))
    try:
        _wait_for_api(api, alive, lambda: _tails(procs))

        env = _env(tmp_path, PREFECT_API_URL=api)
        done = subprocess.run([prefect_bin, "work-pool", "create", "gpu", "--type", "process"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        # registering imports the flow module (torch, mlflow): do it while the workers start
        spawn("deploy", [sys.executable, "-c", DEPLOY.format(root=str(ROOT))], env)
        worker_env = _env(tmp_path, PREFECT_API_URL=api, PREFECT_WORKER_QUERY_SECONDS="1")
        for name in ("w1", "w2"):
            spawn(name, [prefect_bin, "worker", "start", "--pool", "gpu", "--limit", "1", "--name",
                         name], worker_env)

        from prefect.client.orchestration import get_client
        from prefect.client.schemas.objects import StateType, WorkerStatus
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            # both workers polling and the deployment registered, so both runs are offered at once
            deadline = time.monotonic() + 300  # a busy 2-core CI machine: imports alone take a minute
            while True:
                alive()
                online = {w.name for w in client.read_workers_for_work_pool("gpu")
                          if w.status == WorkerStatus.ONLINE}
                if online >= {"w1", "w2"} and procs["deploy"].poll() is not None:
                    break
                assert time.monotonic() < deadline, f"workers online: {online}\n{_tails(procs)}"
                time.sleep(0.5)
            assert procs["deploy"].returncode == 0, f"deploy failed:\n{_tails(procs)}"

            # one shared work dir (as on a GPU host); different seeds, so neither run can take the
            # other's cached slab
            work = tmp_path / "work"
            overrides = [f"work_dir={work}", "reconstruct.steps=2", "reconstruct.operators=[fourier]",
                         "reconstruct.baselines=[]", "reconstruct.warm_start=null",
                         "data.max_slices=1", "reconstruct.progress=false",
                         "data.volumes=[colin27_t1]"]
            deployment = client.read_deployment_by_name("reconstruct/wp-test")
            ids = [client.create_flow_run_from_deployment(deployment.id, parameters={
                "config": str(ROOT / "configs" / "demo.yaml"),
                "overrides": [*overrides, f"reconstruct.seed={seed}"]}).id for seed in (1, 2)]

            # which worker process each flow-run process descends from, seen while it runs
            workers = {name: procs[name].pid for name in ("w1", "w2")}
            parent_of: dict[str, str] = {}
            deadline = time.monotonic() + 600
            while True:
                alive()
                runs = [client.read_flow_run(i) for i in ids]
                for r in runs:
                    if r.infrastructure_pid and str(r.id) not in parent_of:
                        tree = _ancestors(int(r.infrastructure_pid.rpartition(":")[2]))
                        for name, pid in workers.items():
                            if pid in tree:
                                parent_of[str(r.id)] = name
                if all(r.state.is_final() for r in runs):
                    break
                assert time.monotonic() < deadline, \
                    f"runs not done: {[r.state.name for r in runs]}\n{_tails(procs)}"
                time.sleep(0.5)

        states = {r.name: (r.state.type, r.state.message) for r in runs}
        assert all(r.state.type == StateType.COMPLETED for r in runs), f"{states}\n{_tails(procs)}"
        a, b = runs
        assert a.start_time and a.end_time and b.start_time and b.end_time
        assert max(a.start_time, b.start_time) < min(a.end_time, b.end_time), \
            f"the runs did not overlap: {[(r.start_time, r.end_time) for r in runs]}"
        by_label = {str(r.id): r.labels.get("prefect.worker.name") for r in runs}
        assert sorted(by_label.values()) == ["w1", "w2"], by_label
        assert a.infrastructure_pid != b.infrastructure_pid
        assert parent_of == by_label, f"process tree {parent_of} vs Prefect's labels {by_label}"
        # each run really reconstructed: its own recon.nii.gz under work/runs/<its MLflow run>
        recons = sorted(work.glob("runs/*/colin27_t1/fourier/recon.nii.gz"))
        assert len(recons) == 2, recons
    finally:
        for p in reversed(procs.values()):
            _stop(p)
