"""The diffusion models' closed forms agree with the SDE they claim to solve."""

import math

import pytest
import torch
from scipy.integrate import quad

from recon.sampling.diffusion import VPCosine, VPLinear

MODELS = [VPLinear(0.1, 20.0), VPLinear(0.5, 5.0), VPCosine(0.008)]


def _f(model, t):
    return float(model.f(torch.tensor(t, dtype=torch.float64)))


def _g(model, t):
    return float(model.g(torch.tensor(t, dtype=torch.float64)))


@pytest.mark.parametrize("model", MODELS, ids=repr)
@pytest.mark.parametrize("t", [0.01, 0.2, 0.5, 0.9])
def test_s_and_sigma_match_numerical_integration_of_f_and_g(model, t):
    """s(t) = exp(int_0^t f) and sigma(t) = s(t) (int_0^t g^2/s^2)^{1/2}, by quadrature."""
    s_num = math.exp(quad(lambda u: _f(model, u), 0.0, t, epsabs=1e-12, epsrel=1e-12)[0])

    def g2_over_s2(u):
        s_u = math.exp(quad(lambda v: _f(model, v), 0.0, u, epsabs=1e-12, epsrel=1e-12)[0])
        return _g(model, u) ** 2 / s_u**2

    sigma_num = s_num * math.sqrt(quad(g2_over_s2, 0.0, t, epsabs=1e-12, epsrel=1e-10)[0])
    tt = torch.tensor(t, dtype=torch.float64)
    assert float(model.s(tt)) == pytest.approx(s_num, rel=1e-8)
    assert float(model.sigma(tt)) == pytest.approx(sigma_num, rel=1e-6)


@pytest.mark.parametrize("model", MODELS, ids=repr)
def test_variance_preserving_and_boundaries(model):
    t = torch.linspace(1e-4, model.t_max, 101, dtype=torch.float64)
    torch.testing.assert_close(model.s(t) ** 2 + model.sigma(t) ** 2, torch.ones_like(t))
    assert float(model.s(torch.tensor(0.0, dtype=torch.float64))) == pytest.approx(1.0)
    assert float(model.sigma(torch.tensor(0.0, dtype=torch.float64))) == pytest.approx(0.0)
    assert (model.log_snr(t).diff() < 0).all(), "log-SNR must decrease in t"


def test_vp_linear_closed_form():
    model = VPLinear(0.1, 20.0)
    t = torch.tensor(0.3, dtype=torch.float64)
    integral = 0.1 * 0.3 + 0.5 * (20.0 - 0.1) * 0.3**2
    assert float(model.s(t)) == pytest.approx(math.exp(-0.5 * integral))
    assert float(model.f(t)) == pytest.approx(-0.5 * (0.1 + 0.3 * 19.9))
    assert float(model.g(t)) == pytest.approx(math.sqrt(0.1 + 0.3 * 19.9))


def test_vp_cosine_closed_form():
    model, c = VPCosine(0.008), 0.008
    t = 0.4
    alpha_bar = (math.cos((t + c) / (1 + c) * math.pi / 2) / math.cos(c / (1 + c) * math.pi / 2)) ** 2
    assert float(model.s(torch.tensor(t, dtype=torch.float64))) == pytest.approx(math.sqrt(alpha_bar))


@pytest.mark.parametrize("model", MODELS, ids=repr)
def test_inverse_log_snr(model):
    t = torch.linspace(1e-3, model.t_max, 50, dtype=torch.float64)
    torch.testing.assert_close(model.t_of_lambda(model.log_snr(t)), t, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("model", MODELS, ids=repr)
def test_noise_eps_x0_score_conversions(model):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0.05, 0.3, 0.6, 0.9], dtype=torch.float64)
    x_t = model.add_noise(x0, t, eps)
    s, sigma = model.s(t)[:, None, None], model.sigma(t)[:, None, None]
    torch.testing.assert_close(x_t, s * x0 + sigma * eps)
    torch.testing.assert_close(model.eps_to_x0(x_t, eps, t), x0)
    torch.testing.assert_close(model.x0_to_eps(x_t, x0, t), eps)
    score = model.eps_to_score(eps, t)
    torch.testing.assert_close(score, -eps / sigma)
    torch.testing.assert_close(model.score_to_eps(score, t), eps)
    with pytest.raises(ValueError, match="shape"):
        model.add_noise(x0, t[:2], eps)


def test_invalid_parameters_are_named():
    with pytest.raises(ValueError, match="beta_min"):
        VPLinear(beta_min=5.0, beta_max=1.0)
    with pytest.raises(ValueError, match="beta_min"):
        VPLinear(beta_min=-0.1)
    with pytest.raises(ValueError, match="finite"):
        VPLinear(beta_min=0.1, beta_max=float("nan"))
    with pytest.raises(ValueError, match="c must"):
        VPCosine(c=0.0)
    with pytest.raises(ValueError, match="t_max"):
        VPCosine(t_max=1.0)
