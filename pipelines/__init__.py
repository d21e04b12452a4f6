"""Prefect 3 flows and MLflow tracking for the reconstruction project.

Importing it has no side effect. Before Prefect is first imported, ``pipelines.settings.configure``
points it at ``<work_dir>/prefect`` (embedded API, analytics off) unless the environment already
says otherwise; the ``recon`` command does that itself.
"""
