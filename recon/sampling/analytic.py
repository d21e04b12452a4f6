r"""Ground truth: Gaussian-mixture data, whose noisy marginals, score and posterior are closed-form.

For ``x0 ~ sum_k w_k N(mu_k, Sigma_k)`` and ``x_t = s x0 + sigma eps``,

    p_t(x) = sum_k w_k N(x; s mu_k, C_k),    C_k = s^2 Sigma_k + sigma^2 I,
    grad log p_t(x) = sum_k gamma_k(x) C_k^{-1} (s mu_k - x),    eps = -sigma grad log p_t,

with responsibilities ``gamma_k propto w_k N(x; s mu_k, C_k)``. Given ``y = A x0 + sigma_y n`` the
posterior is again a mixture, with components ``N(m_k, P_k)``,
``P_k = (Sigma_k^{-1} + A^T A / sigma_y^2)^{-1}``, ``m_k = P_k (Sigma_k^{-1} mu_k + A^T y/sigma_y^2)``
and weights ``propto w_k N(y; A mu_k, A Sigma_k A^T + sigma_y^2 I)``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import wasserstein_distance
from torch import Tensor

from recon.sampling.diffusion import DiffusionModel


class GaussianMixture:
    """``sum_k w_k N(mu_k, Sigma_k)`` in ``D`` dimensions (float64)."""

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.covs = torch.as_tensor(covs, dtype=torch.float64)
        k, d = self.means.shape
        if self.weights.shape != (k,) or self.covs.shape != (k, d, d):
            raise ValueError(f"weights (K,), means (K, D), covs (K, D, D) expected; got "
                             f"{tuple(self.weights.shape)}, {(k, d)}, {tuple(self.covs.shape)}")
        if (self.weights < 0).any() or not torch.isclose(self.weights.sum(), torch.tensor(1.0,
                                                                                    dtype=torch.float64)):
            raise ValueError("mixture weights must be non-negative and sum to 1")
        torch.linalg.cholesky(self.covs)  # raises if a covariance is not positive definite
        self.dim = d

    @classmethod
    def gaussian(cls, mean: Tensor, cov: Tensor) -> GaussianMixture:
        mean = torch.as_tensor(mean, dtype=torch.float64)
        return cls(torch.ones(1), mean[None], torch.as_tensor(cov, dtype=torch.float64)[None])

    @property
    def mean(self) -> Tensor:
        return self.weights @ self.means

    @property
    def cov(self) -> Tensor:
        centred = self.means - self.mean
        within = torch.einsum("k,kij->ij", self.weights, self.covs)
        return within + torch.einsum("k,ki,kj->ij", self.weights, centred, centred)

    def sample(self, n: int, generator: torch.Generator | None = None,
               return_labels: bool = False):
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        chol = torch.linalg.cholesky(self.covs)[labels]
        x = self.means[labels] + torch.einsum("nij,nj->ni", chol, z)
        return (x, labels) if return_labels else x

    def responsibilities(self, x: Tensor, s: Tensor, sigma: Tensor) -> Tensor:
        """``gamma_k(x)`` under the marginal at scale ``(s, sigma)`` (scalars or per-sample (B,))."""
        _, log_gamma = self._marginal(x, s, sigma)
        return torch.softmax(log_gamma, dim=-1)

    def _marginal(self, x: Tensor, s: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        s = torch.as_tensor(s, dtype=torch.float64).reshape(-1, 1, 1, 1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        eye = torch.eye(self.dim, dtype=torch.float64)
        cov = s**2 * self.covs + sigma**2 * eye  # (B or 1, K, D, D)
        chol = torch.linalg.cholesky(cov)
        diff = s[..., 0] * self.means - x[:, None, :]  # (B, K, D): s mu_k - x
        sol = torch.cholesky_solve(diff[..., None], chol)[..., 0]  # C_k^{-1}(s mu_k - x)
        maha = (diff * sol).sum(-1)
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        log_gamma = torch.log(self.weights) - 0.5 * (maha + logdet)
        return sol, log_gamma

    def score(self, x: Tensor, s: Tensor, sigma: Tensor) -> Tensor:
        """``grad log p(x)`` for ``x = s x0 + sigma eps``; ``x`` of shape (B, D)."""
        sol, log_gamma = self._marginal(x.to(torch.float64), s, sigma)
        return (torch.softmax(log_gamma, dim=-1)[..., None] * sol).sum(1)

    def eps_network(self, diffusion: DiffusionModel):
        """An exact eps-network ``(x_t, t) -> -sigma(t) grad log p_t(x_t)`` for this law."""

        def network(x: Tensor, t: Tensor) -> Tensor:
            t = t.to(torch.float64)
            if bool((t == t[0]).all()):
                t = t[:1]
            s, sigma = diffusion.s(t), diffusion.sigma(t)
            eps = -sigma[:, None] * self.score(x, s, sigma)
            return eps.to(x.dtype)

        return network

    def posterior(self, A: Tensor, y: Tensor, sigma_y: float) -> GaussianMixture:
        """The exact posterior ``p(x0 | y)`` for ``y = A x0 + sigma_y n`` (A of shape (M, D))."""
        A = torch.as_tensor(A, dtype=torch.float64)
        y = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
        prec = torch.linalg.inv(self.covs) + A.T @ A / sigma_y**2
        post_cov = torch.linalg.inv(prec)
        post_cov = 0.5 * (post_cov + post_cov.transpose(-1, -2))
        rhs = torch.linalg.solve(self.covs, self.means[..., None])[..., 0] + A.T @ y / sigma_y**2
        post_mean = torch.einsum("kij,kj->ki", post_cov, rhs)
        pred_cov = A @ self.covs @ A.T + sigma_y**2 * torch.eye(A.shape[0], dtype=torch.float64)
        pred = torch.distributions.MultivariateNormal(self.means @ A.T, pred_cov)
        log_w = torch.log(self.weights) + pred.log_prob(y)
        return GaussianMixture(torch.softmax(log_w, 0), post_mean, post_cov)

    def ode_flow(self, x: Tensor, t_from: float, t_to: float, diffusion: DiffusionModel) -> Tensor:
        """Exact probability-flow ODE map of a single Gaussian from ``t_from`` to ``t_to``.

        In the eigenbasis ``Sigma = U diag(l) U^T`` the flow is linear:
        ``x_to - s_to mu = U diag(sqrt((s_to^2 l + sigma_to^2)/(s_from^2 l + sigma_from^2))) U^T
        (x_from - s_from mu)``.
        """
        if len(self.weights) != 1:
            raise ValueError("the closed-form ODE flow is implemented for a single Gaussian")
        tt = torch.tensor([t_from, t_to], dtype=torch.float64)
        (s0, s1), (n0, n1) = diffusion.s(tt), diffusion.sigma(tt)
        lam, U = torch.linalg.eigh(self.covs[0])
        scale = torch.sqrt((s1**2 * lam + n1**2) / (s0**2 * lam + n0**2))
        mu = self.means[0]
        return s1 * mu + ((x.to(torch.float64) - s0 * mu) @ U * scale) @ U.T


def coordinate_wasserstein(a: Tensor, b: Tensor) -> Tensor:
    """1-D Wasserstein-1 distance between samples ``a`` (N, D) and ``b`` (M, D), per coordinate."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return torch.tensor([wasserstein_distance(a[:, j], b[:, j]) for j in range(a.shape[1])])
