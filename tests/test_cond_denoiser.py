"""Conditional sampling p(x0 | y) against closed-form posteriors.

Ground truth. For a Gaussian prior N(mu, Sigma) and y = A x0 + sigma_y n the posterior is
Gaussian (``GaussianMixture.posterior``), and so is every noised posterior p_t(x_t | y): its eps
(``posterior.eps_network``) is the exact conditional eps. Tweedie-covariance guidance is exact in
that case, so

1. deterministically, ``TweedieCovariance(cg_steps >= dim y).eps == posterior eps`` to round-off
   (real, masked and complex measurements, and the project's ``Mask``/``UndersampledFourier``);
2. by Monte Carlo, the sampler's mean and covariance match the posterior's within tolerances
   derived from the standard error (see ``_moment_check``), for several integrators; broken
   guidances (sign flipped, covariance scale sigma^2/s dropped) must fail the same check.

DPS is run on the same problem and its errors are printed, not asserted. For a 2-D mixture
prior the Tweedie-covariance approximation is not exact; its mixture weights are compared with the
closed-form posterior weights in a regime where the approximation is good (see the test).
"""

import math
import time

import pytest
import torch
from torch import Tensor

from recon.classical.posterior import Posterior
from recon.registry import GUIDANCES, INTEGRATORS
from recon.sampling.analytic import GaussianMixture
from recon.sampling.cond_denoiser import CondDenoiser
from recon.sampling.diffusion import VPLinear
from recon.sampling.guidance import (
    DPS,
    DataConsistency,
    TweedieCovariance,
    conjugate_gradient,
    make_guidance,
)
from recon.sampling.integrator import (
    DDIMIntegrator,
    DiffPIRIntegrator,
    DPMpp2sIntegrator,
    EulerIntegrator,
    EulerMaruyamaIntegrator,
    HeunIntegrator,
)
from recon.sampling.timer import CosineTimer

F64 = torch.float64
DIFF = VPLinear()
SIGMA_Y = 0.2
M = 8  # rows of the dense operator
N = 2000  # posterior samples per measurement in the Monte-Carlo tests (2 measurements: 4000 chains)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small batched linear algebra: one thread is faster than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- local operators (duck-typed like recon.operators) -------------------------------------------
class DenseOperator:
    """``y = A x + sigma_y n`` for x (B, D), y (B, M); A real or complex (then y is complex with
    circular noise of total variance sigma_y^2 per entry, as in ``recon.operators``)."""

    def __init__(self, A: Tensor, sigma_y: float):
        self.A, self.sigma_y = A, float(sigma_y)

    def forward(self, x: Tensor) -> Tensor:
        return x.to(self.A.dtype) @ self.A.T

    def adjoint(self, y: Tensor) -> Tensor:
        return y @ self.A.conj()

    def check_measurement(self, y: Tensor) -> None:
        if y.ndim != 2 or y.shape[1] != self.A.shape[0]:
            raise ValueError(f"y must have shape (B, {self.A.shape[0]}), got {tuple(y.shape)}")
        if y.dtype != self.A.dtype:
            raise ValueError(f"y must have dtype {self.A.dtype}, got {y.dtype}")
        if not torch.isfinite(y).all():
            raise ValueError("y contains NaN/Inf values")

    def measure(self, x: Tensor, generator: torch.Generator) -> Tensor:
        y = self.forward(x)
        n = torch.randn(y.shape, generator=generator, dtype=y.dtype)  # complex: E|n|^2 = 1
        return y + self.sigma_y * n

    def real_problem(self, y: Tensor) -> tuple[Tensor, Tensor, float]:
        """The equivalent real problem ``(A_r, y_r, sigma_r)`` with i.i.d. real noise."""
        if not self.A.is_complex():
            return self.A, y, self.sigma_y
        return (torch.cat([self.A.real, self.A.imag]), torch.cat([y.real, y.imag], -1),
                self.sigma_y / math.sqrt(2.0))


class MaskOperator(DenseOperator):
    """``y = m * x + sigma_y m * n`` (y zero off the mask), i.e. ``A = diag(m)``."""

    def __init__(self, mask: Tensor, sigma_y: float):
        super().__init__(torch.diag(mask.to(F64)), sigma_y)
        self.mask = mask.to(F64)

    def forward(self, x):
        return x * self.mask

    def adjoint(self, y):
        return y * self.mask

    def measure(self, x, generator):
        return self.mask * (x + self.sigma_y * torch.randn(x.shape, generator=generator,
                                                           dtype=x.dtype))


class LaxOperator(DenseOperator):
    """Checks only the shape of y (to see that CondDenoiser checks finiteness itself)."""

    def check_measurement(self, y):
        if y.ndim != 2 or y.shape[1] != self.A.shape[0]:
            raise ValueError("bad shape")


# -- problems -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dense_problem(gaussian_16d):
    g = torch.Generator().manual_seed(11)
    op = DenseOperator(torch.randn(M, 16, generator=g, dtype=F64) / 4.0, SIGMA_Y)
    y = op.measure(gaussian_16d.sample(2, g), g)
    return gaussian_16d, op, y


