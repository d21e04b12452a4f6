"""An exclusive lock between processes on one machine: ``with exclusive_lock(path): ...``.

For work that two runs must not do at once on shared files: materialising the public data into
one data root, creating and migrating a new MLflow or Prefect database (``fcntl.flock`` on
``path``, created if missing; released when the block ends or the process dies).
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` for the block; wait while another process does."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
