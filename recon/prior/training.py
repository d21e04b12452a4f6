r"""Training the eps-prior: denoising score matching with EMA, atomic checkpoints and exact resume.

Loss (DESIGN section 2), for a batch of slices ``x0``, ``t ~ U[t_eps, t_max]``,
``eps ~ N(0, I)``, ``x_t = s(t) x0 + sigma(t) eps``, mean over pixels:

    eps-network:  L = E ||eps - eps_theta(x_t, t)||^2
    v-network:    L = E ||v - v_theta(x_t, t)||^2 = E ||eps - eps_theta(x_t, t)||^2 / s(t)^2

(``v = s eps - sigma x0``; the shipped prior is a v-network behind the eps interface, see
``recon.prior.network``). The validation also reports the plain eps-MSE.

AdamW with linear warm-up (then constant or cosine decay), gradient-norm
clipping, an exponential moving average (EMA) of the weights, optional autocast (bf16/fp16) on
CUDA only. Every random draw of step ``k`` (batch indices, flips, ``t``, ``eps``) comes from
generators seeded by ``(seed, k)`` and every epoch's data order from ``(seed, epoch)``, so a run
resumed from a checkpoint takes exactly the path of an uninterrupted one.

A *training checkpoint* (``out_dir/last.pt``) holds model, EMA, optimiser, AMP scaler, step,
RNG state, metric history and the config as plain primitives; it is written atomically
(temporary file in the same folder, fsync, ``os.replace``) and read with
``torch.load(..., weights_only=True)``. ``export_prior`` writes the small *shipped* file: EMA
weights + config + a summary, loadable with ``recon.prior.network.load_prior``.

    recon prior train configs/prior_64.yaml --data-root data/public \
        --out work/prior_64 --export checkpoints/prior_64.pt

``train_prior`` = ``Trainer.setup`` (model, EMA, optimiser, data order, validation set, resume)
-> ``Trainer.run`` (the step loop: log, validate, checkpoint) -> ``Trainer.save`` (the final
checkpoint).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from recon.config.prior import PriorConfig, TrainingConfig
from recon.data.nifti import atomic_path
from recon.prior.batches import BatchSampler, batch_stream
from recon.prior.network import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    EpsNetwork,
    build_network,
    check_state_dict,
    count_parameters,
    read_checkpoint,
    resolve_device,
)
from recon.prior.objective import ValidationSet, prior_loss, train_autocast
from recon.sampling.diffusion import DiffusionModel

log = logging.getLogger(__name__)

LAST = "last.pt"
"""File name of the training checkpoint inside ``out_dir``."""


# -- helpers -----------------------------------------------------------------------------------
def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in ``path``'s folder, fsync, then ``os.replace``
    (``recon.data.nifti.atomic_path``).

    A failure at any point leaves ``path`` as it was (absent or the previous version) and no
    temporary file behind.
    """
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)
    return path


def lr_at(cfg: TrainingConfig, step: int) -> float:
    """Learning rate at 0-based ``step``: linear warm-up, then constant or cosine decay to
    ``min_lr_ratio * lr`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def ema_decay_at(cfg: TrainingConfig, step: int) -> float:
    """EMA decay after 1-based optimiser step ``k``; with warm-up ``min(decay, (1+k)/(10+k))``."""
    if cfg.ema_warmup:
        return min(cfg.ema_decay, (1 + step) / (10 + step))
    return cfg.ema_decay


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema <- decay ema + (1 - decay) model`` for parameters; buffers are copied."""
    e_params = [p for p in ema.parameters()]
    m_params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e_params, m_params, 1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers(), strict=True):
        eb.copy_(mb)


def train_step(model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, diffusion: DiffusionModel,
               batch: tuple[Tensor, Tensor, Tensor], tc: TrainingConfig, step: int, lr: float,
               amp: str = "none") -> tuple[Tensor, Tensor]:
    """One optimiser step on ``batch = (x0, t, eps)`` then the EMA update; returns the detached
    loss and the gradient norm before clipping (device tensors: no host sync here)."""
    x0, t, eps = batch
    for group in opt.param_groups:
        group["lr"] = lr
    device = x0.device
    with train_autocast(device, amp):
        loss = prior_loss(model, diffusion, x0, t, eps)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf)
    scaler.step(opt)
    scaler.update()
    ema_update(ema, model, ema_decay_at(tc, step + 1))
    return loss.detach(), grad_norm.detach()


@dataclass
class TrainResult:
    """What ``train_prior`` returns."""

    step: int
    checkpoint: Path
    train_loss: float
    val_loss: float | None
    val_loss_raw: float | None
    seconds: float
    n_params: int
    resumed_from: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


_RESUME_FREE = {"steps", "log_every", "val_every", "checkpoint_every", "device"}
"""Training options a resumed run may change (``steps`` also reshapes a cosine schedule)."""


