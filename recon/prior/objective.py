r"""The training objective, in the network's own parameterisation (``prior_loss``: the eps-loss,
or the v-loss ``||v - v_theta||^2 = ||eps - eps_theta||^2 / s^2``), and the fixed validation
set that makes the validation loss comparable across evaluations and runs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from recon.prior.batches import STREAM_VAL, seeded_generator, stack_items
from recon.prior.network import (
    EpsNetwork,
    autocast,
)
from recon.sampling.diffusion import DiffusionModel


def train_autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Mixed precision for training on CUDA only (``training.amp``; float32 on the CPU)."""
    return autocast(device, amp if device.type == "cuda" else "none")


def eps_loss(network: nn.Module, diffusion: DiffusionModel, x0: Tensor, t: Tensor,
             eps: Tensor) -> Tensor:
    """``mean ||eps - eps_theta(s x0 + sigma eps, t)||^2`` (float32 reduction)."""
    x_t = diffusion.add_noise(x0, t, eps)
    return torch.nn.functional.mse_loss(network(x_t, t).float(), eps)


def prior_loss(network: EpsNetwork, diffusion: DiffusionModel, x0: Tensor, t: Tensor,
               eps: Tensor) -> Tensor:
    """The training objective ``mean ||F_target - F_theta(x_t, t)||^2`` in the network's own
    parameterisation: the eps-loss above for ``eps``; for ``v`` the v-loss
    ``||v - v_theta||^2 = ||eps - eps_theta||^2 / s^2`` (Salimans & Ho 2022), which keeps
    weight on the high-noise end where ``x0_hat`` needs ``eps`` to a precision ``~ s``."""
    x_t = diffusion.add_noise(x0, t, eps)
    return torch.nn.functional.mse_loss(network.raw(x_t, t).float(),
                                        network.target(x0, eps, t).float())


@dataclass
class ValidationSet:
    """``size`` held-out triples ``(x0, t, eps)`` with fixed ``t`` (stratified over
    ``[t_eps, t_max]``) and fixed ``eps``, so the validation loss is comparable across
    evaluations and runs. The slices are evenly spaced over the dataset, repeated (with other
    ``t`` and ``eps``) when it has fewer than ``size``."""

    x0: Tensor
    t: Tensor
    eps: Tensor

    @classmethod
    def build(cls, dataset: Any, size: int, t_eps: float, t_max: float, seed: int) -> ValidationSet:
        n = len(dataset)
        idx = torch.arange(size) * n // size
        x0 = stack_items(dataset, idx)
        g = seeded_generator(seed, STREAM_VAL)
        k = x0.shape[0]
        strata = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        t = (t_eps + (t_max - t_eps) * strata)[torch.randperm(k, generator=g)].float()
        eps = torch.randn(x0.shape, generator=g)
        return cls(x0, t, eps)

    @torch.no_grad()
    def loss(self, network: EpsNetwork, diffusion: DiffusionModel, batch_size: int,
             device: torch.device, amp: str = "none", kind: str = "objective") -> float:
        """Mean training objective (``kind="objective"``) or eps-MSE (``kind="eps"``)."""
        fn = prior_loss if kind == "objective" else eps_loss
        total = 0.0
        was_training = network.training
        network.eval()
        for i in range(0, self.x0.shape[0], batch_size):
            sl = slice(i, i + batch_size)
            with train_autocast(device, amp):
                loss = fn(network, diffusion, self.x0[sl].to(device), self.t[sl].to(device),
                          self.eps[sl].to(device))
            total += float(loss) * self.x0[sl].shape[0]
        network.train(was_training)
        return total / self.x0.shape[0]
