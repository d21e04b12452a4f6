"""Every integrator, fed the exact score of a known law, reproduces that law.

Ground truth: a 2-D Gaussian mixture and a 16-D Gaussian, whose eps(x_t, t) is closed-form
(``recon.sampling.analytic``). Thresholds are set between what correct integrators reach and what
deliberately broken steps (sign flipped, time off by one step, s and sigma swapped) give; the
mutation tests check the thresholds do fail for those.
"""

import numpy as np
import pytest
import torch

from recon.sampling.analytic import coordinate_wasserstein
from recon.sampling.denoiser import Denoiser
from recon.sampling.diffusion import VPCosine, VPLinear
from recon.sampling.integrator import (
    DDIMIntegrator,
    DPMpp2sIntegrator,
    EulerIntegrator,
    EulerMaruyamaIntegrator,
    HeunIntegrator,
    ode_velocity,
)
from recon.sampling.timer import CosineTimer, LinearTimer

N = 20_000  # samples per run: standard error of the mean <= 0.015, W1 noise floor ~0.02
# (integrator, steps): first-order and stochastic integrators get more steps.
CASES = [
    (EulerIntegrator(), 96),
    (HeunIntegrator(), 24),
    (DPMpp2sIntegrator(), 24),
    (DDIMIntegrator(eta=0.0), 64),
    (DDIMIntegrator(eta=1.0), 64),
    (EulerMaruyamaIntegrator(), 128),
]
W1_MAX, MEAN_MAX, COV_MAX, WEIGHT_MAX = 0.07, 0.06, 0.05, 0.03


def _law_errors(mixture, x, reference):
    """Errors of samples x: max W1 per coordinate, max mean error, relative covariance error
    (Frobenius), max mixture-weight error (samples assigned to their most likely component)."""
    x = x.to(torch.float64)
    w1 = coordinate_wasserstein(x, reference).max().item()
    mean_err = (x.mean(0) - mixture.mean).abs().max().item()
    cov_err = (torch.linalg.matrix_norm(torch.cov(x.T) - mixture.cov)
               / torch.linalg.matrix_norm(mixture.cov)).item()
    labels = mixture.responsibilities(x, torch.ones(1), torch.zeros(1) + 1e-6).argmax(-1)
    weights = torch.bincount(labels, minlength=len(mixture.weights)) / len(x)
    weight_err = (weights - mixture.weights).abs().max().item()
    return w1, mean_err, cov_err, weight_err


@pytest.fixture(scope="module")
def reference(mixture_2d):
    return mixture_2d.sample(50_000, torch.Generator().manual_seed(123))


def _sample(diffusion, mixture, integrator, steps, seed=7, timer=CosineTimer):
    denoiser = Denoiser(diffusion, mixture.eps_network(diffusion), integrator, timer(steps))
    return denoiser.sample((N, 2), generator=torch.Generator().manual_seed(seed),
                           dtype=torch.float64)


@pytest.mark.parametrize("diffusion", [VPLinear(), VPCosine()], ids=repr)
@pytest.mark.parametrize("integrator,steps", CASES, ids=lambda v: repr(v) if not isinstance(v, int)
                         else f"{v}steps")
def test_integrator_reproduces_mixture_law(diffusion, integrator, steps, mixture_2d, reference):
    x = _sample(diffusion, mixture_2d, integrator, steps)
    w1, mean_err, cov_err, weight_err = _law_errors(mixture_2d, x, reference)
    assert w1 < W1_MAX, f"W1={w1:.3f}"
    assert mean_err < MEAN_MAX, f"mean error {mean_err:.3f}"
    assert cov_err < COV_MAX, f"covariance error {cov_err:.3f}"
    assert weight_err < WEIGHT_MAX, f"mixture weight error {weight_err:.3f}"


class _FlippedSignEuler(EulerIntegrator):
    def step(self, diffusion, eps_fn, x, t, t_next, generator=None):
        return x + (t_next - t) * ode_velocity(diffusion, lambda y, u: -eps_fn(y, u), x, t)


class _OffByOneHeun(HeunIntegrator):
    """Evaluates the network one grid step late (at t_next where it should use t)."""

    def step(self, diffusion, eps_fn, x, t, t_next, generator=None):
        return super().step(diffusion, lambda y, u: eps_fn(y, t_next), x, t, t_next, generator)


class _SwappedDDIM(DDIMIntegrator):
    """Tweedie with s and sigma swapped: x0 = (x - s eps)/sigma."""

    def step(self, diffusion, eps_fn, x, t, t_next, generator=None):
        swapped = type("Swapped", (), {
            "s": diffusion.sigma, "sigma": diffusion.s, "f": diffusion.f, "g": diffusion.g})()
        return super().step(swapped, eps_fn, x, t, t_next, generator)


