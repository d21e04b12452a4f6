"""Hostile or unlucky input: every case is refused quickly with one clear message (issue 15)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from recon import cli
from recon.config import ConfigError, load_config
from recon.config.prior import load_prior_config
from recon.data.manifest import ManifestError, load_manifest
from recon.yaml_io import MAX_BYTES, YamlError, parse_yaml, read_yaml

pytestmark = pytest.mark.integration  # flows, servers, subprocesses: not in make test-fast

runner = CliRunner()


def alias_bomb(levels: int = 9) -> str:
    """The "billion laughs": each level lists the previous one 9 times (9^levels strings)."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "{" + ", ".join(lines) + "}"


def _quick(fn, *args, seconds: float = 1.0):
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        fn(*args)
    assert time.perf_counter() - start < seconds
    return str(info.value)


def test_an_alias_bomb_in_an_override_is_refused_at_once():
    bomb = alias_bomb()
    assert len(bomb) < 700  # a few hundred characters that would expand to 387 M strings
    msg = _quick(load_config, None, [f"name={bomb}"])
    assert "more than the 100000 allowed" in msg and "aliases" in msg and "override name=" in msg
    assert bomb not in msg  # the message names the key, not the whole value


def test_an_alias_bomb_in_a_config_or_manifest_file_is_refused(tmp_path):
    bad = tmp_path / "bomb.yaml"
    bad.write_text("name: x\n" + "\n".join(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]"
                                           if i else "a0: &a0 [lol, lol]" for i in range(9)))
    assert "aliases" in _quick(load_config, bad)
    with pytest.raises(ManifestError, match="aliases"):
        load_manifest(bad)
    with pytest.raises(YamlError, match="aliases"):
        load_prior_config(bad)
    # anchors, aliases and merge keys of a sane size still read (the public manifest uses them)
    assert parse_yaml("a: &x {k: 1}\nb: {<<: *x, j: 2}") == {"a": {"k": 1}, "b": {"k": 1, "j": 2}}


@pytest.mark.parametrize("content, fragment", [
    (os.urandom(4096), "not UTF-8 text"),
    (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "not UTF-8 text"),
    (b"name: demo\x00\x00\x00", "contains NUL bytes"),
    (b"name: [unclosed", "not valid YAML"),
    (b"name: !!python/object/apply:os.system ['echo owned']", "not valid YAML"),
])
def test_config_files_that_are_not_utf8_yaml_are_refused_in_under_a_second(tmp_path, content,
                                                                              fragment):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    assert fragment in _quick(load_config, path)


def test_oversized_yaml_is_refused_before_it_is_read(tmp_path):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as fh:
        fh.truncate(MAX_BYTES + 1)  # sparse: nothing is written, only its size
    msg = _quick(read_yaml, big)
    assert f"more than the {MAX_BYTES} allowed" in msg
    assert "more than" in _quick(load_config, None, ["name=" + "x" * (MAX_BYTES + 1)], seconds=2)


def test_the_cli_says_one_line_and_exits_2_for_a_binary_config(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(os.urandom(2048))
    out = runner.invoke(cli.app, ["config", str(path)])
    assert out.exit_code == 2
    assert "invalid configuration" in out.output and "not UTF-8 text" in out.output
    assert "Traceback" not in out.output
    out = runner.invoke(cli.app, ["config", "demo", "--set", f"name={alias_bomb()}"])
    assert out.exit_code == 2 and "aliases" in out.output and "Traceback" not in out.output


def test_real_configs_and_manifests_still_read():
    root = Path(__file__).resolve().parents[1]
    for name in ("demo", "default", "prior_native", "prior_64"):
        assert isinstance(read_yaml(root / "configs" / f"{name}.yaml"), dict)
    assert load_manifest(root / "data_manifests" / "public_brain.yaml").volumes("test")
    assert yaml.safe_load((root / "configs" / "demo.yaml").read_text()) == \
        read_yaml(root / "configs" / "demo.yaml")
    with pytest.raises(ConfigError, match="undefined alias"):
        load_config(None, ["reconstruct.steps=[1, *x]"])


def test_one_file_under_two_paths_in_train_and_test_is_a_leak(tmp_path):
    """The same bytes listed twice (two paths, two subjects, one in train, one in test) pass
    every per-entry check; the sha256 catches it."""
    sha = "ab" * 32
    entry = {"sha256": sha, "modality": "T1w"}
    manifest = {"name": "leaky", "volumes": [
        {**entry, "id": "a", "path": "a.nii.gz", "subject": "s1", "split": "train"},
        {**entry, "id": "b", "path": "copy/b.nii.gz", "subject": "s2", "split": "test"}]}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(manifest))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    msg = str(info.value)
    assert "the same file (sha256 abababababab...) is listed more than once" in msg
    assert "'a' (train: a.nii.gz), 'b' (test: copy/b.nii.gz) - a leak between splits" in msg


@pytest.mark.parametrize("affine, fragment", [
    (np.zeros((4, 4)), "singular"),
    (np.diag([1.0, 1.0, 0.0, 1.0]), "singular"),
    (np.array([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), "singular"),
    (np.where(np.eye(4) > 0, np.nan, 0.0), "NaN/Inf"),
])
def test_a_nifti_without_usable_geometry_is_refused(tmp_path, affine, fragment):
    """A singular, all-zero or NaN affine would be copied into every output, which then overlays
    nothing; the volume is refused by the manifest check and by the loader, naming why."""
    import hashlib

    import nibabel as nib

    from recon.data.loading import load_volume
    from recon.data.manifest import DataError
    from recon.data.nifti import affine_problem
    from recon.data.verify import verify

    assert affine_problem(np.diag([2.0, 2.0, 3.0, 1.0])) is None
    assert "last row" in affine_problem(np.ones((4, 4)))
    data = np.zeros((12, 10, 6), np.float32)
    data[3:9, 2:8, 1:5] = 100.0
    hdr = nib.Nifti1Header()  # written field by field: nibabel will not build such an image
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(np.float32)
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = affine[0], affine[1], affine[2]
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    path = tmp_path / "broken.nii.gz"
    nib.save(nib.Nifti1Image(data, None, header=hdr), path)
    assert affine_problem(nib.load(path).affine) is not None
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"name": "x", "volumes": [{
        "id": "broken", "path": "broken.nii.gz", "subject": "s", "split": "test",
        "modality": "T1w", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]}))
    with pytest.raises(DataError, match=f"'broken'.*{fragment}"):
        verify(load_manifest(manifest), tmp_path)
    with pytest.raises(DataError, match=fragment):
        load_volume(path, size=None)