def _check_resume(cfg: PriorConfig, stored: dict[str, Any], n_train: int, stored_n: int) -> None:
    old = PriorConfig.model_validate(stored)
    diffs = [f"network.{k}" for k, v in cfg.network.model_dump().items()
             if old.network.model_dump()[k] != v]
    diffs += [f"diffusion.{k}" for k, v in cfg.diffusion.model_dump().items()
              if old.diffusion.model_dump()[k] != v]
    diffs += [f"training.{k}" for k, v in cfg.training.model_dump().items()
              if k not in _RESUME_FREE and old.training.model_dump()[k] != v]
    diffs += [f"data.{k}" for k in ("image_size", "axis", "train_split", "loader")
              if getattr(cfg.data, k) != getattr(old.data, k)]
    if diffs:
        raise CheckpointError(f"cannot resume: the config differs from the checkpoint's in "
                              f"{', '.join(diffs)} (use resume=False or another out_dir)")
    if n_train != stored_n:
        raise CheckpointError(f"cannot resume: the training set has {n_train} slices, the "
                              f"checkpoint was trained on {stored_n}")


@dataclass
class Trainer:
    """Everything a training run holds; ``setup`` builds it, ``run`` steps it, ``save``
    checkpoints it. ``train_prior`` chains the three."""

    cfg: PriorConfig
    out_dir: Path
    device: torch.device
    diffusion: DiffusionModel
    model: EpsNetwork
    ema: EpsNetwork
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: BatchSampler
    train_dataset: Any
    val: ValidationSet | None
    t_max: float
    amp: str
    n_train: int
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None
    elapsed: float = 0.0
    """Seconds spent in earlier runs of a resumed training."""
    callback: Callable[[int, dict[str, float]], None] | None = None
    _t_start: float = field(default_factory=time.perf_counter)

    @property
    def checkpoint(self) -> Path:
        return self.out_dir / LAST

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    @property
    def seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self._t_start

    # -- setup ---------------------------------------------------------------------------------
    @classmethod
    def setup(cls, cfg: PriorConfig, train_dataset: Any, val_dataset: Any | None,
              out_dir: str | Path, resume: bool = True,
              callback: Callable[[int, dict[str, float]], None] | None = None) -> Trainer:
        """Seeded model, EMA copy, AdamW, data order and fixed validation set; resumed from
        ``out_dir/last.pt`` when ``resume`` and it exists (same config, same data size)."""
        tc = cfg.training
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        device = resolve_device(tc.device)
        diffusion = cfg.diffusion.build()
        t_max = tc.t_max if tc.t_max is not None else diffusion.t_max
        amp = tc.amp if device.type == "cuda" else "none"
        if tc.amp != "none" and device.type != "cuda":
            log.info("amp=%s requested but device is %s: training in float32", tc.amp, device)
        with torch.random.fork_rng(devices=[]):  # seeded initial weights, caller's RNG untouched
            torch.manual_seed(tc.seed)
            model = build_network(cfg.network, diffusion).to(device)
        ema = copy.deepcopy(model).requires_grad_(False)
        n_train = len(train_dataset)
        trainer = cls(
            cfg=cfg, out_dir=out_dir, device=device, diffusion=diffusion, model=model, ema=ema,
            opt=torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.betas,
                                  weight_decay=tc.weight_decay),
            scaler=torch.amp.GradScaler("cuda", enabled=(amp == "fp16")),
            sampler=BatchSampler(n_train, tc.batch_size, tc.seed), train_dataset=train_dataset,
            val=(ValidationSet.build(val_dataset, tc.val_size, tc.t_eps, t_max, tc.seed)
                 if val_dataset is not None and len(val_dataset) > 0 else None),
            t_max=t_max, amp=amp, n_train=n_train, callback=callback)
        if resume and trainer.checkpoint.exists():
            trainer.load(trainer.checkpoint)
        trainer.metrics_path.write_text("".join(json.dumps(h) + "\n" for h in trainer.history))
        return trainer

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self) -> Path:
        """The training checkpoint ``out_dir/last.pt``, atomically."""
        return save_atomic({
            "format": CHECKPOINT_FORMAT, "kind": "training",
            "config": self.cfg.model_dump(mode="json"), "step": self.step,
            "model": self.model.state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict() if self.amp == "fp16" else {},
            "rng": _rng_state(self.device), "history": self.history, "n_train": self.n_train,
            "seconds": self.seconds,
        }, self.checkpoint)

    def load(self, path: Path) -> None:
        """Resume from a training checkpoint: weights, optimiser, RNG, step and history."""
        ckpt = read_checkpoint(path)  # on CPU: RNG states must stay CPU byte tensors
        _check_resume(self.cfg, ckpt["config"], self.n_train, int(ckpt["n_train"]))
        check_state_dict(self.model, ckpt["model"])
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"], self.device)
        self.step, self.history = int(ckpt["step"]), list(ckpt["history"])
        self.elapsed = float(ckpt.get("seconds", 0.0))
        self.resumed_from = self.step
        log.info("resumed from %s at step %d", path, self.step)

    # -- the loop ------------------------------------------------------------------------------
    def record(self, metrics: dict[str, float]) -> None:
        self.history.append(metrics)
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        if self.callback is not None:
            self.callback(int(metrics["step"]), metrics)

    def validate(self) -> tuple[float | None, float | None]:
        """Validation objective with EMA and raw weights, and the EMA eps-MSE (recorded)."""
        if self.val is None:
            return None, None
        args = (self.diffusion, self.cfg.training.batch_size, self.device, self.amp)
        v_ema, v_raw = self.val.loss(self.ema, *args), self.val.loss(self.model, *args)
        v_eps = self.val.loss(self.ema, *args, kind="eps")
        self.record({"step": self.step, "val_loss": v_ema, "val_loss_raw": v_raw,
                     "val_eps_mse": v_eps})
        return v_ema, v_raw

    def run(self, progress: bool = True) -> float:
        """Step until ``training.steps``: log every ``log_every``, validate every ``val_every``,
        checkpoint every ``checkpoint_every``; returns the last logged training loss."""
        tc = self.cfg.training
        self._t_start = time.perf_counter()
        self.model.train()
        window: list[Tensor] = []
        last_train = float("nan")
        bar = tqdm(total=tc.steps, initial=min(self.step, tc.steps), desc="train prior",
                   disable=None if progress else True, dynamic_ncols=True)
        t_log, steps_since_log = time.perf_counter(), 0
        # closed however the loop ends (an error included): its DataLoader workers stop with it
        with contextlib.closing(batch_stream(self.train_dataset, self.sampler, tc, self.t_max,
                                             self.step, self.device)) as batches:
            while self.step < tc.steps:
                batch = next(batches)
                lr = lr_at(tc, self.step)
                loss, grad_norm = train_step(self.model, self.ema, self.opt, self.scaler,
                                             self.diffusion, batch, tc, self.step, lr, self.amp)
                self.step += 1
                window.append(loss)
                steps_since_log += 1
                bar.update(1)
                step = self.step
                if step % tc.log_every == 0 or step == tc.steps:
                    now = time.perf_counter()
                    losses = torch.stack(window).float().cpu()  # one device sync per log interval
                    finite = torch.isfinite(losses)
                    if not finite.all() and self.amp != "fp16":  # fp16: the scaler skips overflows
                        raise FloatingPointError(f"non-finite training loss in steps "
                                                 f"{step - len(window) + 1}..{step}: {losses.tolist()}")
                    last_train = float(losses[finite].mean()) if finite.any() else float("nan")
                    self.record({"step": step, "loss": last_train, "lr": lr,
                                 "grad_norm": float(grad_norm),
                                 "steps_per_s": steps_since_log / max(now - t_log, 1e-9)})
                    bar.set_postfix(loss=f"{last_train:.4f}")
                    window, t_log, steps_since_log = [], now, 0
                if step % tc.val_every == 0 and step < tc.steps:
                    v_ema, _ = self.validate()
                    if v_ema is not None:
                        bar.set_postfix(loss=f"{last_train:.4f}", val=f"{v_ema:.4f}")
                if step % tc.checkpoint_every == 0 and step < tc.steps:
                    self.save()
        bar.close()
        if math.isnan(last_train):
            last_train = next((h["loss"] for h in reversed(self.history) if "loss" in h),
                              float("nan"))
        return last_train


