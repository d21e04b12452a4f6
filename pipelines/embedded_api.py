"""Prefect's embedded API server as a child process that cannot outlive this one.

Left to itself, Prefect 3 starts its ephemeral API (uvicorn) on first use, from whichever thread
first needs a client, and stops it only from ``atexit``: a SIGKILL of the CLI, or a SIGTERM
(which Prefect's flow engine turns back into the default action), leaves the server running.

``start`` serves the same app (``prefect.server.api.server:create_app`` in ephemeral mode: no UI,
database under ``PREFECT_HOME``) as ``python -m pipelines.embedded_api PORT PARENT_PID``. That
child asks the kernel for SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``, Linux), so
it ends with the CLI whatever signal ends the CLI; ``atexit`` stops it on a normal exit. Then
``PREFECT_API_URL`` points at it, so this process and its children (Dask workers, subprocesses)
share one server. It must run before Prefect is imported (Prefect reads its settings once).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from recon.filelock import exclusive_lock

EMBEDDED_API_ENV = "RECON_EMBEDDED_API_URL"
"""Set to ``PREFECT_API_URL`` when that URL is this module's server (not a user's server)."""

PR_SET_PDEATHSIG = 1
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def stop(proc: subprocess.Popen) -> None:
    """Terminate the server (SIGTERM, then SIGKILL after 5 s)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start(timeout: float | None = None, attempts: int = 3) -> str | None:
    """Start the embedded API and point ``PREFECT_API_URL`` at it; returns its URL.

    Does nothing (returns None) when ``PREFECT_API_URL`` is already set (a real server, or a
    parent's embedded one) or Prefect is already imported (its settings are fixed by then)."""
    if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return None
    timeout = timeout or float(os.environ.get(STARTUP_TIMEOUT_ENV, 90))
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect"))
    home.mkdir(parents=True, exist_ok=True)
    # one server at a time starts on a PREFECT_HOME: the first creates and migrates its
    # database, and two doing that at once crash in the migration ("index ... already exists")
    with exclusive_lock(home / ".api-start.lock"):
        return _start(timeout, attempts, home / "embedded-api.log")


def _start(timeout: float, attempts: int, log: Path) -> str:
    # our own offline server: no UI, no telemetry (its writes race a second server's migration)
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1"}
    for _ in range(attempts):  # another process may take the free port before uvicorn binds it
        port = _free_port()
        url = f"http://127.0.0.1:{port}/api"
        # its own session: a Ctrl-C in the terminal (SIGINT to the foreground process group)
        # reaches the CLI, which then stops its work; the API must outlive that by seconds.
        # Its output goes to a log: a crash is reported in one line, not hundreds
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "pipelines.embedded_api", str(port),
                                     str(os.getpid())], env=env, start_new_session=True,
                                    stdout=out, stderr=subprocess.STDOUT)
        atexit.register(stop, proc)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if _healthy(url):
                os.environ["PREFECT_API_URL"] = os.environ[EMBEDDED_API_ENV] = url
                return url
            time.sleep(0.1)
        stop(proc)
        atexit.unregister(stop)
        if proc.returncode not in (None, 1, 3):  # 1/3: uvicorn could not bind the port
            break
    code = proc.returncode
    if code is None:
        what = f"did not answer within {timeout:g} s (raise {STARTUP_TIMEOUT_ENV} on a busy host)"
    else:
        died = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        what = f"crashed ({died}): {_last_line(log)}"
    raise RuntimeError(f"Prefect's embedded API {what}; its log is {log}. Or set "
                       "PREFECT_API_URL to a running Prefect server")


def _last_line(log: Path) -> str:
    """The server's error: the last exception line of its log (``Name: message``), else its last
    line, or a note that it is empty."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError as err:
        return f"its log cannot be read ({err.strerror})"
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b.*:", line)]
    return (errors or [line for line in lines if line] or ["it wrote nothing"])[-1][:300]


def die_with_parent(parent: int) -> None:
    """SIGTERM this process when the thread that started it dies (Linux; elsewhere a no-op),
    and exit now if that already happened."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        sys.exit(0)


def main(port: int, parent: int) -> None:
    die_with_parent(parent)
    import uvicorn

    uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1",
                port=port, log_level="error", lifespan="on")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