@pytest.mark.parametrize("broken,steps", [(_FlippedSignEuler(), 64), (_OffByOneHeun(), 24),
                                          (_SwappedDDIM(), 64)], ids=lambda v: type(v).__name__)
def test_broken_steps_fail_the_thresholds(broken, steps, mixture_2d, reference):
    try:
        x = _sample(VPLinear(), mixture_2d, broken, steps)
    except FloatingPointError:
        return  # blowing up is also a detected failure
    w1, mean_err, cov_err, weight_err = _law_errors(mixture_2d, x, reference)
    assert (w1 >= W1_MAX or mean_err >= MEAN_MAX or cov_err >= COV_MAX
            or weight_err >= WEIGHT_MAX), "a broken integrator passed the law thresholds"


def test_gaussian_16d_mean_and_covariance(gaussian_16d):
    diffusion = VPLinear()
    denoiser = Denoiser(diffusion, gaussian_16d.eps_network(diffusion), HeunIntegrator(),
                        CosineTimer(32))
    x = denoiser.sample((8000, 16), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # Standard error of the mean is sqrt(3.2/8000) = 0.02 at most; of a covariance entry ~0.05.
    assert (x.mean(0) - gaussian_16d.mean).abs().max() < 0.08
    rel = torch.linalg.matrix_norm(torch.cov(x.T) - gaussian_16d.cov) / torch.linalg.matrix_norm(
        gaussian_16d.cov)
    assert rel < 0.05


@pytest.mark.parametrize("integrator,order", [(EulerIntegrator(), 1), (DDIMIntegrator(), 1),
                                              (HeunIntegrator(), 2), (DPMpp2sIntegrator(), 2)],
                         ids=lambda v: repr(v) if not isinstance(v, int) else f"order{v}")
@pytest.mark.parametrize("diffusion", [VPLinear(), VPCosine()], ids=repr)
def test_convergence_order_against_exact_ode_solution(integrator, order, diffusion, gaussian_16d):
    """Error at t_min vs the exact probability-flow map falls as steps^-order (fitted slope)."""
    network = gaussian_16d.eps_network(diffusion)
    x_T = torch.randn(128, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    steps, errors = [16, 32, 64, 128], []
    for n in steps:
        denoiser = Denoiser(diffusion, network, integrator, LinearTimer(n, t_min=1e-2))
        _, path = denoiser.integrate(x_T, denoiser.eps, trajectory=True)
        exact = gaussian_16d.ode_flow(x_T, float(denoiser.times[0]), 1e-2, diffusion)
        errors.append((path[-1] - exact).norm(dim=1).mean().item())
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.2, f"fitted order {slope:.2f}, errors {errors}"


def test_nfe_and_trajectory(mixture_2d):
    diffusion = VPLinear()
    denoiser = Denoiser(diffusion, mixture_2d.eps_network(diffusion), HeunIntegrator(),
                        LinearTimer(5))
    calls = []

    def counting(x, t):
        calls.append(1)
        return mixture_2d.eps_network(diffusion)(x, t)

    denoiser.network = counting
    x0, path = denoiser.sample((3, 2), generator=torch.Generator().manual_seed(0), trajectory=True)
    assert denoiser.nfe == 5 * 2 + 1 == len(calls)
    assert path.shape == (6, 3, 2) and x0.shape == (3, 2)


def test_sampling_is_seeded(mixture_2d):
    diffusion = VPCosine()
    denoiser = Denoiser(diffusion, mixture_2d.eps_network(diffusion), EulerMaruyamaIntegrator(),
                        LinearTimer(10))
    a = denoiser.sample((4, 2), generator=torch.Generator().manual_seed(5))
    b = denoiser.sample((4, 2), generator=torch.Generator().manual_seed(5))
    c = denoiser.sample((4, 2), generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_inputs_raise_clear_errors(mixture_2d):
    diffusion = VPLinear()
    net = mixture_2d.eps_network(diffusion)
    with pytest.raises(ValueError, match="shape"):
        Denoiser(diffusion, net, EulerIntegrator(), LinearTimer(4)).sample((4, 3))
    with pytest.raises(ValueError, match="shape"):
        Denoiser(diffusion, lambda x, t: x[:, :1], EulerIntegrator(), LinearTimer(4)).sample((4, 2))
    with pytest.raises(ValueError, match="shape"):
        Denoiser(diffusion, net, EulerIntegrator(), LinearTimer(4)).sample((0, 2))
    with pytest.raises(FloatingPointError, match="non-finite"):
        Denoiser(diffusion, lambda x, t: x * float("nan"), EulerIntegrator(),
                 LinearTimer(4)).sample((4, 2))
    with pytest.raises(ValueError, match="eta"):
        DDIMIntegrator(eta=-0.5)
