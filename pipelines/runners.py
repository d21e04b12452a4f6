"""The task runner that reconstructs slabs, from the config's ``runner`` section.

- ``local``: Prefect's ``ThreadPoolTaskRunner``, ``workers`` slabs at a time in the flow's own
  process (``workers: 1``, the default, runs them one after the other); when the flow stops
  waiting for them (an error, Ctrl-C, SIGTERM) the slabs still running stop within one sampler
  step (``StoppingThreadPool``);
- ``dask``: ``prefect_dask.DaskTaskRunner``. With ``address`` it joins a running
  ``dask.distributed`` cluster (``dask scheduler`` + ``dask worker`` on the GPU nodes, Dask on
  Kubernetes, ...); with ``cluster_class`` it makes one (``dask_jobqueue.SLURMCluster`` with
  ``cluster_kwargs``, scaled by ``adapt_kwargs``); otherwise it starts a local cluster of
  ``workers`` processes x ``threads_per_worker`` threads, which ends with the flow.

Workers run Prefect tasks, so they report to the flow's Prefect API: a new local cluster gets
the API the flow uses in its workers' environment (Prefect's embedded API otherwise would start
one more server per worker). Remote workers need ``PREFECT_API_URL`` (and
``MLFLOW_TRACKING_URI`` / a shared ``work_dir``) set where they run, see the README.
"""

from __future__ import annotations

import socket
from contextlib import ExitStack

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from pipelines.settings import api_url
from recon.classical.cancellation import cancellable
from recon.config import RunnerSection


class StoppingThreadPool(ThreadPoolTaskRunner):
    """Prefect's thread pool whose exit on an error or a signal (Ctrl-C, SIGTERM: both reach
    only the flow's thread, waiting on a slab) stops the slabs still running at their next
    sampler step (``recon.classical.cancellation``) instead of waiting for them to finish (minutes)."""

    def __enter__(self) -> StoppingThreadPool:
        with ExitStack() as scope:
            self._stop = scope.enter_context(cancellable())  # each task runs a copy of it
            super().__enter__()
            self._scope = scope.pop_all()
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if exc_type is not None:
            self._stop.set()
        try:
            super().__exit__(exc_type, exc_value, traceback)
        finally:
            self._scope.close()


def check_scheduler(address: str, timeout: float = 5.0) -> None:
    """``ValueError`` unless a Dask scheduler answers at ``tcp://host:port``, found in seconds.

    Dask's TCP comm opens with a handshake the scheduler sends unasked: a message whose first
    8 bytes are its length (uint64). Anything else there (an HTTP server waits for a request;
    its reply, read as that length, once asked distributed for 3 EiB) is named instead of
    joined. Other protocols (tls, ucx, ws) are left to distributed's own connect timeout."""
    protocol, _, location = address.partition("://")
    if protocol != "tcp":
        return
    host, _, port = location.rpartition(":")
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except OSError as err:
        raise ValueError(f"runner.address {address}: no Dask scheduler there ({err})") from None
    with sock:
        sock.settimeout(timeout)
        try:
            head = sock.recv(8, socket.MSG_WAITALL)
        except TimeoutError:
            raise ValueError(f"runner.address {address}: something accepts connections there but "
                             f"says nothing within {timeout:g} s; a Dask scheduler greets first "
                             f"(is it a web server or another service?)") from None
        except OSError as err:
            raise ValueError(f"runner.address {address}: the connection failed ({err})") from None
    size = int.from_bytes(head, "little") if len(head) == 8 else 0
    if not 8 <= size <= 1 << 26:
        raise ValueError(f"runner.address {address}: what answers there does not speak Dask's "
                         f"protocol (it sent {head!r})")


def task_runner(runner: RunnerSection) -> TaskRunner:
    """A fresh (not yet entered) task runner for ``runner``."""
    if runner.kind == "local":
        return StoppingThreadPool(max_workers=runner.workers)
    from prefect_dask import DaskTaskRunner

    if runner.address:
        check_scheduler(runner.address)
        return DaskTaskRunner(address=runner.address)
    if runner.cluster_class:
        return DaskTaskRunner(cluster_class=runner.cluster_class,
                              cluster_kwargs=dict(runner.cluster_kwargs),
                              adapt_kwargs=dict(runner.adapt_kwargs) or None)
    url = api_url(include_embedded=True)
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": runner.workers, "threads_per_worker": runner.threads_per_worker,
        "processes": True, "dashboard_address": None,
        **({"env": {"PREFECT_API_URL": url}} if url else {})})
