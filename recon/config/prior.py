"""The prior's schema: what defines a trained prior (network, diffusion, training, data).

Part of the config schema, below the prior it describes: ``recon.prior.network`` (building and
loading), ``recon.prior.training`` (fitting) and the pipeline's config (its ``data`` section shares
``SliceSource``) all import it; it names the diffusion models through ``recon.registry`` and
imports no torch itself. A ``PriorConfig``
is stored, as a JSON dict, in every checkpoint.

    cfg = load_prior_config("configs/prior_64.yaml")
    diffusion = cfg.diffusion.build()          # VPCosine(c=0.008, t_max=0.999)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from recon.registry import DIFFUSIONS
from recon.yaml_io import read_yaml


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not match the prior's config."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NetworkConfig(_Strict):
    """Arguments of MONAI's ``DiffusionModelUNet`` plus the time scaling of ``EpsNetwork``."""

    spatial_dims: Literal[2, 3] = 2
    in_channels: int = Field(1, ge=1)
    out_channels: int = Field(1, ge=1)
    channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, False, False)
    num_res_blocks: int | tuple[int, ...] = 1
    norm_num_groups: int = Field(16, ge=1)
    num_head_channels: int | tuple[int, ...] = 32
    resblock_updown: bool = False
    mid_attention: bool = True
    """False: the UNet's middle block has no self-attention, so the network is fully
    convolutional (trained on patches, applied to any slice size)."""
    time_scale: float = Field(1000.0, gt=0)
    parameterization: Literal["eps", "v"] = "v"

    @model_validator(mode="after")
    def _check(self) -> NetworkConfig:
        if len(self.channels) != len(self.attention_levels):
            raise ValueError(f"channels {self.channels} and attention_levels "
                             f"{self.attention_levels} must have the same length")
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"channels {bad} are not multiples of norm_num_groups="
                             f"{self.norm_num_groups}")
        if self.in_channels != self.out_channels:
            raise ValueError("an eps-network needs out_channels == in_channels, got "
                             f"{self.out_channels} != {self.in_channels}")
        return self

    @property
    def downsampling(self) -> int:
        """Factor by which the UNet downsamples: image sizes must be multiples of it."""
        return 2 ** (len(self.channels) - 1)


class DiffusionConfig(_Strict):
    """A forward model from ``recon.registry.DIFFUSIONS`` and its keyword arguments."""

    name: str = "vp_cosine"
    params: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> DiffusionConfig:
        if self.name not in DIFFUSIONS:
            raise ValueError(f"unknown diffusion {self.name!r}; choose one of {sorted(DIFFUSIONS)}")
        return self

    def build(self) -> Any:
        """The forward model named here (a ``recon.sampling.diffusion.DiffusionModel``)."""
        return DIFFUSIONS[self.name](**self.params)


class TrainingConfig(_Strict):
    """Optimisation, noise-level sampling, EMA, augmentation, logging and checkpointing."""

    steps: int = Field(2000, ge=1, le=10_000_000, strict=True)
    batch_size: int = Field(16, ge=1, le=4096, strict=True)
    lr: float = Field(2e-4, gt=0, le=1.0)
    weight_decay: float = Field(0.0, ge=0, le=1.0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(100, ge=0, le=10_000_000, strict=True)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0, le=1e6)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_warmup: bool = True
    t_eps: float = Field(1e-3, gt=0, lt=1)
    t_max: float | None = None
    flip_prob: float = Field(0.0, ge=0, le=1)
    flip_dims: tuple[int, ...] = (-1,)
    amp: Literal["none", "bf16", "fp16"] = "bf16"
    device: str = "auto"
    seed: int = Field(0, ge=0, lt=2**31)
    log_every: int = Field(10, ge=1, le=10_000_000, strict=True)
    val_every: int = Field(250, ge=1, le=10_000_000, strict=True)
    val_size: int = Field(64, ge=1, le=4096, strict=True)
    checkpoint_every: int = Field(250, ge=1, le=10_000_000, strict=True)
    loader_workers: int = Field(0, ge=0, le=64, strict=True, description="DataLoader worker "
                                "processes making the batches (crops, augmentation) ahead of "
                                "the optimiser; 0: in the training process. The batches are "
                                "the same either way (each is a function of its step)")


class SliceSource(_Strict):
    """Which manifest the slices come from and how they are cut: shared by the prior's
    ``data`` (training) and the pipeline's ``data`` section (``recon.config.DataConfig``)."""

    manifest: Path = Path("data_manifests/public_brain.yaml")
    image_size: int | None = Field(64, ge=8, le=1024, description="slices are resized to "
                                   "image_size^2; null: the native in-plane grid, untouched")
    normalise: Literal["percentile", "foreground"] = Field(
        "percentile", description="intensity scaling (recon.data.slicing.SliceConfig)")
    axis: Literal[0, 1, 2] = Field(2, description="slicing axis of the (RAS-oriented) volume")
    train_split: str = "train"
    val_split: str = "val"
    cache_dir: Path | None = Field(None, description="preprocessed-slice cache")


class PriorDataConfig(SliceSource):
    """The prior's training data (``recon.data.loading``).

    ``loader`` holds further ``SliceConfig`` options (``lower``, ``upper``, ``min_foreground``,
    ``foreground_level``); ``heldout_ids`` restricts the slices shipped for the quality tests
    to those volumes of ``heldout_split`` (``None``: all of them).
    """

    cache_dir: Path | None = Path("work/cache")
    patch_size: int | None = Field(None, ge=8, le=1024, description="train on random crops "
                                   "of this size (needs a fully convolutional network)")
    augment: bool = Field(False, description="MONAI augmentation of the training crops")
    synthetic: float = Field(0.0, ge=0.0, le=1.0, description="fraction of training crops "
                             "cut from domain-randomised slices (random tissue contrast, "
                             "elastic deformation, bias field, Gibbs ringing, Rician noise; "
                             "recon.data.patches)")
    heldout_split: str = "test"
    heldout_ids: list[str] | None = None
    loader: dict[str, Any] = Field(default_factory=dict)


class PriorConfig(_Strict):
    """Everything that defines a trained prior; stored (as a dict) in every checkpoint."""

    network: NetworkConfig = Field(default_factory=NetworkConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    data: PriorDataConfig = Field(default_factory=PriorDataConfig)

    @property
    def train_size(self) -> int:
        """The spatial size the network is trained at: the patch, else the slice size."""
        return int(self.data.patch_size or self.data.image_size)

    @model_validator(mode="after")
    def _check(self) -> PriorConfig:
        if self.data.patch_size is None and self.data.image_size is None:
            raise ValueError("data.image_size null (native slices) needs data.patch_size")
        if self.data.patch_size is not None and self.network.mid_attention:
            raise ValueError("data.patch_size (training on crops) needs a fully convolutional "
                             "network: set network.mid_attention: false")
        if self.train_size % self.network.downsampling:
            raise ValueError(f"the training size {self.train_size} must be a multiple of "
                             f"{self.network.downsampling} for network.channels "
                             f"{self.network.channels}")
        t_max = self.diffusion.build().t_max
        if self.training.t_max is not None and self.training.t_max > t_max:
            raise ValueError(f"training.t_max={self.training.t_max} exceeds the diffusion's "
                             f"t_max={t_max}")
        if self.training.t_eps >= (self.training.t_max or t_max):
            raise ValueError("training.t_eps must be below t_max")
        return self


def load_prior_config(path: str | Path) -> PriorConfig:
    """Read and validate a prior config from YAML."""
    raw = read_yaml(path, "prior config") or {}
    return PriorConfig.model_validate(raw)