@pytest.mark.parametrize("override, fragment", [
    ("reconstruct.operators=[{name: fourier, params: {coils: 100000}}]",
     "coils must be an integer in [1, 64]"),
    ("reconstruct.guidance={name: tweedie_covariance, params: {cg_steps: 1000000000}}",
     "cg_steps must be an integer in [1, 100]"),
    ("reconstruct.batch_size=1000000000000",
     "reconstruct.batch_size: Input should be less than or equal to 1024"),
    ("reconstruct.steps=true", "reconstruct.steps: Input should be a valid integer"),
    ("reconstruct.n_samples=2.5", "reconstruct.n_samples: Input should be a valid integer"),
    (f"reconstruct.seed={2**70}", "reconstruct.seed: Input should be less than or equal to"),
    ("data.max_slices=100000", "data.max_slices: Input should be less than or equal to 4096"),
    ("data.max_volumes=10000000", "data.max_volumes: Input should be less than or equal to"),
    ("train.steps=1000000000", "train.steps: Input should be less than or equal to 10000000"),
    ("train.batch_size=100000", "train.batch_size: Input should be less than or equal to 4096"),
    ("train.lr=5", "train.lr: Input should be less than or equal to 1"),
    ("reconstruct.tune_volumes=5000", "reconstruct.tune_volumes: Input should be less than"),
    ("compare.steps=[100000]", "steps must be integers in [1, 10000]"),
    ("compare.max_volumes=10000000", "compare.max_volumes: Input should be less than or equal"),
    ("reconstruct.baselines=[" + ", ".join(["tv"] * 65) + "]", "at most 64 items"),
    ("reconstruct.slab_slices=0", "reconstruct.slab_slices: Input should be greater than or equal"),
    ("runner.workers=100000", "runner.workers: Input should be less than or equal to 1024"),
    ("runner.threads_per_worker=true", "runner.threads_per_worker: Input should be a valid integer"),
    ("runner.kind=slurm", "runner.kind: Input should be 'local' or 'dask'"),
    ("runner.address=tcp://x:8786", "address, cluster_class, cluster_kwargs and adapt_kwargs need"),
])
def test_numbers_out_of_bounds_are_refused_on_load_in_under_a_second(override, fragment):
    """Values that would allocate gigabytes, run for ever or be silently coerced (true -> 1) are
    refused by the config schema, naming the field, before anything is built."""
    assert fragment in _quick(load_config, None, [override])


def test_an_unwritable_work_dir_is_one_line_and_exit_2(tmp_path):
    """A work_dir that cannot be written (here: below a file) is refused before Prefect or
    MLflow are touched, with the reason, not a PermissionError/NotADirectoryError traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = runner.invoke(cli.app, ["data", "demo", "--set", f"work_dir={blocker / 'work'}"])
    assert out.exit_code == 2, out.output
    assert "work_dir" in out.output and "not a writable folder" in out.output
    assert "Traceback" not in out.output and not (blocker / "work").exists()


KILLED_CHILD = """
import sys, time
from pathlib import Path
from pipelines import tracking
from recon.config import load_config
from recon.reconstruct.volumes import VolumeBuffer
work = Path(sys.argv[1])
cfg = load_config(None, [f"work_dir={work}", "tracking.experiment=kill"])
with tracking.run_context(cfg, "evaluate") as parent:
    with tracking.run_context(cfg, "reconstruct", parent.run_id) as run:
        VolumeBuffer(work / "runs" / run.run_id / "vol" / "fourier", [0, 1], (4, 4))
        print(parent.run_id, run.run_id, flush=True)
        time.sleep(120)
"""


def test_runs_of_a_killed_process_are_marked_killed_and_their_scratch_removed(tmp_path):
    """A real process holding two nested RUNNING runs and a streaming scratch folder gets
    SIGKILL: the next use of the store marks both KILLED with the reason and removes the
    scratch; a live process's runs are left alone."""
    import signal
    import subprocess
    import sys

    from pipelines import tracking

    work = tmp_path / "work"
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(work)],
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        ids = child.stdout.readline().split()
        assert len(ids) == 2, "the child did not start its runs"
        assert list((work / "runs" / ids[1]).rglob(".stream-*"))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    cfg = load_config(None, [f"work_dir={work}", "tracking.experiment=kill"])
    c = tracking.client(cfg)
    assert {c.get_run(i).info.status for i in ids} == {"RUNNING"}
    tracking._REAPED.discard(tracking.tracking_uri(cfg))
    with tracking.run_context(cfg, "rerun") as live:
        assert c.get_run(live.run_id).info.status == "RUNNING"
        assert tracking.reap_stale_runs(cfg) == []  # this live process's run stays
    for i in ids:
        run = c.get_run(i)
        assert run.info.status == "KILLED"
        assert f"pid {child.pid}" in run.data.tags["error"] and run.data.tags["error_type"] == "Killed"
    assert not list((work / "runs").rglob(".stream-*"))
    assert c.get_run(live.run_id).info.status == "FINISHED"


FIRST_RUN = """
import sys
from pipelines import tracking
from recon.config import load_config
cfg = load_config(None, [f"work_dir={sys.argv[1]}", "tracking.experiment=race"])
with tracking.run_context(cfg, "first") as run:
    pass
print(run.run_id, flush=True)
"""


