r"""Conditional sampling ``x0 ~ p(x0 | y)`` for ``y = A x0 + sigma_y n`` with a diffusion prior.

The prior's eps-network is wrapped by a ``Guidance`` (``recon.sampling.guidance``) into the conditional

    eps_y(x_t, t) = eps(x_t, t) - sigma(t) grad log p_t(y | x_t),

and the unconditional machinery (``Denoiser.integrate``: any integrator, any timer) runs on it;
the sample is Tweedie's estimate from ``eps_y`` at ``t_min``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import torch
from torch import Tensor

from recon.classical.linalg import real_adjoint
from recon.classical.posterior import Posterior
from recon.sampling.adaptation import Adapter
from recon.sampling.denoiser import Denoiser, Network
from recon.sampling.diffusion import DiffusionModel, eps_from_x0, tweedie
from recon.sampling.guidance import Guidance, make_guidance
from recon.sampling.integrator import Integrator, scales
from recon.sampling.timer import Timer

_OPERATOR_API = ("forward", "adjoint", "sigma_y", "check_measurement")


class CondDenoiser(Denoiser):
    """Posterior sampler: a ``Denoiser`` whose eps is conditioned on ``y`` by a ``Guidance``.

    ``warm_start`` (CCDF, Chung et al. 2022): a map ``y -> x_init`` (e.g. a TV solution); the
    chains then start at the timer's ``t_max`` from ``x = s x_init + sigma z`` instead of pure
    noise, so a timer with ``t_max = t0 < 1`` spends every step near the answer.

    ``adapter`` (``recon.sampling.adaptation.Adapter``, the network this sampler evaluates or the one
    inside its wrappers): before each evaluation its parameters take a step on ``misfit``, the
    measurement's own data term (the prior adapted to the scan).

    ``operator`` needs ``forward(x)`` (batched images -> measurements), ``adjoint(y)``,
    ``sigma_y`` and ``check_measurement(y)`` (raises ``ValueError`` on a bad ``y``). Images are
    real; their shape and dtype are those of ``Re(adjoint(y))``. ``guidance`` is a ``Guidance``
    or a name for ``make_guidance`` (default arguments).

    Sampling runs under ``torch.inference_mode`` when the guidance needs no vector-Jacobian
    product (e.g. proximal data consistency: about 10 % faster per network evaluation on CPU,
    ``benchmarks/throughput.py``), else under ``torch.no_grad``, with the guidance turning
    autograd on locally for its products.
    """

    def __init__(self, diffusion: DiffusionModel, network: Network, integrator: Integrator,
                 timer: Timer, operator, guidance: Guidance | str,
                 x0_range: tuple[float, float] | None = None,
                 warm_start: Callable[[Tensor], Tensor] | None = None,
                 adapter: Adapter | None = None):
        super().__init__(diffusion, network, integrator, timer)
        self.warm_start, self.adapter = warm_start, adapter
        if x0_range is not None:
            lo, hi = (float(v) for v in x0_range)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"x0_range must be (lo, hi) with finite lo < hi, got {x0_range}")
            x0_range = (lo, hi)
        self.x0_range = x0_range
        missing = [name for name in _OPERATOR_API if not hasattr(operator, name)]
        if missing:
            raise TypeError(f"operator {type(operator).__name__} lacks {missing}; a measurement "
                            f"operator needs {list(_OPERATOR_API)}")
        if isinstance(guidance, str):
            guidance = make_guidance(guidance)
        if not isinstance(guidance, Guidance):
            raise TypeError(f"guidance must be a Guidance or a name, got {type(guidance).__name__}")
        self.operator, self.guidance = operator, guidance

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.diffusion!r}, {self.integrator!r}, {self.timer!r}, "
                f"{type(self.operator).__name__}, {self.guidance!r})")

    def _grad_mode(self) -> contextlib.AbstractContextManager:
        grads = self.guidance.vjps_per_eval or self.adapter is not None
        return torch.no_grad() if grads else torch.inference_mode()

    def misfit(self, x: Tensor, t: float, y: Tensor) -> Tensor:
        """``||y - A x0_hat(x, t)||^2 / (m sigma_y^2)`` per chain, averaged (``m``: measured
        entries per chain), through the network: the adapter's loss."""
        s, sigma = scales(self.diffusion, t)
        r = y - self.operator.forward(tweedie(x.detach(), self.eps(x.detach(), t), s, sigma))
        support = self.operator._noise_support() if hasattr(self.operator, "_noise_support") \
            else None
        m = r[0].numel() if support is None else int(torch.broadcast_to(support, r.shape[1:]).sum())
        var = max(float(self.operator.sigma_y) ** 2, 1e-12)
        return r.abs().square().sum() / (r.shape[0] * m * var)

    @property
    def vjp(self) -> int:
        """Vector-Jacobian products through the network per chain."""
        return self.nfe * self.guidance.vjps_per_eval

    def cond_eps(self, y: Tensor):
        """``eps_fn(x, t)`` for the guided eps given ``y`` batched like ``x``.

        With ``x0_range = (lo, hi)`` the guided estimate ``x0_y = (x - sigma eps_y)/s`` is kept
        finite and inside ``[lo, hi]`` (``nan_to_num``, then ``clamp``) and ``eps_y`` recomputed
        from it: a guidance step that would blow up (an out-of-distribution scan, a step size too
        large) moves the chain to the edge of the range instead of to infinity. Where the
        operator has a ``support`` (e.g. the coil maps' support), ``x0_y`` is zero outside it:
        no measurement constrains those pixels, and a patch prior would otherwise fill them
        with tissue."""
        support = getattr(self.operator, "support", None)

        def eps_fn(x: Tensor, t: float) -> Tensor:
            if self.adapter is not None:
                self.adapter.fit(lambda: self.misfit(x, t, y), t)
            eps = self.guidance.eps(x, t, y, eps_fn=self.eps, diffusion=self.diffusion,
                                    operator=self.operator)
            if self.x0_range is None and support is None:
                return eps
            s, sigma = scales(self.diffusion, t)
            x0 = tweedie(x, eps, s, sigma)
            if self.x0_range is not None:
                lo, hi = self.x0_range
                x0 = torch.nan_to_num(x0, nan=0.5 * (lo + hi), posinf=hi, neginf=lo).clamp(lo, hi)
            if support is not None:
                x0 = torch.where(support.to(x0.device), x0, torch.zeros((), dtype=x0.dtype,
                                                                        device=x0.device))
            return eps_from_x0(x, x0, s, sigma)

        return eps_fn

    def sample(self, y: Tensor, n_samples: int = 1, generator: torch.Generator | None = None,
               progress: bool = False, keep_samples: bool = True) -> Posterior:
        """Draw ``n_samples`` posterior samples for each measurement in the batch ``y`` (B, ...).

        All ``n_samples * B`` chains run as one batch, sample-major: chain ``i * B + b`` is
        sample ``i`` of ``y[b]``. ``generator`` seeds the initial noise and stochastic steps.
        """
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        if not isinstance(y, Tensor):
            raise ValueError(f"y must be a torch.Tensor, got {type(y).__name__}")
        self.operator.check_measurement(y)
        if y.ndim < 1 or y.shape[0] < 1 or not torch.isfinite(y).all():
            raise ValueError("y must be a non-empty batch (B, ...) of finite values")
        start = time.perf_counter()
        with torch.no_grad():
            x_like = real_adjoint(self.operator, y)
        batch, x_shape = y.shape[0], tuple(x_like.shape[1:])
        if x_like.shape[0] != batch:
            raise ValueError(f"operator.adjoint mapped a batch of {batch} measurements to shape "
                             f"{tuple(x_like.shape)}; expected a leading batch dimension")
        y_rep = y.repeat(n_samples, *([1] * (y.ndim - 1)))
        x = self.prior_noise((n_samples * batch, *x_shape), generator, x_like.device, x_like.dtype)
        reset = getattr(self.operator, "reset", None)  # state carried from step to step
        if reset is not None:  # (recon.operators.complex_image.TrackedPhase's phase)
            reset()
        if self.warm_start is not None:
            with torch.no_grad():
                x_init = self.warm_start(y).to(x.device, x.dtype)
            if tuple(x_init.shape) != (batch, *x_shape):
                raise ValueError(f"the warm start gave shape {tuple(x_init.shape)}, expected "
                                 f"{(batch, *x_shape)}")
            s_max, _ = scales(self.diffusion, float(self.times[0]))
            x = s_max * x_init.repeat(n_samples, *([1] * (x.ndim - 1))) + x
        x0 = self.integrate(x, self.cond_eps(y_rep), generator, progress=progress)
        samples = x0.reshape(n_samples, batch, *x_shape)
        std = (samples.std(0) if n_samples > 1 else torch.zeros_like(samples[0]))
        return Posterior(mean=samples.mean(0), std=std, samples=samples if keep_samples else None,
                         nfe=self.nfe, vjp=self.vjp, seconds=time.perf_counter() - start)