@pytest.fixture(scope="module")
def mask_problem(gaussian_16d):
    g = torch.Generator().manual_seed(12)
    op = MaskOperator(torch.rand(16, generator=g) < 0.5, 0.3)
    y = op.measure(gaussian_16d.sample(2, g), g)
    return gaussian_16d, op, y


@pytest.fixture(scope="module")
def complex_problem(gaussian_16d):
    g = torch.Generator().manual_seed(13)
    A = torch.randn(M // 2, 16, generator=g, dtype=torch.complex128) / 4.0
    op = DenseOperator(A, SIGMA_Y)
    y = op.measure(gaussian_16d.sample(2, g), g)
    return gaussian_16d, op, y


def _posteriors(prior: GaussianMixture, op: DenseOperator, y: Tensor) -> list[GaussianMixture]:
    out = []
    for b in range(y.shape[0]):
        A_r, y_r, sigma_r = op.real_problem(y[b])
        out.append(prior.posterior(A_r, y_r, sigma_r))
    return out


def _sampler(prior, op, integrator, steps, guidance, network=None):
    network = prior.eps_network(DIFF) if network is None else network
    return CondDenoiser(DIFF, network, integrator, CosineTimer(steps), op, guidance)


def _moment_check(samples: Tensor, post: GaussianMixture) -> tuple[bool, str]:
    """Posterior moments within Monte-Carlo tolerance; returns (ok, message).

    Mean, per coordinate: ``|mean_hat - m_i| < 4 sqrt(P_ii / n) + 0.03 sqrt(P_ii)`` (4 standard
    errors: for 32 coordinates a false alarm has probability ~2e-3; 3% of a posterior std for the
    time discretisation and the N(0, sigma(T)^2 I) start, which ignores the mean s(T) m of
    p_T(x | y): s(T) = 0.0066 for VPLinear, a bias of ~0.02 posterior std measured with 16000
    samples). Covariance: the relative Frobenius error of the sample covariance has
    ``E ||S - P||_F^2 = (||P||_F^2 + tr(P)^2) / n`` for Gaussian samples; with
    ``se = sqrt(that) / ||P||_F`` (0.064 here) we require ``< 1.5 se + 0.03``. The squared norm
    sums many entries, so it concentrates (observed 0.8-1.3 se for exact samplers).
    """
    n = samples.shape[0]
    m, P = post.means[0], post.covs[0]
    sd = torch.sqrt(torch.diagonal(P))
    mean_err = (samples.mean(0) - m).abs()
    mean_tol = 4.0 * sd / math.sqrt(n) + 0.03 * sd
    fro = torch.linalg.matrix_norm(P)
    cov_err = float(torch.linalg.matrix_norm(torch.cov(samples.T) - P) / fro)
    se = float(torch.sqrt((fro**2 + torch.trace(P) ** 2) / n) / fro)
    cov_tol = 1.5 * se + 0.03
    ok = bool((mean_err < mean_tol).all()) and cov_err < cov_tol
    msg = (f"mean error max {float((mean_err / sd).max()):.3f} posterior std "
           f"(z max {float((mean_err / (sd / math.sqrt(n))).max()):.2f}), "
           f"covariance rel. error {cov_err:.3f} (tol {cov_tol:.3f}, se {se:.3f})")
    return ok, msg


def _run(sampler: CondDenoiser, y: Tensor, n: int = N, seed: int = 1) -> tuple[Posterior, float]:
    start = time.perf_counter()
    post = sampler.sample(y, n_samples=n, generator=torch.Generator().manual_seed(seed))
    return post, time.perf_counter() - start


# -- 1. exactness of the guided eps (deterministic) -----------------------------------------------
def _eps_error(prior, op, y, guidance, network=None, shape=None, ts=(0.9, 0.5, 0.2, 0.05, 0.002)):
    """Max relative error of the guided eps against the exact posterior eps over times ``ts``."""
    posts = _posteriors(prior, op, y.reshape(y.shape[0], -1) if shape else y)
    sampler = _sampler(prior, op, HeunIntegrator(), 4, guidance, network)
    g = torch.Generator().manual_seed(5)
    worst = 0.0
    for t in ts:
        tt = torch.tensor(t, dtype=F64)
        x0 = prior.sample(y.shape[0], g)
        x = DIFF.s(tt) * x0 + DIFF.sigma(tt) * torch.randn(x0.shape, generator=g, dtype=F64)
        xin = x.reshape(shape) if shape else x
        with torch.no_grad():
            eps = sampler.cond_eps(y)(xin, t).reshape(x.shape)
        for b, post in enumerate(posts):
            exact = post.eps_network(DIFF)(x[b:b + 1], torch.full((1,), t, dtype=F64))[0]
            worst = max(worst, float((eps[b] - exact).norm() / exact.norm()))
    return worst


@pytest.mark.parametrize("problem", ["dense_problem", "mask_problem", "complex_problem"])
def test_tweedie_covariance_eps_is_exact_for_gaussian_prior(problem, request):
    prior, op, y = request.getfixturevalue(problem)
    err = _eps_error(prior, op, y, TweedieCovariance(cg_steps=16))
    assert err < 1e-8, f"guided eps differs from the exact posterior eps by {err:.2e}"
    # too few CG steps is an approximation, not the exact score (the test can see the solve)
    if problem == "dense_problem":
        assert _eps_error(prior, op, y, TweedieCovariance(cg_steps=2)) > 1e-4


def _mmps_eps_closed_form(mix, A, y, sigma_y, x, t):
    """MMPS eps for a mixture from closed-form moments of x0 | x_t (no autograd, no CG)."""
    tt = torch.tensor(t, dtype=F64)
    s, sigma = DIFF.s(tt), DIFF.sigma(tt)
    eye = torch.eye(mix.dim, dtype=F64)
    prec = torch.linalg.inv(mix.covs) + (s / sigma) ** 2 * eye  # (K, D, D)
    P = torch.linalg.inv(prec)
    prior_term = torch.linalg.solve(mix.covs, mix.means[..., None])[..., 0]
    rhs = prior_term[None] + (s / sigma**2) * x[:, None]
    m = torch.einsum("kij,bkj->bki", P, rhs)  # (B, K, D)
    gam = mix.responsibilities(x, s[None], sigma[None])  # (B, K)
    mean = torch.einsum("bk,bki->bi", gam, m)
    second = torch.einsum("bk,kij->bij", gam, P) + torch.einsum("bk,bki,bkj->bij", gam, m, m)
    V = second - mean[:, :, None] * mean[:, None, :]
    S = sigma_y**2 * torch.eye(A.shape[0], dtype=F64) + A @ V @ A.T
    w = torch.linalg.solve(S, (y - mean @ A.T)[..., None])[..., 0]
    grad = (s / sigma**2) * torch.einsum("bij,bj->bi", V, w @ A)  # J^T A^T w, J = (s/sigma^2) V
    eps = mix.eps_network(DIFF)(x, torch.full((len(x),), t, dtype=F64))
    return eps - sigma * grad


def test_tweedie_covariance_matches_closed_form_mmps_for_mixture(mixture_2d):
    A = torch.tensor([[0.6, 0.8]], dtype=F64)
    op = DenseOperator(A, 0.5)
    g = torch.Generator().manual_seed(3)
    y = torch.randn(6, 1, generator=g, dtype=F64)
    sampler = _sampler(mixture_2d, op, HeunIntegrator(), 4, TweedieCovariance(1))
    for t in (0.8, 0.4, 0.1, 0.01):
        x = 2.0 * torch.randn(6, 2, generator=g, dtype=F64)
        with torch.no_grad():
            eps = sampler.cond_eps(y)(x, t)
        ref = _mmps_eps_closed_form(mixture_2d, A, y, 0.5, x, t)
        assert torch.allclose(eps, ref, rtol=1e-9, atol=1e-9), (t, (eps - ref).abs().max())


def test_conjugate_gradient_batched():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(3, 6, 6, generator=g, dtype=F64)
    mats = B @ B.transpose(1, 2) + 0.1 * torch.eye(6, dtype=F64)
    b = torch.randn(3, 6, generator=g, dtype=F64)
    b[1] = 0.0  # a sample with nothing to solve stays at zero (0/0 guarded)
    w = conjugate_gradient(lambda v: torch.einsum("bij,bj->bi", mats, v), b, steps=12)
    assert torch.isfinite(w).all() and (w[1] == 0).all()
    assert torch.allclose(w, torch.linalg.solve(mats, b), atol=1e-9)


def test_conjugate_gradient_stops_each_sample_at_its_tolerance():
    """``tol``: a sample stops once ``|b - M w| <= tol |b|`` and keeps that solution; the
    iterations end once every sample has (fewer products than ``steps``)."""
    g = torch.Generator().manual_seed(1)
    B = torch.randn(3, 40, 40, generator=g, dtype=F64)
    mats = B @ B.transpose(1, 2) + 0.5 * torch.eye(40, dtype=F64)
    mats[2] = torch.eye(40, dtype=F64)  # solved in one iteration
    b = torch.randn(3, 40, generator=g, dtype=F64)
    calls = []

    def matvec(v):
        calls.append(1)
        return torch.einsum("bij,bj->bi", mats, v)

    w = conjugate_gradient(matvec, b, steps=40, tol=1e-3)
    rel = (b - torch.einsum("bij,bj->bi", mats, w)).norm(dim=1) / b.norm(dim=1)
    assert (rel <= 1e-3).all() and len(calls) < 40
    exact = conjugate_gradient(lambda v: torch.einsum("bij,bj->bi", mats, v), b, steps=40)
    assert (w - exact).norm() / exact.norm() < 1e-2
    assert torch.equal(w[2], exact[2])  # stopped at its first iteration in both
    calls.clear()
    assert torch.equal(conjugate_gradient(matvec, b, steps=5, tol=0.0),
                       conjugate_gradient(lambda v: torch.einsum("bij,bj->bi", mats, v), b, 5))
    assert len(calls) == 5


def test_data_consistency_stops_a_coil_prox_at_its_tolerance_and_leaves_closed_forms_alone():
    """``DataConsistency(cg_tol=...)``: the multi-coil prox (conjugate gradient) stops early; a
    closed-form prox (a mask) is unchanged; a tolerance outside [0, 1) is refused."""
    from recon.operators import Mask, UndersampledFourier, birdcage_maps, cartesian_mask
    from recon.operators.mask import random_pixel_mask

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 24, 20, generator=g, dtype=F64)

    def eps(v, t):
        return torch.zeros_like(v)

    coils = UndersampledFourier(cartesian_mask((24, 20), 4, 0.1, generator=1),
                                coil_maps=birdcage_maps((24, 20), 4, dtype=torch.complex128),
                                sigma_y=0.05, real_output=True).double()
    mask = Mask(random_pixel_mask((24, 20), 0.4, 1), sigma_y=0.05).double()
    diffusion = VPLinear()
    for op, closed in ((coils, False), (mask, True)):
        y = op.measure(x, generator=2)
        full, loose = (DataConsistency(cg_tol=tol).eps(x, 0.5, y, eps_fn=eps, diffusion=diffusion,
                                                       operator=op) for tol in (0.0, 0.1))
        if closed:
            assert torch.equal(full, loose)
        else:  # the tolerance reaches the coils' conjugate gradient (its own test above)
            assert torch.isfinite(loose).all() and not torch.equal(full, loose)
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="cg_tol"):
            DataConsistency(cg_tol=bad)