def test_two_processes_may_start_on_a_new_store_at_once(tmp_path):
    """Both processes create and migrate the same new sqlite store at the same time: the
    store's first use is serialised by a lock file, so both runs exist and finished (without
    it one crashed in MLflow's migration with 'duplicate column name' or an alembic error)."""
    import subprocess
    import sys

    from pipelines import tracking

    work = tmp_path / "work"
    procs = [subprocess.Popen([sys.executable, "-c", FIRST_RUN, str(work)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    cfg = load_config(None, [f"work_dir={work}", "tracking.experiment=race"])
    c = tracking.client(cfg)
    assert {c.get_run(out.strip()).info.status for out, _ in outs} == {"FINISHED"}


def test_a_runtime_failure_prints_one_message_with_its_failed_run(tmp_path):
    """A corrupt checkpoint found while the flows run: one message naming the error and the
    FAILED MLflow run (whose error.txt holds the traceback), exit 2 (the user's file), no
    Prefect traceback;
    ``--verbose`` prints the traceback too."""
    import subprocess
    import sys

    from pipelines import tracking

    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    work = tmp_path / "work"
    args = [sys.executable, "-m", "recon", "reconstruct", "demo", "--set",
            f"prior.checkpoint={bad}", "--set", f"work_dir={work}"]
    env = {**os.environ, "COLUMNS": "400"}
    quiet = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env,
                           cwd=Path(__file__).parents[1])
    out = quiet.stdout + quiet.stderr
    assert quiet.returncode == 2, out[-3000:]
    assert "Traceback" not in out and "Encountered exception" not in out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and "failed: CheckpointError: could not read checkpoint" in out
    run_id = out.split("failed MLflow run: ")[1].split()[0]
    c = tracking.client(load_config(None, [f"work_dir={work}"]))
    run = c.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["error_type"] == "CheckpointError"
    assert "error.txt" in [a.path for a in c.list_artifacts(run_id)]
    loud = subprocess.run([*args, "--verbose"], capture_output=True, text=True, timeout=300,
                          env=env, cwd=Path(__file__).parents[1])
    assert loud.returncode == 2 and "Traceback" in loud.stdout + loud.stderr


def test_a_termination_signal_is_named_in_the_failed_run():
    """Prefect raises TerminationSignal (no message) on SIGTERM: the FAILED run says which."""
    import signal

    from prefect.exceptions import TerminationSignal

    from pipelines.tracking import describe

    assert describe(TerminationSignal(signal.SIGTERM)) == "TerminationSignal: terminated by SIGTERM"
    assert describe(RuntimeError()) == "RuntimeError: no message"


CLI_WITH_SERVER = """
import sys, time
from recon import cli
cfg = cli.prepare("demo", [f"work_dir={sys.argv[1]}"])
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    assert client.api_healthcheck() is None
import os
print(os.environ["PREFECT_API_URL"], flush=True)
time.sleep(120)
"""


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.isdigit() and stat[0] != "Z" and int(stat[1]) == pid:
            found.append(int(entry))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
@pytest.mark.parametrize("signame", ["SIGKILL", "SIGTERM"])
def test_no_prefect_server_outlives_the_cli(tmp_path_factory, signame):
    """The CLI's embedded Prefect API (uvicorn) is its only child, serves the CLI's Prefect
    client, and is gone within seconds of the CLI dying by SIGKILL or SIGTERM (before, it stayed
    as an orphan: Prefect stops it only from atexit)."""
    import signal
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    work = tmp_path_factory.getbasetemp() / "server-work"  # shared: Prefect migrates its db once
    cli_proc = subprocess.Popen([sys.executable, "-c", CLI_WITH_SERVER, str(work)],
                                stdout=subprocess.PIPE, text=True, env=env,
                                cwd=Path(__file__).parents[1])
    try:
        url = cli_proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), "the CLI did not start its server"
        (server,) = _children(cli_proc.pid)
        assert "pipelines.embedded_api" in Path(f"/proc/{server}/cmdline").read_text()
    finally:
        cli_proc.send_signal(getattr(signal, signame))
        cli_proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{server}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = Path(f"/proc/{server}").exists()
    if alive:
        os.kill(server, signal.SIGKILL)
    assert not alive, f"the Prefect server outlived the CLI's {signame}"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


# -- issue 22: code from config, a non-Dask peer at runner.address ------------------------------
def test_a_config_value_never_names_code_to_run(tmp_path):
    """``runner.cluster_class`` is imported and called: only known Dask cluster classes pass,
    on load, before anything is imported (``subprocess.Popen`` with ``args: [touch, FILE]`` once
    ran the command)."""
    marker = tmp_path / "ran"
    msg = _quick(load_config, None, ["runner.kind=dask", "runner.cluster_class=subprocess.Popen",
                                     f"runner.cluster_kwargs={{args: [touch, {marker}]}}"])
    assert "'subprocess.Popen' is not a known Dask cluster class" in msg and not marker.exists()
    for address in ("http://scheduler:8786", "tcp://scheduler", "scheduler:8786", "tcp://a b:1"):
        assert "is not a Dask scheduler address" in _quick(
            load_config, None, ["runner.kind=dask", f"runner.address={address}"])
    cfg = load_config(None, ["runner.kind=dask", "runner.cluster_class=dask_jobqueue.SLURMCluster"])
    assert cfg.runner.cluster_class == "dask_jobqueue.SLURMCluster"


def test_a_runner_address_that_is_not_a_dask_scheduler_is_named_in_seconds():
    """A web server at ``runner.address`` (distributed once read its reply as a 3 EiB frame, or
    hung), a peer that speaks first but not Dask, and a closed port are each named within
    seconds; a real Dask scheduler passes."""
    import asyncio
    import http.server
    import socket
    import socketserver
    import threading

    from distributed import Scheduler

    from pipelines.runners import check_scheduler

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)

    class Banner(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

    chatty = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Banner)
    for server in (web, chatty):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    try:
        cases = {web.server_address[1]: "says nothing within 1 s",
                 chatty.server_address[1]: "does not speak Dask's protocol",
                 closed: "no Dask scheduler there"}
        for port, fragment in cases.items():
            start = time.perf_counter()
            with pytest.raises(ValueError, match=fragment):
                check_scheduler(f"tcp://127.0.0.1:{port}", timeout=1.0)
            assert time.perf_counter() - start < 3
    finally:
        web.shutdown()
        chatty.shutdown()

    async def with_scheduler():
        async with Scheduler(host="127.0.0.1", port=0, dashboard_address=":0") as scheduler:
            await asyncio.to_thread(check_scheduler, scheduler.address, 5.0)

    asyncio.run(with_scheduler())


def test_compare_on_an_operator_that_is_not_reconstructed_is_refused_at_once():
    """Only ``recon compare`` (and ``demo``) need ``compare.operator`` among the operators; it is
    refused before Prefect starts, exit 2, naming the field."""
    start = time.perf_counter()
    out = runner.invoke(cli.app, ["compare", "demo", "--set", "reconstruct.operators=[mask]",
                                  "--set", "compare.operator=fourier"])
    assert out.exit_code == 2, out.output
    assert "compare.operator: 'fourier' is not among reconstruct.operators" in out.output
    assert "Traceback" not in out.output and time.perf_counter() - start < 10


def test_the_same_scan_in_two_splits_is_a_leak_whatever_its_file(tmp_path):
    """A gzipped copy of a training NIfTI listed as a test volume has other bytes (and sha256)
    but the same voxels: ``manifest check`` refuses it as a leak between splits, exit 2."""
    import gzip

    import nibabel as nib

    from recon.data.verify import sha256_file, verify

    vol = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "a.nii")
    (tmp_path / "copy.nii.gz").write_bytes(gzip.compress((tmp_path / "a.nii").read_bytes()))
    nib.save(nib.Nifti1Image(vol + 1, np.eye(4)), tmp_path / "other.nii")
    entries = [{"id": i, "path": f, "sha256": sha256_file(tmp_path / f), "subject": i,
                "split": sp, "modality": "T1w"}
               for i, f, sp in (("a", "a.nii", "train"), ("b", "copy.nii.gz", "test"),
                                ("c", "other.nii", "test"))]
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"schema_version": 1, "name": "m", "volumes": entries}))
    with pytest.raises(ValueError, match=r"leak between splits: a \(train, a.nii\), b \(test"):
        verify(load_manifest(manifest), tmp_path)
    out = runner.invoke(cli.app, ["manifest", "check", str(manifest), "--data-root", str(tmp_path)])
    assert out.exit_code == 2 and "leak between splits" in out.output, out.output
    entries[1]["split"] = "train"  # the same scan twice in one split: not a leak
    manifest.write_text(yaml.safe_dump({"schema_version": 1, "name": "m", "volumes": entries}))
    assert len(verify(load_manifest(manifest), tmp_path)) == 3


