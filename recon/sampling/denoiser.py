"""Unconditional sampling: integrate the reverse dynamics from ``t_max`` to ``t_min``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from recon.classical.cancellation import check_cancelled
from recon.sampling.diffusion import DiffusionModel, tweedie
from recon.sampling.integrator import EpsFn, Integrator, scales
from recon.sampling.timer import Timer

Network = Callable[[Tensor, Tensor], Tensor]


class Denoiser:
    """Samples ``x0 ~ p(x0)`` with an eps-network ``network(x_t, t) -> eps_hat``, t of shape (B,).

    Starting from ``x_{t_max} ~ N(0, sigma(t_max)^2 I)``, the integrator steps along the timer's
    grid to ``t_min``; the sample is Tweedie's ``x0_hat = (x - sigma eps)/s`` at ``t_min``
    (one more network evaluation), so ``nfe = steps * integrator.nfe + 1``.
    """

    def __init__(self, diffusion: DiffusionModel, network: Network, integrator: Integrator,
                 timer: Timer):
        self.diffusion, self.network = diffusion, network
        self.integrator, self.timer = integrator, timer
        self.times = timer.times(diffusion)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.diffusion!r}, {self.integrator!r}, {self.timer!r})")

    @property
    def nfe(self) -> int:
        """Network evaluations per sample."""
        return self.timer.steps * self.integrator.nfe + 1

    def eps(self, x: Tensor, t: float) -> Tensor:
        """``eps_hat(x, t)`` with ``t`` broadcast to the batch; checks the network's output shape."""
        t_batch = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        try:
            out = self.network(x, t_batch)
        except RuntimeError as err:
            raise ValueError(f"the network rejected an input of shape {tuple(x.shape)}: {err}") from err
        if out.shape != x.shape:
            raise ValueError(f"the network returned shape {tuple(out.shape)} for an input of "
                             f"shape {tuple(x.shape)}; it must predict eps of the input's shape")
        return out

    def x0(self, x: Tensor, t: float) -> Tensor:
        """Tweedie's denoised estimate ``(x - sigma eps_hat)/s``."""
        return self.diffusion.eps_to_x0(x, self.eps(x, t), torch.tensor(t, dtype=x.dtype))

    def _grad_mode(self) -> contextlib.AbstractContextManager:
        return torch.inference_mode()

    def prior_noise(self, shape: Sequence[int], generator: torch.Generator | None = None,
                    device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
        """``x_{t_max} ~ N(0, sigma(t_max)^2 I)``."""
        sigma_max = float(self.diffusion.sigma(self.times[:1]))
        return sigma_max * torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)

    def sample(self, shape: Sequence[int], generator: torch.Generator | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
               trajectory: bool = False, progress: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Draw ``shape[0]`` samples; with ``trajectory=True`` also return ``x`` at every grid time
        (shape ``(steps + 1, *shape)``)."""
        if len(shape) < 1 or any(int(n) < 1 for n in shape):
            raise ValueError(f"shape must be a non-empty tuple of positive sizes, got {tuple(shape)}")
        x = self.prior_noise(shape, generator, device, dtype)
        return self.integrate(x, self.eps, generator, trajectory, progress)

    def integrate(self, x: Tensor, eps_fn: EpsFn, generator: torch.Generator | None = None,
                  trajectory: bool = False, progress: bool = False):
        """Run the integrator from ``x`` at ``t_max`` along the grid and denoise at ``t_min``
        (``recon.classical.cancellation.Cancelled`` between steps once the job is cancelled)."""
        times = self.times.tolist()
        path = [x] if trajectory else None
        with self._grad_mode():
            steps = range(len(times) - 1)
            for i in tqdm(steps, desc=type(self.integrator).__name__, disable=None if progress else True,
                          leave=False):
                check_cancelled()
                x = self.integrator.step(self.diffusion, eps_fn, x, times[i], times[i + 1],
                                         generator)
                if not torch.isfinite(x).all():
                    raise FloatingPointError(
                        f"non-finite values in x at step {i + 1}/{len(steps)} (t={times[i + 1]:.4g}) "
                        f"with {self.integrator!r}: check the network, the time grid or the inputs")
                if path is not None:
                    path.append(x)
            t_min = times[-1]
            s, sigma = scales(self.diffusion, t_min)
            x0 = tweedie(x, eps_fn(x, t_min), s, sigma)
        if path is not None:
            return x0, torch.stack(path)
        return x0