# -- 2. Monte-Carlo posterior moments -------------------------------------------------------------
CASES = [
    (HeunIntegrator(), 32),
    (DPMpp2sIntegrator(), 32),
    (DDIMIntegrator(eta=0.0), 64),
    (EulerIntegrator(), 64),
    (EulerMaruyamaIntegrator(), 64),
]


@pytest.mark.parametrize("integrator,steps", CASES, ids=lambda v: repr(v) if not isinstance(v, int)
                         else f"{v}steps")
def test_tweedie_covariance_samples_gaussian_posterior(integrator, steps, dense_problem):
    prior, op, y = dense_problem
    post, seconds = _run(_sampler(prior, op, integrator, steps, TweedieCovariance(cg_steps=M)), y)
    assert post.samples.shape == (N, 2, 16) and post.mean.shape == post.std.shape == (2, 16)
    for b, exact in enumerate(_posteriors(prior, op, y)):
        ok, msg = _moment_check(post.samples[:, b], exact)
        print(f"\n[tweedie {integrator!r} {steps} steps, y{b}] {msg}; {seconds:.2f}s for "
              f"{2 * N} chains, nfe {post.nfe}, vjp {post.vjp}")
        assert ok, msg


def test_tweedie_covariance_samples_masked_posterior(mask_problem):
    prior, op, y = mask_problem
    post, seconds = _run(_sampler(prior, op, HeunIntegrator(), 32, TweedieCovariance(16)), y)
    for b, exact in enumerate(_posteriors(prior, op, y)):
        ok, msg = _moment_check(post.samples[:, b], exact)
        print(f"\n[tweedie mask Heun, y{b}] {msg}; {seconds:.2f}s")
        assert ok, msg