def test_a_dangling_link_in_the_work_dir_is_named(tmp_path):
    """``work_dir/runs`` linked to a disk that is not mounted: one line naming the link and its
    missing target, exit 2, before Prefect or MLflow start (before: FileExistsError)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "runs").symlink_to(tmp_path / "unmounted" / "runs")
    out = runner.invoke(cli.app, ["data", "demo", "--set", f"work_dir={work}"])
    assert out.exit_code == 2, out.output
    assert "is a symbolic link to" in out.output and "which does not exist" in out.output
    assert "Traceback" not in out.output


@pytest.mark.slow
def test_a_file_size_limit_is_one_line_naming_the_servers_error(tmp_path):
    """Under ``ulimit -f 300`` Prefect's embedded API dies creating its database: the CLI says
    so in one line with the error from the server's log (before: 467 lines, 6 tracebacks and
    "did not start within 90 s")."""
    import resource
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (300 * 1024, 300 * 1024))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    out = subprocess.run([sys.executable, "-m", "recon", "reconstruct", "demo", "--set",
                          f"work_dir={tmp_path / 'work'}"], env=env, preexec_fn=limit,
                         cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=240)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert "embedded API crashed" in text and "Error" in text and "Traceback" not in text
    assert len([line for line in text.splitlines() if line.strip()]) <= 3, text[-3000:]


def test_two_first_runs_in_a_new_work_dir_start_their_apis_one_after_the_other(tmp_path):
    """Two CLIs started at once on a new work dir each start Prefect's embedded API on the same
    database; the first migration is serialised (a lock in PREFECT_HOME), so neither server
    crashes in it ("index ... already exists") and both answer."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    code = ("from pipelines.embedded_api import start, _healthy; url = start(); "
            "print('healthy' if _healthy(url) else 'sick', url)")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              cwd=Path(__file__).resolve().parents[1]) for _ in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0 and "healthy http://127.0.0.1:" in out, out[-2000:]
    log = (tmp_path / "prefect" / "embedded-api.log").read_text()
    assert "already exists" not in log and "Traceback" not in log, log[-2000:]
    assert "telemetry" not in log.lower(), log[-2000:]  # our offline server sends none


def test_a_multi_line_reason_is_kept_whole_on_its_one_line(tmp_path):
    """``recon data`` with a manifest whose error spans lines ("invalid manifest X.yaml:" then
    the reason) prints the reason too, on the one line, exit 2."""
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(yaml.safe_dump({"schema_version": 1, "name": "bad", "volumes": [
        {"id": "a", "path": "../../etc/passwd", "sha256": "0" * 64, "subject": "a",
         "split": "test", "modality": "T1w"}]}))
    out = runner.invoke(cli.app, ["data", "demo", "--set", f"work_dir={tmp_path / 'work'}",
                                  "--set", f"data.manifest={manifest}",
                                  "--set", "data.volumes=null"])
    text = " ".join(out.output.split())
    assert out.exit_code == 2, out.output
    assert "bad.yaml" in text and ".." in text and "Traceback" not in out.output, out.output


