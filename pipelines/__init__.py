"""Prefect 3 flows and MLflow tracking for the reconstruction project.

Importing this package first points Prefect at ``<work_dir>/prefect`` (embedded API, analytics
off) unless the environment already says otherwise: see ``pipelines.settings``.
"""

from pipelines.settings import configure

configure()