def _renoising_law(post: GaussianMixture, times: Tensor) -> GaussianMixture:
    """The exact law of the full re-noising chain (DiffPIR zeta = 1) with the exact posterior eps.

    With ``x0_hat(x_t) = m + K (x_t - s m)``, ``K = s P (s^2 P + sigma^2 I)^{-1}`` (Gaussian
    posterior N(m, P)), a step is ``x' = s' x0_hat(x_t) + sigma' z``: linear-Gaussian, so
    ``mu' = s' (m + K (mu - s m))``, ``C' = s'^2 K C K^T + sigma'^2 I``, from
    ``x_T ~ N(0, sigma_T^2 I)``; the output is ``x0_hat`` at ``t_min``."""
    m, P = post.means[0], post.covs[0]
    eye = torch.eye(len(m), dtype=F64)

    def gain(t):
        tt = torch.tensor(t, dtype=F64)
        s, sigma = DIFF.s(tt), DIFF.sigma(tt)
        return s, sigma, s * P @ torch.linalg.inv(s * s * P + sigma * sigma * eye)

    ts = times.tolist()
    mu, C = torch.zeros_like(m), float(DIFF.sigma(times[0])) ** 2 * eye
    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        s, _, K = gain(t)
        s_n, sigma_n, _ = gain(t_next)
        mu, C = s_n * (m + K @ (mu - s * m)), s_n**2 * K @ C @ K.T + sigma_n**2 * eye
    s, _, K = gain(ts[-1])
    return GaussianMixture.gaussian(m + K @ (mu - s * m), K @ C @ K.T)