# -- issue 32: hostile input, round 4 ------------------------------------------------------------
def _alive(pid: int | str) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
@pytest.mark.parametrize("signame, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_while_a_long_slab_samples_stops_the_job_in_seconds(tmp_path, signame, code):
    """Ctrl-C in a terminal (SIGINT to the foreground process group) or SIGTERM to it (timeout,
    systemd, Slurm) while one slab of 10000 steps samples (minutes of work), sent once its
    progress bar says it has started: the CLI ends with 130 / 143 within 10 s and one line, the
    slab unfinished, the runs FAILED with the signal, no process left (the embedded API in its
    own session goes with it). Before, the slab's worker thread sampled on while the main thread
    waited for it (still sampling 30 s after the signal; 7 minutes in issue 32); before issue
    15's fix, SIGINT killed the embedded API first and the CLI finished the job anyway."""
    import fcntl
    import pty
    import select
    import signal
    import struct
    import subprocess
    import sys
    import termios

    from mlflow.tracking import MlflowClient
    from test_pipelines import write_dataset, write_prior

    manifest = write_dataset(tmp_path)
    ckpt, prior_cfg = write_prior(tmp_path)
    work = tmp_path / "work"
    overrides = [
        f"work_dir={work}", f"data.manifest={manifest}", f"data.data_root={tmp_path / 'data'}",
        "data.materialise=false", "data.image_size=32", "data.volumes=null", "data.max_slices=2",
        f"prior.checkpoint={ckpt}", f"prior.config={prior_cfg}",
        "reconstruct.operators=[{name: fourier}]", "reconstruct.steps=10000",
        "reconstruct.slab_slices=null", "reconstruct.num_threads=1", "reconstruct.baselines=[]",
        "reconstruct.warm_start=null", "reconstruct.device=cpu", "reconstruct.progress=true"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    bar, terminal = pty.openpty()  # the slab's progress bar is drawn on a terminal only
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # 0 columns: no bar
    # started as a terminal's shell starts a command: SIGINT at its default disposition (a
    # process that inherits SIGINT ignored keeps it ignored, and Python then raises no
    # KeyboardInterrupt; the test process's own disposition depends on what ran before it)
    command = [sys.executable, "-m", "recon", "reconstruct", "demo",
               *[a for o in overrides for a in ("--set", o)]]
    terminal_like = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                     "os.execv(sys.executable, sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", terminal_like, *command],
                            cwd=Path(__file__).resolve().parents[1], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=terminal, start_new_session=True)
    os.close(terminal)
    try:
        drawn, deadline = "", time.monotonic() + 240
        while "[0:2]" not in drawn and proc.poll() is None and time.monotonic() < deadline:
            if select.select([bar], [], [], 1.0)[0]:
                try:
                    drawn += os.read(bar, 4096).decode(errors="replace")
                except OSError:
                    break
        assert "[0:2]" in drawn and proc.poll() is None, drawn[-3000:]
        time.sleep(3)  # well inside the slab's sampling
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                  text=True).stdout.split()
        assert any("pipelines.embedded_api" in _cmdline(int(c)) for c in children), children
        start = time.monotonic()
        os.killpg(proc.pid, getattr(signal, signame))
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out = "(still running 30 s after the signal)"
        seconds = time.monotonic() - start
        print(f"{signame}: rc {proc.returncode} after {seconds:.1f} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        os.close(bar)
    assert seconds < 10 and proc.returncode == code, (seconds, proc.returncode, out[-3000:])
    lines = [line for line in out.splitlines() if line.strip()]  # stdout: Prefect logs to stderr
    assert len(lines) == 1 and signame in lines[0] and "Traceback" not in out, out[-3000:]
    assert not list(work.rglob("slabs/*.npz")), "the slab finished: the signal came too late"
    gone = time.monotonic() + 10
    while any(map(_alive, children)) and time.monotonic() < gone:
        time.sleep(0.2)
    assert not any(map(_alive, children)), "a child of the CLI outlived it by 10 s"
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = {r.data.tags["mlflow.runName"]: r for r in
            client.search_runs([e.experiment_id for e in client.search_experiments()])}
    for name in ("reconstruct", "evaluate"):
        assert runs[name].info.status == "FAILED", name
        assert signame in runs[name].data.tags["error"] or "KeyboardInterrupt" in \
            runs[name].data.tags["error_type"], runs[name].data.tags


ROOT = Path(__file__).resolve().parents[1]
KSPACE = f"data.manifest={ROOT / 'data_manifests' / 'public_kspace.yaml'}"
BRAIN = f"data.manifest={ROOT / 'data_manifests' / 'public_brain.yaml'}"


def _run_cli(args: list[str], cwd: Path, module: str = "recon") -> tuple[int, set[str], list[str], float]:
    """``python -X importtime -m recon ARGS`` in ``cwd``: exit code, the top-level packages it
    imported, its non-empty output lines, seconds."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", module, *args], cwd=cwd,
                          env={**env, "COLUMNS": "400"}, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    names = {line.rpartition("|")[2].strip().split(".")[0]
             for line in done.stderr.splitlines() if line.startswith("import time:")}
    lines = [line for line in (done.stdout + "\n".join(
        line for line in done.stderr.splitlines() if not line.startswith("import time:"))
    ).splitlines() if line.strip()]
    return done.returncode, names, lines, seconds


@pytest.mark.parametrize("args, fragment", [
    # item 2: a DPS compare row with coupling tv_z (model_copy skipped reconstruct's rule)
    (["compare", "demo", "--set", "compare.methods=[{guidance: dps, coupling: tv_z}]"],
     "compare.methods.0: with reconstruct's other fields: coupling 'tv_z' acts inside"),
    # item 3: a data root that is a link to nothing, materialised or not
    (["reconstruct", "demo", "--set", "data.data_root=DANGLING", "--set", "data.materialise=false"],
     "data.data_root: DANGLING is a symbolic link to"),
    (["reconstruct", "demo", "--set", "data.data_root=DANGLING", "--set", "data.materialise=true"],
     "data.data_root: DANGLING is a symbolic link to"),
    # item 4: raw k-space with a volume operator, a 3-D baseline or coupling
    (["reconstruct", "kspace", "--set", KSPACE, "--set", "reconstruct.operators=[kykz_fourier]",
      "--set", "compare.operator=kykz_fourier"],
     "reconstruct.operators.0: 'kykz_fourier': raw k-space takes fourier or acquired"),
    (["compare", "kspace", "--set", KSPACE, "--set", "reconstruct.operators=[slice_drop]",
      "--set", "compare.operator=slice_drop"],
     "reconstruct.operators.0: 'slice_drop': raw k-space takes fourier or acquired"),
    (["reconstruct", "kspace", "--set", KSPACE, "--set", "reconstruct.baselines=[tv3d]"],
     "reconstruct.baselines.0: 'tv3d' solves a volume; raw k-space is reconstructed slice by"),
    (["reconstruct", "kspace", "--set", KSPACE, "--set", "reconstruct.coupling=tv_z"],
     "reconstruct.coupling: 'tv_z': raw k-space is reconstructed slice by slice"),
    (["reconstruct", "demo", "--set", BRAIN, "--set", "reconstruct.operators=[acquired]",
      "--set", "compare.operator=acquired"],
     "reconstruct.operators.0: 'acquired' reconstructs raw k-space as it was measured"),
    # item 5: a warm start at or below the timer's t_min
    (["reconstruct", "demo", "--set", "reconstruct.warm_start.t0=1e-6"],
     "warm_start.t0=1e-06 must be above the timer's t_min=0.001"),
    # item 6: the discrepancy rule without a noise level
    (["reconstruct", "demo", "--set", "reconstruct.operators=[{name: mask, lam: {tv: discrepancy}}]",
      "--set", "reconstruct.sigma_y=0", "--set", "reconstruct.baselines=[tv]",
      "--set", "compare.operator=mask"],
     "reconstruct.baselines.0: lam 'discrepancy' (for operator 'mask') needs a noise level"),
    # item 8: a missing config file, a misspelt value
    (["reconstruct", "/nonexistent.yaml"], "config file not found: /nonexistent.yaml"),
    (["reconstruct", "demo", "--set", "reconstruct.coupling=tvz"],
     "reconstruct.coupling.name: Input should be 'none' or 'tv_z' (got 'tvz')"),
])
def test_a_wrong_value_is_refused_before_any_heavy_work(tmp_path, args, fragment):
    """Issue 32, items 2-6 and 8: each wrong value is refused with exit 2, its reason (naming the
    key) the last line, in about a second: no torch, MLflow or Prefect imported, nothing written
    where the user stands (before: rc 1 after 30-100 s, or rc 2 after the data was loaded; a
    refused run left an MLflow store in ./work, its INFO lines last on screen)."""
    dangling = tmp_path / "unmounted-data"
    (tmp_path / "data-link").symlink_to(dangling)
    args = [a.replace("DANGLING", str(tmp_path / "data-link")) for a in args]
    cwd = tmp_path / "here"
    cwd.mkdir()
    code, names, lines, seconds = _run_cli(args, cwd)
    fragment = fragment.replace("DANGLING", str(tmp_path / "data-link"))
    text = " ".join(" ".join(lines).split())
    assert code == 2 and fragment in text, (code, lines[-12:])
    assert not any("INFO" in line for line in lines), lines  # the reason is the last word
    assert "Traceback" not in text and not names & {"torch", "mlflow", "prefect"}, names
    assert list(cwd.iterdir()) == [] and not dangling.exists()
    assert seconds < 20, seconds


def test_a_compare_row_without_data_consistency_runs_uncoupled(workspace):
    """Issue 32, item 2: ``reconstruct.coupling: tv_z`` with a DPS row in ``compare.methods`` (the
    shipped configs have one): the row, which has no data-consistency step to put TV along z in,
    runs uncoupled, and its sampler is built (before: "TypeError: DPS.__init__() got an
    unexpected keyword argument 'tv_z'", exit 1 after 100 s); a row asking for both is refused."""
    from recon.reconstruct.reconstruction import sampler_for

    cfg = load_config(None, [*workspace["overrides"], "reconstruct.coupling=tv_z",
                             "compare.methods=[{guidance: dps, steps: 2}, {steps: 2}]"])
    dps, plain = (m.setting(cfg.reconstruct) for m in cfg.compare.methods)
    assert dps.coupling.name == "none" and "tv_z" not in dps.label(dps.operators[1])
    assert plain.coupling.name == "tv_z"  # a row with data consistency keeps it
    sampler_for(dps.operators[1], dps, cfg.prior, None, "cpu")
    with pytest.raises(ConfigError, match="compare.methods.0: .* coupling 'tv_z' acts inside"):
        load_config(None, [*workspace["overrides"], "compare.methods=[{guidance: dps, "
                                                   "coupling: tv_z}]"])


def test_a_train_volume_saved_with_another_dtype_is_still_a_leak(tmp_path):
    """Issue 32, item 7: a uint8 train volume saved again as float32 and float64 (the same
    values) and listed as test: ``manifest check`` names the leak, exit 2 (the content digest
    hashed the dtype: it passed)."""
    import nibabel as nib

    from recon.data.verify import content_digest, sha256_file, verify

    vol = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    entries = []
    for name, dtype, split in (("a", np.uint8, "train"), ("b", np.float32, "test"),
                               ("c", np.float64, "val")):
        nib.save(nib.Nifti1Image(vol.astype(dtype), np.eye(4)), tmp_path / f"{name}.nii")
        entries.append({"id": name, "path": f"{name}.nii", "subject": name, "split": split,
                        "sha256": sha256_file(tmp_path / f"{name}.nii"), "modality": "T1w"})
    assert content_digest(vol) == content_digest(np.asfortranarray(vol, np.float64))
    assert content_digest(vol) != content_digest(vol.reshape(5, 4, 3))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"schema_version": 1, "name": "m", "volumes": entries}))
    with pytest.raises(ValueError, match=r"leak between splits: a \(train, a.nii\), b \(test, "
                                         r"b.nii\), c \(val, c.nii\)"):
        verify(load_manifest(manifest), tmp_path)
    out = runner.invoke(cli.app, ["manifest", "check", str(manifest), "--data-root", str(tmp_path)])
    assert out.exit_code == 2 and "leak between splits" in out.output, out.output


