"""Shared fixtures: ground-truth laws whose score is closed-form."""

import pytest
import torch

from recon.analytic import GaussianMixture
from recon.demo import demo_mixture


@pytest.fixture(scope="session")
def mixture_2d() -> GaussianMixture:
    """Three well-separated 2-D components with unequal weights and correlated covariances."""
    return demo_mixture()


@pytest.fixture(scope="session")
def gaussian_16d() -> GaussianMixture:
    """A 16-D Gaussian with a non-diagonal covariance, eigenvalues spread over [0.1, 3.2]."""
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))[0]
    eig = torch.logspace(-1, 0.5, 16, dtype=torch.float64)
    mean = torch.randn(16, generator=g, dtype=torch.float64)
    return GaussianMixture.gaussian(mean, q @ torch.diag(eig) @ q.T)