def test_full_renoising_keeps_the_posterior_mean_and_shrinks_the_spread(dense_problem):
    """DiffPIR's step with zeta = 1 (x' = s' x0_y + sigma' z) and the exact conditional eps:
    its samples follow the closed-form law of the chain (``_renoising_law``), whose mean is the
    posterior mean and whose covariance is smaller than the posterior's (it ends between a
    posterior sample and the posterior mean). zeta = 0 is DDIM with eta = 0, bit for bit."""
    prior, op, y = dense_problem
    steps = 30
    sampler = _sampler(prior, op, DiffPIRIntegrator(zeta=1.0), steps, TweedieCovariance(M))
    post, seconds = _run(sampler, y)
    for b, exact in enumerate(_posteriors(prior, op, y)):
        law = _renoising_law(exact, sampler.times)
        ok, msg = _moment_check(post.samples[:, b], law)
        print(f"\n[diffpir zeta=1, {steps} steps, y{b}] against the chain's law: {msg}; {seconds:.2f}s")
        assert ok, msg
        torch.testing.assert_close(law.means[0], exact.means[0], atol=1e-6, rtol=0)
        shrink = float(torch.trace(law.covs[0]) / torch.trace(exact.covs[0]))
        print(f"trace of the covariance: {shrink:.3f} of the posterior's")
        assert 0.05 < shrink < 0.9, shrink
        assert not _moment_check(post.samples[:, b], exact)[0]  # not a posterior sampler
    start = torch.Generator().manual_seed(2)
    a = _sampler(prior, op, DiffPIRIntegrator(zeta=0.0), 8, TweedieCovariance(M)).sample(
        y, 3, generator=start)
    b = _sampler(prior, op, DDIMIntegrator(eta=0.0), 8, TweedieCovariance(M)).sample(
        y, 3, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a.samples, b.samples, atol=1e-12, rtol=0)


class _FlippedSign(TweedieCovariance):
    """Mutant: pushes away from the data (score - grad log p(y|x_t))."""

    def eps(self, x, t, y, *, eps_fn, diffusion, operator):
        guided = super().eps(x, t, y, eps_fn=eps_fn, diffusion=diffusion, operator=operator)
        return 2.0 * eps_fn(x, t) - guided


class _NoCovarianceScale(TweedieCovariance):
    """Mutant: V = J instead of (sigma^2 / s) J."""

    def covariance_scale(self, s, sigma):
        return 1.0


@pytest.mark.parametrize("mutant", [_FlippedSign(M), _NoCovarianceScale(M)], ids=lambda m:
                         type(m).__name__)