@pytest.fixture(scope="module")
def raw_scan(tmp_path_factory):
    """A small simulated multi-coil scan, fully sampled, no noise scans in a fastMRI file."""
    import nibabel as nib
    from test_kspace import phantom

    from recon.data.simulate import simulate_scan

    path = tmp_path_factory.mktemp("raw") / "head.nii.gz"
    nib.save(nib.Nifti1Image(phantom(), np.diag([1.0, 1.0, 2.0, 1.0])), path)
    return simulate_scan(path, slices=2, coils=4, noise=0.01, seed=1)


def test_a_kspace_file_without_usable_sampling_is_refused_by_the_check(raw_scan, tmp_path):
    """Issue 32, item 10: a fastMRI file whose mask is all False, and one whose acquired lines
    leave no k-space corner to measure the noise on (no noise scans), pass no more: ``manifest
    check`` names the file and the problem, exit 2 (before: accepted; the run failed with rc 1,
    "only 0 acquired k-space samples in the outer 20% corners", naming no file)."""
    import h5py

    from recon.data.kspace import KSpaceError, read_kspace, write_fastmri
    from recon.data.verify import sha256_file

    entries = []
    p = raw_scan.shape[-1]
    for name, lines in (("none", np.zeros(p, bool)),
                        ("centre", np.abs(np.arange(p) - p // 2) < 6)):
        path = write_fastmri(raw_scan, tmp_path / f"{name}.h5")
        with h5py.File(path, "r+") as f:
            f.create_dataset("mask", data=lines)
        entries.append({"id": name, "path": path.name, "sha256": sha256_file(path),
                        "subject": name, "split": "test", "modality": "T1w", "kind": "kspace"})
    with pytest.raises(KSpaceError, match=r"none.h5: slice\(s\) \[0, 1\] of 2 acquire no "
                                          r"phase-encode line"):
        read_kspace(tmp_path / "none.h5")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"schema_version": 1, "name": "m", "volumes": entries}))
    out = runner.invoke(cli.app, ["manifest", "check", str(manifest), "--data-root", str(tmp_path)])
    text = " ".join(out.output.split())
    assert out.exit_code == 2, out.output
    assert "volume 'none':" in text and "acquire no phase-encode line" in text
    assert "volume 'centre':" in text and "centre.h5: only 0 acquired k-space samples" in text
    assert "no noise scans" in text


def test_describe_says_what_a_file_is_and_writes_only_what_check_accepts(tmp_path):
    """Issue 32, item 11: a ``.h5`` that is not HDF5 is named as such (not "not a readable NIfTI
    file"), a folder as a folder (not "no such file"), ``--subject ''`` is refused (it wrote an
    entry ``check`` refuses), ``modality`` is ``unknown`` unless given (it said T1w for any
    scan), and a bad entry in a manifest is one line (a second one said "volumes: Tuple should
    have at least 1 item after validation, not 0")."""
    import nibabel as nib

    (tmp_path / "fake.h5").write_text("not HDF5")
    (tmp_path / "folder").mkdir()
    nib.save(nib.Nifti1Image(np.ones((4, 4, 3), np.float32), np.eye(4)), tmp_path / "x.nii.gz")

    def describe(*args):
        out = runner.invoke(cli.app, ["manifest", "describe", *args, "--data-root", str(tmp_path)])
        return out.exit_code, " ".join(out.output.split())

    code, text = describe(str(tmp_path / "fake.h5"))
    assert code == 2 and "fake.h5: not a readable HDF5 file" in text, text
    code, text = describe(str(tmp_path / "folder"))
    assert code == 2 and "folder is a folder, not a file" in text, text
    code, text = describe(str(tmp_path / "x.nii.gz"), "--subject", "")
    assert code == 2 and "x.nii.gz: its manifest entry would be invalid: subject:" in text, text
    code, text = describe(str(tmp_path / "x.nii.gz"))
    assert code == 0 and "modality: unknown" in text, text
    code, text = describe(str(tmp_path / "x.nii.gz"), "--modality", "FLAIR")
    assert code == 0 and "modality: FLAIR" in text, text
    bad = tmp_path / "m.yaml"
    bad.write_text(yaml.safe_dump({"name": "m", "volumes": [
        {"id": "x", "path": "x.nii.gz", "sha256": "00", "subject": "x", "split": "test",
         "modality": "T1w"}]}))
    out = runner.invoke(cli.app, ["manifest", "check", str(bad), "--data-root", str(tmp_path)])
    assert out.exit_code == 2 and "sha256 must be 64 hexadecimal digits" in out.output
    assert "Tuple should have at least 1 item" not in out.output, out.output


def test_prior_train_on_a_missing_config_is_one_line(tmp_path):
    """Issue 32, item 9: ``recon prior train /nonexistent.yaml``: one line naming the file, exit
    2, before torch is imported (before: a 46-line traceback, exit 1, 7 s)."""
    code, names, lines, seconds = _run_cli(
        ["prior", "train", str(tmp_path / "nonexistent.yaml"), "--data-root", str(tmp_path)],
        tmp_path)
    assert code == 2 and len(lines) == 1, lines
    assert f"cannot read {tmp_path / 'nonexistent.yaml'}: No such file" in lines[0]
    assert "torch" not in names and seconds < 20
    (tmp_path / "bad.yaml").write_text("training: {steps: -1}\n")
    code, _, lines, _ = _run_cli(["prior", "train", str(tmp_path / "bad.yaml"), "--data-root",
                                  str(tmp_path)], tmp_path)
    assert code == 2 and len(lines) == 1 and "training.steps: Input should be greater" in lines[0]


