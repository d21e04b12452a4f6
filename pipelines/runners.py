"""The task runner that reconstructs slabs, from the config's ``runner`` section.

- ``local``: Prefect's ``ThreadPoolTaskRunner``, ``workers`` slabs at a time in the flow's own
  process (``workers: 1``, the default, runs them one after the other);
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

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from recon.config import RunnerSection


def flow_api_url() -> str | None:
    """The URL of the Prefect API this process talks to, Prefect's own embedded one included
    (``pipelines.settings.api_url`` answers None for an embedded API)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if url:
        return str(url)
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    return server.api_url if server.running else None


def task_runner(runner: RunnerSection) -> TaskRunner:
    """A fresh (not yet entered) task runner for ``runner``."""
    if runner.kind == "local":
        return ThreadPoolTaskRunner(max_workers=runner.workers)
    from prefect_dask import DaskTaskRunner

    if runner.address:
        return DaskTaskRunner(address=runner.address)
    if runner.cluster_class:
        return DaskTaskRunner(cluster_class=runner.cluster_class,
                              cluster_kwargs=dict(runner.cluster_kwargs),
                              adapt_kwargs=dict(runner.adapt_kwargs) or None)
    url = flow_api_url()
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": runner.workers, "threads_per_worker": runner.threads_per_worker,
        "processes": True, "dashboard_address": None,
        **({"env": {"PREFECT_API_URL": url}} if url else {})})