def test_broken_guidance_fails_the_moment_check(mutant, dense_problem):
    """Even with 4x fewer samples (so looser tolerances) the mutants fail."""
    prior, op, y = dense_problem
    post, _ = _run(_sampler(prior, op, HeunIntegrator(), 32, mutant), y, n=N // 4)
    exact = _posteriors(prior, op, y)
    results = [_moment_check(post.samples[:, b], exact[b]) for b in range(2)]
    print(f"\n[mutant {type(mutant).__name__}] " + " | ".join(msg for _, msg in results))
    assert not any(ok for ok, _ in results)


def test_dps_reported_on_gaussian_posterior(dense_problem, record_property):
    prior, op, y = dense_problem
    exact = _posteriors(prior, op, y)
    for zeta in (0.1, 0.3, 1.0):
        post, seconds = _run(_sampler(prior, op, HeunIntegrator(), 32, DPS(zeta)), y)
        assert torch.isfinite(post.samples).all() and post.vjp == post.nfe
        for b in range(2):
            _, msg = _moment_check(post.samples[:, b], exact[b])
            print(f"\n[DPS zeta={zeta}, Heun 32, y{b}] {msg}; {seconds:.2f}s")
            record_property(f"dps_zeta{zeta}_y{b}", msg)


# -- 3. a mixture prior: posterior weights ---------------------------------------------------------
def _weights(samples: Tensor, post: GaussianMixture) -> Tensor:
    labels = post.responsibilities(samples, torch.ones(1), torch.zeros(1) + 1e-6).argmax(-1)
    return torch.bincount(labels, minlength=len(post.weights)) / len(samples)


def test_mixture_posterior_weights(mixture_2d, record_property):
    """y = x0[1] + n, sigma_y = 1, y = 1: the closed-form posterior weights are (0.22, 0.77, 0.00)
    against the prior's (0.2, 0.5, 0.3), so a sampler ignoring y is off by 0.3.

    Tolerance 0.1 = Monte-Carlo (4 se = 4 sqrt(0.25 / 4000) = 0.03) + the bias of the Gaussian
    approximation of p(x0 | x_t) (measured 0.035 (Heun), 0.063 (Euler-Maruyama) here; it is not a
    bug: ``test_tweedie_covariance_matches_closed_form_mmps_for_mixture`` pins the implementation)
    + margin. With sharper likelihoods the approximation is much worse (the second, reported case:
    sigma_y = 0.5, y = 0, errors ~0.5), so this is a regime check, not an exactness check.
    """
    A = torch.tensor([[0.0, 1.0]], dtype=F64)
    for sigma_y, y_value, asserted in ((1.0, 1.0, True), (0.5, 0.0, False)):
        op = DenseOperator(A, sigma_y)
        y = torch.tensor([[y_value]], dtype=F64)
        exact = mixture_2d.posterior(A, y[0], sigma_y)
        if asserted:
            assert (exact.weights - mixture_2d.weights).abs().max() > 0.25  # informative test
        for name, integrator, steps, guidance in (
                ("tweedie", HeunIntegrator(), 32, TweedieCovariance(1)),
                ("tweedie", EulerMaruyamaIntegrator(), 64, TweedieCovariance(1)),
                ("dps", HeunIntegrator(), 32, DPS(1.0))):
            post, seconds = _run(_sampler(mixture_2d, op, integrator, steps, guidance), y, n=4000)
            w = _weights(post.samples[:, 0], exact)
            err = float((w - exact.weights).abs().max())
            msg = (f"sigma_y={sigma_y} y={y_value}: weights {[round(v, 3) for v in w.tolist()]} vs "
                   f"exact {[round(v, 3) for v in exact.weights.tolist()]}, max error {err:.3f}")
            print(f"\n[mixture {name} {integrator!r}] {msg}; {seconds:.2f}s")
            record_property(f"mixture_{name}_{type(integrator).__name__}_sy{sigma_y}", msg)
            if asserted and name == "tweedie":
                assert err < 0.1, msg


# -- 4. every integrator x every guidance, API ----------------------------------------------------
@pytest.mark.parametrize("guidance", [DPS(0.5), TweedieCovariance(2), DataConsistency()], ids=repr)
@pytest.mark.parametrize("integrator_name", sorted(INTEGRATORS))
def test_every_integrator_runs_every_guidance(integrator_name, guidance, dense_problem):
    prior, op, y = dense_problem
    integrator = INTEGRATORS[integrator_name]()
    sampler = _sampler(prior, op, integrator, 4, guidance)
    post = sampler.sample(y, n_samples=3, generator=torch.Generator().manual_seed(0))
    assert post.samples.shape == (3, 2, 16) and post.samples.dtype == F64
    assert torch.isfinite(post.samples).all() and torch.isfinite(post.std).all()
    assert post.nfe == 4 * integrator.nfe + 1
    assert post.vjp == post.nfe * guidance.vjps_per_eval
    assert torch.allclose(post.mean, post.samples.mean(0))
    assert torch.allclose(post.std, post.samples.std(0))


def test_sample_options_and_seed(dense_problem):
    prior, op, y = dense_problem
    sampler = _sampler(prior, op, EulerMaruyamaIntegrator(), 4, "tweedie_covariance")
    a = sampler.sample(y, 2, generator=torch.Generator().manual_seed(3), keep_samples=False)
    b = sampler.sample(y, 2, generator=torch.Generator().manual_seed(3))
    assert a.samples is None and torch.equal(a.mean, b.mean)
    one = sampler.sample(y[:1], 1, generator=torch.Generator().manual_seed(3))
    assert one.mean.shape == (1, 16) and (one.std == 0).all()
    assert "TweedieCovariance(cg_steps=1)" in repr(sampler)


# -- 5. data consistency --------------------------------------------------------------------------
def test_data_consistency_is_the_proximal_step(gaussian_16d):
    """For A with orthonormal rows, x0_dc = argmin ||y - A x||^2/sigma_y^2 + ||x - x0||^2/r_t^2."""
    g = torch.Generator().manual_seed(4)
    A = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=F64))[0][:M]
    op = DenseOperator(A, SIGMA_Y)
    y = op.measure(gaussian_16d.sample(3, g), g)
    network = gaussian_16d.eps_network(DIFF)
    sampler = _sampler(gaussian_16d, op, HeunIntegrator(), 4, DataConsistency())
    for t in (0.7, 0.2, 0.01):
        tt = torch.tensor(t, dtype=F64)
        s, sigma = float(DIFF.s(tt)), float(DIFF.sigma(tt))
        x = torch.randn(3, 16, generator=g, dtype=F64)
        x0 = (x - sigma * network(x, torch.full((3,), t, dtype=F64))) / s
        r2 = (sigma / s) ** 2
        lhs = A.T @ A / SIGMA_Y**2 + torch.eye(16, dtype=F64) / r2
        prox = torch.linalg.solve(lhs, (y @ A / SIGMA_Y**2 + x0 / r2).T).T
        x0_dc = (x - sigma * sampler.cond_eps(y)(x, t)) / s
        assert torch.allclose(x0_dc, prox, atol=1e-9), t