def test_python_m_recon_cli_is_the_command_too(tmp_path):
    """Issue 32, item 13: ``python -m recon.cli`` (the CLI is a package) runs the command."""
    code, _, lines, _ = _run_cli(["--version"], tmp_path, module="recon.cli")
    assert code == 0 and lines and lines[0].startswith("recon "), lines


def test_the_gpu_bundle_without_a_package_index_says_so_and_leaves_nothing(tmp_path):
    """Issue 32, item 12: ``benchmarks/gpu.py --bundle DIR`` where pip finds no wheels: one line
    saying what it needs, exit 2, no DIR (before: an 11-line traceback, exit 1, an empty
    ``DIR/wheels``)."""
    import subprocess
    import sys

    from recon.data.manifest import resolve

    data = tmp_path / "data"
    for v in load_manifest(ROOT / "data_manifests" / "public_brain.yaml").volumes():
        resolve(v, data).parent.mkdir(parents=True, exist_ok=True)
        resolve(v, data).write_bytes(b"a volume")  # what is copied, unread
    (tmp_path / "no-wheels").mkdir()
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(tmp_path / "no-wheels")}

    def bundle(data_root: Path) -> tuple[int, list[str]]:
        done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--bundle",
                               str(tmp_path / "bundle"), "--data-root", str(data_root)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        return done.returncode, [line for line in (done.stdout + done.stderr).splitlines()
                                 if line.strip()]

    code, lines = bundle(data)
    assert code == 2 and len(lines) == 1, lines
    assert "--bundle needs the package index" in lines[0] and "monai==" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "no-wheels"]
    code, lines = bundle(tmp_path / "elsewhere")
    assert code == 2 and len(lines) == 1 and "--bundle needs the public volumes" in lines[0]
    assert not (tmp_path / "bundle").exists()


# -- the bar of issue 32: no wrong config value reaches exit code 1 ------------------------------
NOT_A_NUMBER = ("text", "[1, 2]", "{a: 1}", ".nan", ".inf", "-.inf")


def _types(annotation) -> set:
    """The types an annotation allows, unions flattened (``Literal`` for any literal)."""
    import types
    import typing

    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_types(a) for a in typing.get_args(annotation)))
    return {typing.Literal} if origin is typing.Literal else {origin or annotation}


def _outside(field) -> list[str]:
    """Numbers just outside a field's bounds (``ge``, ``gt``, ``le``, ``lt``)."""
    import annotated_types as at

    out = []
    for m in field.metadata:
        if isinstance(m, at.Ge):
            out.append(m.ge - 1 if isinstance(m.ge, int) else m.ge - abs(m.ge) / 2 - 1e-3)
        elif isinstance(m, at.Le):
            out.append(m.le + 1 if isinstance(m.le, int) else m.le * 1.5 + 1e-3)
        elif isinstance(m, at.Gt | at.Lt):
            out.append(m.gt if isinstance(m, at.Gt) else m.lt)
    return [repr(v) for v in out]


def _wrong_values(field) -> list[str]:
    """YAML values a field of this annotation must refuse: of another type, not finite, out of
    its bounds, not one of its names."""
    from pydantic import BaseModel

    from recon.config.components import _Component

    kinds = _types(field.annotation) - {type(None)}
    if kinds <= {int}:
        return ["text", "2.5", "true", "[1]", *_outside(field)]
    if kinds <= {float, int}:
        return [*NOT_A_NUMBER, *_outside(field)]
    if kinds <= {bool}:
        return ["text", "2", "[1]"]
    if kinds <= {__import__("typing").Literal}:
        return ["nope", "[1]"]
    if kinds <= {str, Path}:
        return ["[1]", "{a: 1}"]
    if kinds <= {tuple}:
        return ["text", "[1]", "[2.0, 1.0]", "[.nan, 1.0]"]
    if kinds <= {list}:
        return ["text", "{a: 1}", "[[1]]"]
    if kinds <= {dict}:
        return ["text", "[1]"]
    if all(isinstance(k, type) and issubclass(k, BaseModel) for k in kinds):
        named = any(issubclass(k, _Component) for k in kinds)
        return ["7", "[1, 2]", *(["{name: nope}"] if named else [])]
    raise AssertionError(f"no wrong values known for {field.annotation}: add them here")


def _schema_overrides(section, prefix: str = ""):
    """``(key, "key=value")`` setting each field of ``section`` (its nested sections and the
    first item of its lists too) to each of its ``_wrong_values``, and an unknown key in it;
    components (operators, guidances, ...) are ``_component_overrides``'."""
    from recon.config.base import Section
    from recon.config.components import _Component

    yield f"{prefix}nope", f"{prefix}nope=1"
    for name, field in type(section).model_fields.items():
        key, value = f"{prefix}{name}", getattr(section, name)
        first = value[0] if isinstance(value, list) and value else value
        if isinstance(first, _Component):
            continue
        if isinstance(value, Section):
            yield from _schema_overrides(value, f"{key}.")
            yield key, f"{key}=[1, 2]"
        elif isinstance(first, Section):
            yield from _schema_overrides(first, f"{key}.0.")
            yield key, f"{key}=7"
        else:
            yield from ((key, f"{key}={v}") for v in _wrong_values(field))


COMPONENT_SLOTS = {
    "operator": "reconstruct.operators=[{{name: {name}, params: {params}}}]",
    "guidance": "reconstruct.guidance={{name: {name}, params: {params}}}",
    "integrator": "reconstruct.integrator={{name: {name}, params: {params}}}",
    "timer": "reconstruct.timer={{name: {name}, params: {params}}}",
    "baseline": "reconstruct.baselines=[{{name: {name}, params: {params}}}]",
}


def _component_overrides():
    """``(config, name to be named, "key=value")``: each kind of component with an unknown
    name, and each component of the registries with an unknown parameter and each of its
    parameters set to values of another type, not finite or negative; an operator's own
    ``lam`` and ``guidance`` too."""
    import inspect

    from recon import registry

    for kind, slot in COMPONENT_SLOTS.items():
        reg = getattr(registry, {"guidance": "GUIDANCES"}.get(kind, f"{kind.upper()}S"))
        yield "demo", kind, slot.format(name="nope", params="{}")
        for name in reg:
            config = "kspace" if name == "acquired" else "demo"  # it takes raw k-space only
            yield config, "nope", slot.format(name=name, params="{nope: 1}")
            target = reg[name]
            if inspect.isclass(target) and target.__init__ is object.__init__:
                continue
            for p in inspect.signature(target.__init__ if inspect.isclass(target)
                                       else target).parameters.values():
                if p.name in ("self", "shape", "sigma_y", "seed", "indices", "steps", "operator",
                              "tv_z"):
                    continue  # filled in by the library
                d = p.default
                if isinstance(d, bool):
                    values = ["text", "2", "[1]"]
                elif isinstance(d, str):
                    values = ["nope", "[1]"]
                else:
                    values = [*NOT_A_NUMBER, "-1", "true", *(["2.5"] if type(d) is int else [])]
                for v in values:
                    yield config, p.name, slot.format(name=name, params=f"{{{p.name}: {v}}}")
    for lam in ("{tv: -1}", "{tv: text}", "{tv: .nan}", "{tv: true}", "{nope: 1}", "[1]"):
        yield "demo", "lam", f"reconstruct.operators=[{{name: mask, lam: {lam}}}]"
    yield "demo", "guidance", "reconstruct.operators=[{name: mask, guidance: nope}]"


