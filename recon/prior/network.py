r"""The prior network: MONAI's ``DiffusionModelUNet`` as an eps-predictor ``eps_theta(x_t, t)``.

The core calls ``network(x_t, t)`` with ``x_t = s(t) x0 + sigma(t) eps`` and continuous time
``t`` in ``[0, 1]`` of shape ``(B,)``; the network returns ``eps_hat`` of the input's shape, so
Tweedie's estimate is ``x0_hat = (x_t - sigma eps_hat) / s`` (``DiffusionModel.eps_to_x0``).

Time embedding. ``DiffusionModelUNet`` embeds its ``timesteps`` with the sinusoidal embedding of
Ho et al. (``get_timestep_embedding``): ``[cos(tau w_k), sin(tau w_k)]`` with
``w_k = 10000^{-k/half}``, ``k = 0 .. half - 1``, ``half = channels[0] / 2``. It casts ``tau`` to
float, so fractional steps are fine. The frequencies are tuned for DDPM's integer steps
``tau in {0, ..., 999}``: the fastest one turns 1 rad per step. ``EpsNetwork`` therefore passes
``tau = time_scale * t`` with ``time_scale = 1000`` by default, which keeps adjacent grid times
distinguishable at the fastest frequency and the slowest frequency well below one turn.

Output parameterisation. The core always sees eps. With ``parameterization: v`` (the shipped
prior) the UNet ``F`` predicts ``v = s eps - sigma x0`` (Salimans & Ho 2022; VP: ``s^2 +
sigma^2 = 1``, general models are first normalised by ``r = sqrt(s^2 + sigma^2)``) and the
wrapper returns

    eps_hat = s F(x_t, t) + sigma x_t,    so    x0_hat = s x_t - sigma F.

Why: with a plain eps-UNet, ``x0_hat = (x_t - sigma eps_hat)/s`` multiplies the network's error
by ``sigma/s``, about 600 at the cosine schedule's ``t_max = 0.999``; a measured eps error of
0.05 RMS there gave Tweedie estimates of +-400 and samplers that never recovered. In the v form
the error of ``x0_hat`` is ``sigma`` times the UNet's error at every ``t``, and eps at high noise
(``~ x_t``) is exact by construction. ``parameterization: eps`` gives the plain eps-UNet.

Intensity units. The prior models slices in the loader's units (``[0, 1]``, background 0), not
a shifted ``[-1, 1]`` range, so ``x0`` of the core *is* the image and measurement operators act
on it directly.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet
from pydantic import ValidationError
from torch import Tensor, nn

from recon.config.prior import CheckpointError, DiffusionConfig, NetworkConfig, PriorConfig
from recon.sampling.diffusion import DiffusionModel

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "EpsNetwork", "build_network",
           "check_state_dict", "count_parameters", "load_prior", "read_checkpoint",
           "resolve_device"]

CHECKPOINT_FORMAT = "recon.prior/v1"
"""Tag stored in every prior checkpoint (training and shipped)."""


# -- the wrapper -------------------------------------------------------------------------------
class EpsNetwork(nn.Module):
    """``eps_theta(x_t, t)`` with continuous ``t`` in ``[0, 1]``; the UNet sees ``time_scale * t``.

    ``t`` may be a scalar or of shape ``(B,)``; the output has the input's shape and dtype (the
    UNet computes in its weights' dtype, or under the caller's autocast). With
    ``parameterization="v"`` the UNet predicts ``v`` and ``diffusion`` (which supplies ``s`` and
    ``sigma``) is required.
    """

    def __init__(self, cfg: NetworkConfig, diffusion: DiffusionModel | None = None):
        super().__init__()
        if cfg.parameterization == "v" and diffusion is None:
            raise ValueError("parameterization 'v' needs the diffusion model (for s(t), sigma(t))")
        self.cfg = cfg
        self.diffusion = diffusion
        self.time_scale = float(cfg.time_scale)
        self.unet = DiffusionModelUNet(
            spatial_dims=cfg.spatial_dims,
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            channels=cfg.channels,
            attention_levels=cfg.attention_levels,
            num_res_blocks=cfg.num_res_blocks,
            norm_num_groups=cfg.norm_num_groups,
            num_head_channels=cfg.num_head_channels,
            resblock_updown=cfg.resblock_updown,
        )
        if not cfg.mid_attention:  # fully convolutional: resnet -> resnet in the middle
            self.unet.middle_block.attention = nn.Identity()

    def _times(self, t: Tensor, x_t: Tensor) -> Tensor:
        """``t`` as float32 of shape ``(B,)`` on ``x_t``'s device, with input checks."""
        expected = 2 + self.cfg.spatial_dims
        if x_t.ndim != expected or x_t.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected x_t of shape (B, {self.cfg.in_channels}, *spatial) with "
                             f"{self.cfg.spatial_dims} spatial dims, got {tuple(x_t.shape)}")
        batch = x_t.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or of shape ({batch},), got {tuple(t.shape)}")
        return t

    def timesteps(self, t: Tensor) -> Tensor:
        """The UNet's timestep input ``time_scale * t``."""
        return self.time_scale * t

    def _coefficients(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(s/r, sigma/r, r)`` with ``r = sqrt(s^2 + sigma^2)`` (1 for VP), in float64 then
        cast to ``x``'s dtype, shaped to broadcast over ``x``."""
        t64 = t.double()
        s, sigma = self.diffusion.s(t64), self.diffusion.sigma(t64)
        r = torch.sqrt(s * s + sigma * sigma)
        shape = (-1, *([1] * (x.ndim - 1)))
        return tuple(c.to(x.dtype).reshape(shape) for c in (s / r, sigma / r, r))

    def raw(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The UNet's own prediction ``F(x_t, t)`` (eps or v, per ``cfg.parameterization``).

        Any spatial size: inputs are padded (reflect, replicate when too small) up to a
        multiple of ``cfg.downsampling`` and the output cropped back."""
        t = self._times(t, x_t)
        dtype = self.unet.conv_in.conv.weight.dtype  # e.g. float64 inputs to float32 weights
        size = x_t.shape[2:]
        k = self.cfg.downsampling
        pad = [p for n in reversed(size) for p in (0, -n % k)]
        x = x_t.to(dtype)
        if any(pad):
            mode = "reflect" if all(n > -n % k for n in size) else "replicate"
            x = torch.nn.functional.pad(x, pad, mode=mode)
        out = self.unet(x, self.timesteps(t))
        if any(pad):
            out = out[(..., *(slice(0, n) for n in size))]
        return out.to(x_t.dtype)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What ``raw`` is trained to predict: ``eps``, or ``v = s eps - sigma x0`` (normalised)."""
        if self.cfg.parameterization == "eps":
            return eps
        s, sigma, _ = self._coefficients(self._times(t, x0), x0)
        return s * eps - sigma * x0

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        out = self.raw(x_t, t)
        if self.cfg.parameterization == "eps":
            return out
        s, sigma, r = self._coefficients(self._times(t, x_t), x_t)
        return s * out + sigma * (x_t / r)


def build_network(cfg: NetworkConfig | dict, diffusion: DiffusionModel | None = None) -> EpsNetwork:
    """An untrained ``EpsNetwork`` for ``cfg`` (a ``NetworkConfig`` or its dict); ``diffusion``
    is required for ``parameterization="v"``."""
    if not isinstance(cfg, NetworkConfig):
        cfg = NetworkConfig.model_validate(cfg)
    return EpsNetwork(cfg, diffusion)


class PerChannel(nn.Module):
    """A one-channel prior on each channel of ``(B, C, *spatial)`` images, as ``B C`` images of
    one channel (e.g. the real and imaginary parts of a complex image:
    ``recon.operators.complex_image.RealImag``)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        b, c = x_t.shape[:2]
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 1:
            t = t.repeat_interleave(c)
        return self.network(x_t.reshape(b * c, 1, *x_t.shape[2:]), t).reshape(x_t.shape)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in module.parameters())


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU that supports it, a CPU with
    AVX512-BF16 or AMX (through oneDNN). Elsewhere bf16 is emulated, slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(getattr(torch.cpu, check, lambda: False)()
                   for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def resolve_precision(device: torch.device | str, precision: str) -> str:
    """``precision`` with ``auto`` made ``bf16`` where ``device`` computes it natively
    (``native_bf16``), else ``fp32``."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The network's forward passes in ``precision`` on ``device``: ``bf16`` / ``fp16``
    autocast (matrix products and convolutions; FFTs, norms and the samplers' arithmetic stay
    float32), ``fp32`` / ``none`` as they are; ``auto``: ``bf16`` where the device computes it
    natively (``native_bf16``), else ``fp32``."""
    precision = resolve_precision(device, precision)
    if precision in ("fp32", "none"):
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type,
                          dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# -- checkpoints -------------------------------------------------------------------------------
def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with clear errors for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle, zip and torch errors all mean "unreadable"
        raise CheckpointError(f"could not read checkpoint {path} (corrupt, truncated or not a "
                              f"weights-only torch file): {type(err).__name__}: {err}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        fmt = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a prior checkpoint (format {fmt!r}, expected "
                              f"{CHECKPOINT_FORMAT!r})")
    return ckpt


def check_state_dict(module: nn.Module, state: dict[str, Tensor], what: str = "checkpoint") -> None:
    """Raise ``CheckpointError`` naming missing/unexpected keys and shape mismatches."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: {what} {tuple(state[k].shape)} vs network {tuple(v.shape)}"
              for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:

        def fmt(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {fmt(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {fmt(shapes)}")
        raise CheckpointError(f"the {what} weights do not match the network config: "
                              + "; ".join(parts))


def load_prior(checkpoint_path: str | Path, device: str | torch.device = "auto",
               network_cfg: NetworkConfig | dict | None = None,
               diffusion_cfg: DiffusionConfig | None = None, weights: str = "ema"):
    """Load a trained prior: ``(network, diffusion, cfg)``.

    The network is rebuilt from the config stored in the checkpoint (or from ``network_cfg``
    when given, which must then match the weights), loaded with the EMA weights
    (``weights="ema"``; ``"model"`` takes the raw weights of a training checkpoint), cast to
    float32, put in eval mode on ``device`` with ``requires_grad=False`` (gradients w.r.t.
    ``x_t`` still flow). With ``diffusion_cfg`` the checkpoint's diffusion must equal it.
    ``cfg`` is the checkpoint's ``PriorConfig``. Raises ``CheckpointError`` (a ``ValueError``)
    when the file is missing/corrupt or the weights do not fit the config.
    """
    ckpt = read_checkpoint(checkpoint_path)
    try:
        cfg = PriorConfig.model_validate(ckpt["config"])
        if network_cfg is not None:
            cfg = cfg.model_copy(update={"network": NetworkConfig.model_validate(network_cfg)})
    except (KeyError, ValidationError) as err:
        raise CheckpointError(f"{checkpoint_path}: invalid or missing config: {err}") from err
    if diffusion_cfg is not None and cfg.diffusion != diffusion_cfg:
        raise CheckpointError(f"checkpoint {checkpoint_path} was trained with diffusion "
                              f"{cfg.diffusion.model_dump()}, but the prior config says "
                              f"{diffusion_cfg.model_dump()}")
    if weights not in ckpt:
        raise CheckpointError(f"{checkpoint_path} has no {weights!r} weights "
                              f"(it has {sorted(k for k in ckpt if isinstance(ckpt[k], dict))})")
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt[weights].items()}
    diffusion = cfg.diffusion.build()
    network = build_network(cfg.network, diffusion)
    check_state_dict(network, state, what=f"checkpoint {Path(checkpoint_path).name!r}")
    network.load_state_dict(state)
    network.to(resolve_device(device)).eval().requires_grad_(False)
    return network, diffusion, cfg