def train_prior(cfg: PriorConfig, train_dataset: Any, val_dataset: Any | None, out_dir: str | Path,
                resume: bool = True, progress: bool = True,
                callback: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train (or resume training) the eps-prior; checkpoint to ``out_dir/last.pt``.

    ``train_dataset``/``val_dataset``: a tensor ``(N, C, *spatial)`` or a map-style dataset whose
    items are tensors/arrays ``(C, *spatial)`` or dicts with an ``"image"`` entry. Validation
    (EMA and raw weights, fixed noise) runs every ``val_every`` steps and at the end.
    ``callback(step, metrics)`` receives every logged metric dict (train: ``loss``, ``lr``,
    ``grad_norm``, ``steps_per_s``; validation: ``val_loss`` (objective, EMA weights),
    ``val_loss_raw`` (objective, raw weights), ``val_eps_mse`` (eps-MSE, EMA weights)).
    """
    trainer = Trainer.setup(cfg, train_dataset, val_dataset, out_dir, resume, callback)
    train_loss = trainer.run(progress)
    v_ema, v_raw = trainer.validate()
    trainer.save()
    return TrainResult(step=trainer.step, checkpoint=trainer.checkpoint, train_loss=train_loss,
                       val_loss=v_ema, val_loss_raw=v_raw, seconds=trainer.seconds,
                       n_params=count_parameters(trainer.model),
                       resumed_from=trainer.resumed_from, history=trainer.history)
