"""The training batches: every random draw of step ``k`` (the batch's indices, flips, ``t``,
``eps``) from generators seeded by ``(seed, k)``, and every epoch's order from ``(seed, epoch)``,
so a resumed run takes exactly the path of an uninterrupted one; ``batch_stream`` makes them in
DataLoader workers without changing them."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from recon.config.prior import TrainingConfig
from recon.data.patches import CropDataset


def seed_of(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (no Python ``hash``: it is salted for str)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) % 2**64
        h ^= h >> 29
    return h % 2**63


def seeded_generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed_of(*parts))


STREAM_DATA, STREAM_STEP, STREAM_VAL = 1, 2, 3


def as_image(item: Any, key: str = "image") -> Tensor:
    """A dataset item (tensor, array or dict with ``key``) as a float32 tensor ``(C, *spatial)``."""
    if isinstance(item, dict):
        item = item[key]
    elif isinstance(item, (tuple, list)):
        item = item[0]
    return torch.as_tensor(np.asarray(item) if not isinstance(item, Tensor) else item,
                           dtype=torch.float32)


def stack_items(dataset: Any, indices: Sequence[int] | Tensor) -> Tensor:
    """``dataset[indices]`` as a batch: fast path for a tensor, item by item otherwise."""
    if isinstance(dataset, Tensor):
        return dataset[torch.as_tensor(indices, dtype=torch.long)].float()
    return torch.stack([as_image(dataset[int(i)]) for i in indices])


class BatchSampler:
    """Batch indices for step ``k``: epoch-wise permutations seeded by ``(seed, epoch)``.

    Stateless: ``indices(k)`` depends on ``(seed, n, batch_size, k)`` only, so resuming at any
    step reproduces the uninterrupted order.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise ValueError("the training set is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perm: dict[int, Tensor] = {}

    def _permutation(self, epoch: int) -> Tensor:
        if epoch not in self._perm:
            if len(self._perm) > 2:  # a batch spans at most two epochs (or many if n < batch)
                self._perm.clear()
            g = seeded_generator(self.seed, STREAM_DATA, epoch)
            self._perm[epoch] = torch.randperm(self.n, generator=g)
        return self._perm[epoch]

    def indices(self, step: int) -> Tensor:
        pos = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, within = pos // self.n, pos % self.n
        pairs = zip(epochs.tolist(), within.tolist(), strict=True)
        return torch.stack([self._permutation(e)[i] for e, i in pairs])


def make_batch(dataset: Any, sampler: BatchSampler, tc: TrainingConfig, t_max: float, step: int,
               device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``(x0, t, eps)`` of 0-based ``step``: the sampler's slices (augmented crops of them for a
    ``CropDataset``), random flips, ``t ~ U[t_eps, t_max]`` and ``eps ~ N(0, I)``, all drawn
    from generators seeded by ``(seed, step)``."""
    g = seeded_generator(tc.seed, STREAM_STEP, step)
    indices = sampler.indices(step)
    x0 = dataset.batch(indices, step) if isinstance(dataset, CropDataset) \
        else stack_items(dataset, indices)
    if tc.flip_prob > 0:
        for d in tc.flip_dims:
            flip = torch.rand(x0.shape[0], generator=g) < tc.flip_prob
            if flip.any():
                x0[flip] = x0[flip].flip(d)
    t = tc.t_eps + (t_max - tc.t_eps) * torch.rand(x0.shape[0], generator=g)
    eps = torch.randn(x0.shape, generator=g)
    return x0.to(device), t.to(device), eps.to(device)


class StepBatches(torch.utils.data.Dataset):
    """``make_batch`` as a map-style dataset over step numbers, so that a ``DataLoader`` with
    worker processes makes the batches of the coming steps while the optimiser runs; each
    batch depends on its step alone, so the workers change nothing but the speed."""

    def __init__(self, dataset: Any, sampler: BatchSampler, tc: TrainingConfig, t_max: float):
        self.dataset, self.sampler, self.tc, self.t_max = dataset, sampler, tc, t_max

    def __len__(self) -> int:
        return self.tc.steps

    def __getitem__(self, step: int) -> tuple[Tensor, Tensor, Tensor]:
        return make_batch(self.dataset, self.sampler, self.tc, self.t_max, int(step),
                          torch.device("cpu"))


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # a crop worker shares the CPU with the optimiser


def batch_stream(dataset: Any, sampler: BatchSampler, tc: TrainingConfig, t_max: float,
                 start: int, device: torch.device) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """The batches of steps ``start .. tc.steps - 1`` on ``device``, made by
    ``tc.loader_workers`` DataLoader workers (in this process when 0)."""
    steps = range(start, tc.steps)
    if tc.loader_workers == 0:
        for step in steps:
            yield make_batch(dataset, sampler, tc, t_max, step, device)
        return
    # workers from a fork server, not forks of this process: a fork copies whatever threads,
    # locks and after-fork hooks the caller holds (Prefect's, MLflow's, torch's thread pool),
    # and such a worker could die at shutdown (exit code 1) after a passing run
    context = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else None
    loader = torch.utils.data.DataLoader(
        StepBatches(dataset, sampler, tc, t_max), batch_size=None, sampler=steps,
        num_workers=tc.loader_workers, prefetch_factor=4, worker_init_fn=_one_thread,
        pin_memory=device.type == "cuda", multiprocessing_context=context)
    for x0, t, eps in loader:
        yield (x0.to(device, non_blocking=True), t.to(device, non_blocking=True),
               eps.to(device, non_blocking=True))