def _cross_field_overrides(tmp_path: Path):
    """``(command, config, name to be named, [overrides])``: values wrong only together, or
    only against the files the config names (issues 15, 22, 27, 32)."""
    (tmp_path / "a-file").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    no_val = tmp_path / "no-val.yaml"
    brain = load_manifest(ROOT / "data_manifests" / "public_brain.yaml")
    no_val.write_text(yaml.safe_dump({"name": "no-val", "volumes": [
        v.model_dump(mode="json", exclude={"provenance"}) for v in brain.volumes("test")]}))
    kspace, images = [KSPACE], [BRAIN]
    return [
        ("config", "demo", "coupling", ["reconstruct.guidance=dps", "reconstruct.coupling=tv_z",
                                        "reconstruct.operators=[mask]"]),
        ("config", "demo", "compare.methods.0", ["compare.methods=[{guidance: dps, coupling: tv_z}]"]),
        ("config", "kspace", "reconstruct.operators.0", [*kspace, "reconstruct.operators=[kykz_fourier]"]),
        ("config", "kspace", "reconstruct.operators.0", [*kspace, "reconstruct.operators=[slice_drop]"]),
        ("config", "kspace", "reconstruct.operators.0", [*kspace, "reconstruct.operators=[mask]"]),
        ("config", "kspace", "coils", [*kspace, "reconstruct.operators=[{name: fourier, params: "
                                                "{coils: 4}}]"]),
        ("config", "kspace", "reconstruct.baselines.0", [*kspace, "reconstruct.baselines=[tv3d]"]),
        ("config", "kspace", "reconstruct.coupling", [*kspace, "reconstruct.coupling=tv_z"]),
        ("config", "kspace", "reconstruct.warm_start.baseline",
         [*kspace, "reconstruct.warm_start={baseline: {name: tv3d, params: {lam: 0.01}}}"]),
        ("config", "kspace", "compare.methods.0.baseline", [*kspace, "compare.methods=[tv3d]"]),
        ("config", "demo", "reconstruct.operators.0", [*images, "reconstruct.operators=[acquired]"]),
        ("config", "demo", "warm_start.t0", ["reconstruct.warm_start.t0=1e-6"]),
        ("config", "demo", "warm_start.t0", ["reconstruct.warm_start.t0=0.9995"]),
        ("config", "demo", "timer", ["reconstruct.warm_start=null",
                                     "reconstruct.timer.params.t_max=0.99999"]),
        ("config", "demo", "compare.methods.0", ["compare.methods=[{warm_start: {t0: 0.0005}}]"]),
        ("config", "demo", "discrepancy", ["reconstruct.operators=[{name: mask, lam: "
                                           "{tv: discrepancy}}]", "reconstruct.sigma_y=0"]),
        ("config", "demo", "data.data_root", [f"data.data_root={tmp_path / 'link'}"]),
        ("config", "demo", "data.data_root", [f"data.data_root={tmp_path / 'a-file'}"]),
        ("config", "demo", "prior.config", [f"prior.config={tmp_path / 'nowhere.yaml'}"]),
        ("config", "demo", "prior.checkpoint", [f"prior.checkpoint={tmp_path / 'nowhere.pt'}"]),
        ("config", "demo", "validation volumes", [f"data.manifest={no_val}",
                                                  "reconstruct.operators=[mask]"]),
        ("config", "demo", "operators listed more than once", ["reconstruct.operators=[mask, mask]"]),
        ("config", "demo", "baselines listed more than once", ["reconstruct.baselines=[tv, tv]"]),
        ("config", "demo", "x0_range", ["reconstruct.x0_range=[1.0, 0.0]"]),
        ("config", "demo", "cluster_class", ["runner.kind=dask",
                                             "runner.cluster_class=subprocess.Popen"]),
        ("config", "demo", "need kind: dask", ["runner.address=tcp://x:8786"]),
        ("config", "demo", "either address", ["runner.kind=dask", "runner.address=tcp://x:8786",
                                              "runner.cluster_class=distributed.LocalCluster"]),
        ("config", "demo", "nothing to compare", ["compare.integrators=[]", "compare.methods=[]"]),
        ("config", "demo", "either a baseline", ["compare.methods=[{baseline: tv, steps: 4}]"]),
        ("config", "demo", "tracking.uri", ["tracking.uri=file:///tmp/mlruns"]),
        ("compare", "demo", "compare.operator", ["reconstruct.operators=[mask]",
                                                 "compare.operator=blur"]),
        ("compare", "demo", "work_dir", [f"work_dir={tmp_path / 'a-file' / 'work'}"]),
    ]


def test_no_wrong_config_value_can_reach_exit_code_1(tmp_path, monkeypatch):
    """The bar of issue 32. Every field of the schema (its nested sections and each list's
    first item) and every parameter of every component of the registries is set, one at a time,
    to the values it must refuse (another type, not finite, out of its bounds, an unknown name,
    key or parameter), and the combinations the hostile rounds found are set together. Each
    must end ``recon`` with exit 2 and a message naming the key, before any flow starts. What is
    let through (exit 0: a run finds it later, as exit 1) or crashes (exit 1) is listed: the list
    stays empty."""
    monkeypatch.chdir(ROOT)  # the shipped configs' relative paths
    with __import__("recon.config", fromlist=["fields_only"]).fields_only():
        demo = load_config(ROOT / "configs" / "demo.yaml")
    cases = [("config", "demo", key.split(".")[-1], [o]) for key, o in _schema_overrides(demo)]
    cases += [("config", c, name, [o]) for c, name, o in _component_overrides()]
    cases += _cross_field_overrides(tmp_path)
    assert len(cases) > 500
    for config in ("demo", "kspace"):  # the configs themselves pass
        assert runner.invoke(cli.app, ["config", config]).exit_code == 0
    reached, unnamed = [], []
    for command, config, name, overrides in cases:
        out = runner.invoke(cli.app, [command, config, *[a for o in overrides for a in ("--set", o)]])
        text = " ".join(out.output.split())
        if out.exit_code != 2:
            reached.append((overrides, out.exit_code, text[-300:]))
        elif name not in text:
            unnamed.append((overrides, text[-300:]))
    assert reached == [], reached
    assert unnamed == [], unnamed
