"""Stopping a computation that runs in another thread.

A slab samples in a task runner's worker thread while the flow's thread waits for it; Ctrl-C or
SIGTERM reaches only the waiting thread, which then waited on for the slab (minutes). The long
loops of the library (the sampler's steps, conjugate gradient, PDHG, the classical baselines'
sigpy iterations) call ``check_cancelled`` between iterations, and whoever started the work in a
``cancellable`` scope stops it by setting the scope's event: the worker raises ``Cancelled``
within one iteration.

    with cancellable() as stop:      # the thread that hands out the work
        ...                          # threads started from a copy of this context see ``stop``
        stop.set()                   # each of them raises Cancelled at its next check
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class Cancelled(BaseException):
    """The work was stopped from outside (``cancellable``'s event was set). A ``BaseException``,
    like ``KeyboardInterrupt``: no ``except Exception`` on the way (sigpy wraps its operators'
    errors so) turns it into a failure to handle."""


_STOP: ContextVar[threading.Event | None] = ContextVar("recon_stop", default=None)


@contextmanager
def cancellable() -> Iterator[threading.Event]:
    """A scope whose computations stop once the yielded event is set: ``check_cancelled``
    raises in this thread and in every thread that runs a copy of its context (Prefect's task
    runners copy it into each task they run)."""
    stop = threading.Event()
    token = _STOP.set(stop)
    try:
        yield stop
    finally:
        _STOP.reset(token)


def check_cancelled() -> None:
    """Raise ``Cancelled`` if the enclosing ``cancellable`` scope was stopped (one flag read;
    outside any scope, nothing)."""
    stop = _STOP.get()
    if stop is not None and stop.is_set():
        raise Cancelled("stopped by the code that started this work (an error or a signal)")