def test_hard_data_consistency_reproduces_the_measured_entries(gaussian_16d):
    g = torch.Generator().manual_seed(6)
    op = MaskOperator(torch.rand(16, generator=g) < 0.5, 0.0)
    y = op.measure(gaussian_16d.sample(2, g), g)
    for integrator in (HeunIntegrator(), DDIMIntegrator(eta=1.0)):
        post = _sampler(gaussian_16d, op, integrator, 8, DataConsistency()).sample(
            y, 5, generator=torch.Generator().manual_seed(1))
        kept = op.mask.bool()
        assert torch.allclose(post.samples[..., kept], y[None, :, kept].expand(5, -1, -1),
                              atol=1e-10)
        assert (post.std[:, kept].abs() < 1e-9).all() and (post.std[:, ~kept] > 0).all()


# -- 6. bad input ---------------------------------------------------------------------------------
class _CountingNetwork:
    def __init__(self, network):
        self.network, self.calls = network, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.network(x, t)


def test_bad_measurements_are_rejected_before_compute(dense_problem):
    prior, op, y = dense_problem
    for operator in (op, LaxOperator(op.A, op.sigma_y)):
        net = _CountingNetwork(prior.eps_network(DIFF))
        sampler = _sampler(prior, operator, HeunIntegrator(), 4, TweedieCovariance(2), net)
        bad_nan, bad_inf = y.clone(), y.clone()
        bad_nan[0, 1], bad_inf[1, 0] = float("nan"), float("inf")
        for bad in (bad_nan, bad_inf, y[:, :-1], y[0]):
            with pytest.raises(ValueError):
                sampler.sample(bad, 2)
        with pytest.raises(ValueError, match="Tensor"):
            sampler.sample(y.tolist(), 2)
        for n in (0, -1, 1.5, True):
            with pytest.raises(ValueError, match="n_samples"):
                sampler.sample(y, n)
        assert net.calls == 0
    with pytest.raises(ValueError):  # dtype mismatch, caught by the operator's check
        _sampler(prior, op, HeunIntegrator(), 4, DPS()).sample(y.float(), 2)


def test_guidance_factory_and_arguments(dense_problem):
    prior, op, _ = dense_problem
    with pytest.raises(ValueError, match="valid names") as info:
        make_guidance("langevin")
    for name in GUIDANCES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="valid names"):
        _sampler(prior, op, HeunIntegrator(), 4, "nope")
    assert isinstance(make_guidance("mmps", cg_steps=3), TweedieCovariance)
    assert make_guidance("dps", zeta=0.5).zeta == 0.5
    assert make_guidance("data_consistency", soft=False).soft is False
    for name, kw in (("dps", {"zeta": -1.0}), ("dps", {"zeta": float("nan")}),
                     ("tweedie_covariance", {"cg_steps": 0}),
                     ("tweedie_covariance", {"cg_steps": 1.5}), ("dps", {"eta": 1.0})):
        with pytest.raises(ValueError):
            make_guidance(name, **kw)
    with pytest.raises(TypeError, match="lacks"):
        CondDenoiser(DIFF, prior.eps_network(DIFF), HeunIntegrator(), CosineTimer(4), object(),
                     DPS())
    with pytest.raises(TypeError, match="Guidance"):
        _sampler(prior, op, HeunIntegrator(), 4, 3.0)


# -- 7. the project's operators (smoke + exactness) -----------------------------------------------
operators = pytest.importorskip("recon.operators")


def _image_network(prior: GaussianMixture):
    """Wrap a flat analytic eps-network for images (B, 1, H, W)."""
    flat = prior.eps_network(DIFF)
    return lambda x, t: flat(x.reshape(x.shape[0], -1), t).reshape(x.shape)


def _smooth_gaussian(h: int, w: int, length: float = 2.0) -> GaussianMixture:
    yy, xx = torch.meshgrid(torch.arange(h, dtype=F64), torch.arange(w, dtype=F64), indexing="ij")
    pts = torch.stack([yy.flatten(), xx.flatten()], -1)
    cov = torch.exp(-0.5 * torch.cdist(pts, pts) ** 2 / length**2) + 0.05 * torch.eye(h * w,
                                                                                   dtype=F64)
    return GaussianMixture.gaussian(0.5 + torch.zeros(h * w, dtype=F64), cov)


def _matrix(op, h: int, w: int) -> Tensor:
    """The (M, D) matrix of a project operator on real (1, h, w) images."""
    basis = torch.eye(h * w, dtype=F64).reshape(h * w, 1, h, w)
    return op.forward(basis).reshape(h * w, -1).T


def _residual(op, x, y) -> Tensor:
    return (op.forward(x) - y).abs().flatten(1).norm(dim=1)


