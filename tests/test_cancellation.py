"""A stopped ``cancellable`` scope ends the library's long loops at their next iteration, in the
thread that started them and in worker threads that run a copy of its context (issue 32: a
slab sampled on for minutes after Ctrl-C). The CLI end to end: ``tests/test_hostile_inputs.py``
(``test_a_signal_while_a_long_slab_samples_stops_the_job_in_seconds``)."""

import contextvars
import threading

import pytest
import torch

from recon.classical.baselines import TotalVariation
from recon.classical.cancellation import Cancelled, cancellable, check_cancelled
from recon.classical.linalg import conjugate_gradient
from recon.classical.total_variation import tv_prox
from recon.operators import build_mask
from recon.sampling.denoiser import Denoiser
from recon.sampling.diffusion import VPCosine
from recon.sampling.integrator import EulerIntegrator
from recon.sampling.timer import CosineTimer


class StopAfter:
    """Wraps ``fn``; its ``calls``-th call stops the scope ``stop``."""

    def __init__(self, fn, stop: threading.Event, calls: int):
        self.fn, self.stop, self.calls, self.count = fn, stop, calls, 0

    def __call__(self, *args, **kwargs):
        self.count += 1
        if self.count == self.calls:
            self.stop.set()
        return self.fn(*args, **kwargs)


def test_the_sampler_stops_at_its_next_step():
    denoiser = Denoiser(VPCosine(), lambda x, t: torch.zeros_like(x), EulerIntegrator(),
                        CosineTimer(1000))
    with cancellable() as stop:
        eps = StopAfter(denoiser.eps, stop, calls=5)
        with pytest.raises(Cancelled):
            denoiser.integrate(denoiser.prior_noise((2, 1, 4, 4)), eps)
    assert eps.count == 5  # of 1001


def test_conjugate_gradient_and_pdhg_stop_at_their_next_iteration():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(2, 8, dtype=torch.float64, generator=g)
    B = torch.randn(8, 8, dtype=torch.float64, generator=g)
    spd = B @ B.T + 0.1 * torch.eye(8, dtype=torch.float64)  # not solved in 3 iterations
    with cancellable() as stop:
        matvec = StopAfter(lambda p: p @ spd, stop, calls=3)
        with pytest.raises(Cancelled):
            conjugate_gradient(matvec, b, steps=100)
    assert matvec.count == 3
    op = build_mask((16, 16), keep=0.5, sigma_y=0.01, seed=0)
    x = torch.rand(1, 1, 16, 16)
    with cancellable() as stop:
        op.prox = StopAfter(op.prox, stop, calls=4)
        with pytest.raises(Cancelled):
            tv_prox(op, x, op.forward(x), lam=1.0, mu=0.1, iterations=1000)
    assert op.prox.count == 4  # the start and 3 of 1000 PDHG steps


def test_a_baseline_stops_inside_its_sigpy_iterations():
    op = build_mask((16, 16), keep=0.5, sigma_y=0.01, seed=0)
    x = torch.rand(1, 1, 16, 16)
    y = op.forward(x)
    with cancellable() as stop:
        op.forward = StopAfter(op.forward, stop, calls=5)
        with pytest.raises(Cancelled):
            TotalVariation(op, lam=1e-3, iterations=10_000).solve(y)
    assert op.forward.count == 5


def test_the_stop_reaches_worker_threads_of_its_scope_only():
    """A thread that runs a copy of the scope's context (as Prefect's task runners do for each
    task) stops; outside any scope and after the scope, ``check_cancelled`` never raises."""
    check_cancelled()
    seen: list[BaseException | None] = []

    def work():
        try:
            while True:
                check_cancelled()
                threading.Event().wait(0.001)
        except Cancelled as err:
            seen.append(err)

    with cancellable() as stop:
        worker = threading.Thread(target=contextvars.copy_context().run, args=(work,))
        worker.start()
        stop.set()
        worker.join(timeout=5)
    assert not worker.is_alive() and len(seen) == 1
    check_cancelled()