def test_project_mask_operator(gaussian_16d):
    mask = operators.random_pixel_mask((4, 4), keep=0.5, generator=0)
    op = operators.Mask(mask, sigma_y=0.1)
    g = torch.Generator().manual_seed(8)
    x_true = gaussian_16d.sample(2, g).reshape(2, 1, 4, 4)
    y = op.measure(x_true, g)
    local = DenseOperator(_matrix(op, 4, 4), op.sigma_y)
    network = _image_network(gaussian_16d)
    # exact guided eps, through the project's operator
    posts = _posteriors(gaussian_16d, local, y.reshape(2, -1))
    sampler = _sampler(gaussian_16d, op, HeunIntegrator(), 16, TweedieCovariance(16), network)
    x = torch.randn(2, 1, 4, 4, generator=g, dtype=F64)
    with torch.no_grad():
        eps = sampler.cond_eps(y)(x, 0.3).reshape(2, -1)
    for b, post in enumerate(posts):
        exact = post.eps_network(DIFF)(x[b:b + 1].reshape(1, -1), torch.full((1,), 0.3, dtype=F64))
        assert torch.allclose(eps[b:b + 1], exact, atol=1e-9)
    post = sampler.sample(y, 64, generator=torch.Generator().manual_seed(0))
    assert post.mean.shape == (2, 1, 4, 4) and post.samples.shape == (64, 2, 1, 4, 4)
    prior_mean = gaussian_16d.mean.reshape(1, 1, 4, 4).expand(2, 1, 4, 4)
    assert (_residual(op, post.mean, y) < 0.5 * _residual(op, prior_mean, y)).all()


@pytest.mark.parametrize("real_output", [False, True])
def test_project_fourier_operator(real_output):
    h = w = 8
    prior = _smooth_gaussian(h, w)
    mask = operators.cartesian_mask((h, w), acceleration=2, center_fraction=0.25, generator=0)
    op = operators.UndersampledFourier(mask, sigma_y=0.05, real_output=real_output)
    g = torch.Generator().manual_seed(9)
    y = op.measure(prior.sample(2, g).reshape(2, 1, h, w), g)
    network = _image_network(prior)
    # Tweedie covariance: exact guided eps with complex k-space (checks the noise convention)
    local = DenseOperator(_matrix(op, h, w), op.sigma_y)
    posts = _posteriors(prior, local, y.reshape(2, -1))
    sampler = _sampler(prior, op, HeunIntegrator(), 16, TweedieCovariance(h * w), network)
    x = torch.randn(2, 1, h, w, generator=g, dtype=F64)
    with torch.no_grad():
        eps = sampler.cond_eps(y)(x, 0.3).reshape(2, -1)
    for b, post in enumerate(posts):
        exact = post.eps_network(DIFF)(x[b:b + 1].reshape(1, -1), torch.full((1,), 0.3, dtype=F64))
        assert torch.allclose(eps[b:b + 1], exact, atol=1e-8)
    # data consistency: runs, shapes, and the data residual drops
    dc = _sampler(prior, op, DDIMIntegrator(), 16, DataConsistency(), network)
    post = dc.sample(y, 8, generator=torch.Generator().manual_seed(0))
    assert post.samples.shape == (8, 2, 1, h, w) and post.samples.dtype == F64
    assert post.vjp == 0 and torch.isfinite(post.samples).all()
    prior_mean = prior.mean.reshape(1, 1, h, w).expand(2, 1, h, w)
    zero_filled = op.pseudo_inverse(y)
    zero_filled = zero_filled.real if zero_filled.is_complex() else zero_filled
    res = _residual(op, post.mean, y)
    print(f"\n[Fourier real_output={real_output} DC] residual {res.tolist()} vs prior mean "
          f"{_residual(op, prior_mean, y).tolist()}, zero-filled {_residual(op, zero_filled, y)}")
    assert (res < 0.5 * _residual(op, prior_mean, y)).all()


def test_x0_range_keeps_a_diverging_sampler_finite_and_in_range(dense_problem):
    """A guidance step far too large blows the chain up; with x0_range every guided x0 (and
    so the result) stays finite and inside the range, and the default (None) is unchanged."""
    prior, op, y = dense_problem
    wild = DPS(zeta=1e9)
    try:
        blown = _sampler(prior, op, HeunIntegrator(), 8, wild).sample(y, 2).mean
        assert not torch.isfinite(blown).all() or blown.abs().max() > 1e3
    except FloatingPointError:
        pass  # the unguarded sampler stops with a non-finite chain: what the guard prevents
    guarded = CondDenoiser(DIFF, prior.eps_network(DIFF), HeunIntegrator(), CosineTimer(8), op,
                           wild, x0_range=(-3.0, 3.0))
    post = guarded.sample(y, 2, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(post.mean).all() and post.mean.abs().max() <= 3.0 + 1e-9
    tame = {"generator": torch.Generator().manual_seed(1)}
    plain = _sampler(prior, op, HeunIntegrator(), 8, DataConsistency()).sample(y, 2, **tame)
    wide = CondDenoiser(DIFF, prior.eps_network(DIFF), HeunIntegrator(), CosineTimer(8), op,
                        DataConsistency(), x0_range=(-1e6, 1e6)).sample(
        y, 2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(plain.mean, wide.mean)
    with pytest.raises(ValueError, match="x0_range"):
        CondDenoiser(DIFF, prior.eps_network(DIFF), HeunIntegrator(), CosineTimer(8), op,
                     DPS(), x0_range=(1.0, 0.0))
