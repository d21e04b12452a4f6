"""The project's configuration: one validated pydantic (v2) schema for data, prior, training,
reconstruction (sampler and classical baselines), method comparison and tracking.

    cfg = load_config("configs/demo.yaml", ["reconstruct.steps=32", "reconstruct.operators=[fourier]"])
    cfg.reconstruct.integrator.name      # "heun"
    cfg.resolved()                       # flat {"reconstruct.steps": 32, ...} for MLflow params

Every section forbids unknown keys (a typo is an error, never silently ignored). Names of
operators, guidances, integrators, timers and diffusions are checked against the registries of
the library, and the error lists the valid ones. Relative paths are resolved against ``base_dir``
(the current directory by default), so the resolved config is self-contained.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from recon.prior_config import CheckpointError, PriorConfig, SliceSource, load_prior_config
from recon.registry import BASELINES, GUIDANCES, INTEGRATORS, OPERATORS, TIMERS
from recon.yaml_io import YamlError, parse_yaml, read_yaml

if TYPE_CHECKING:  # the components themselves are imported only when built
    from recon.baselines import Baseline
    from recon.guidance import Guidance
    from recon.integrator import Integrator
    from recon.operators import Operator
    from recon.timer import Timer

NOMINAL_NATIVE = 256
"""Slice size the operators are trial-built at when ``data.image_size`` is null (native)."""


class ConfigError(ValueError):
    """An invalid configuration file, value or override; the message names the field."""


_BUILD_COMPONENTS: ContextVar[bool] = ContextVar("build_components", default=True)
"""False while ``fields_only``: components are checked by name, not imported and built."""


@contextmanager
def fields_only():
    """Validate fields, names and ranges only: no component is imported or trial-built (so
    neither torch nor sigpy is imported). ``validate_config`` runs this pass first."""
    token = _BUILD_COMPONENTS.set(False)
    try:
        yield
    finally:
        _BUILD_COMPONENTS.reset(token)


def _check_name(kind: str, name: str, valid: Iterable[str]) -> str:
    valid = sorted(valid)
    if name not in valid:
        raise ValueError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(valid)}")
    return name


def _named(value: Any) -> Any:
    """Allow the short form ``heun`` for ``{name: heun}``."""
    return {"name": value} if isinstance(value, str) else value


def _named_list(value: Any) -> Any:
    """A list of components from one item or a list, each in short form or not."""
    if isinstance(value, str | dict):
        value = [value]
    return [_named(o) for o in value] if isinstance(value, list) else value


def _check_params(kind: str, name: str, cls: type, params: Mapping[str, Any],
                  reserved: tuple[str, ...] = ()) -> None:
    """Unknown keyword arguments of ``cls`` -> error listing the accepted ones."""
    try:
        sig = inspect.signature(cls.__init__ if inspect.isclass(cls) else cls)
    except (TypeError, ValueError):  # builtins without a signature: nothing to check
        return
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    accepted = [n for n, p in sig.parameters.items()
                if n != "self" and n not in reserved and p.kind is not p.VAR_POSITIONAL]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for {kind} {name!r}; accepted: "
                         f"{accepted or 'none'}")


def _try_build(kind: str, name: str, build: Callable[[], Any]) -> None:
    """Construct the object once (cheap) so that bad values fail at load time."""
    try:
        build()
    except (TypeError, ValueError) as err:
        raise ValueError(f"bad parameters for {kind} {name!r}: {err}") from None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# -- data -------------------------------------------------------------------------------------
class DataConfig(SliceSource, _Section):
    """Where the volumes are and how slices are cut from them (the manifest, slicing and split
    fields are the prior's, ``recon.prior_config.SliceSource``; the pipeline's defaults are the
    native prior's: the native grid, foreground normalisation)."""

    image_size: int | None = Field(None, ge=8, le=1024, description="slices are resized to "
                                   "image_size^2; null: the native in-plane grid, untouched")
    normalise: Literal["percentile", "foreground"] = Field(
        "foreground", description="intensity scaling: head median -> 0.5 (the native prior's) "
        "or percentile (0.5/99.5 -> [0, 1], prior_64's)")
    data_root: Path = Path("data/public")
    materialise: bool = Field(True, description="materialise the offline public data when missing")
    test_split: str = "test"
    max_slices: int | None = Field(None, ge=1, le=4096, strict=True,
                                   description="central slices kept per test volume (None: all)")
    volumes: list[str] | None = Field(None, description="ids of the test volumes to reconstruct "
                                      "(None: every volume of test_split)")
    max_volumes: int | None = Field(None, ge=1, le=100_000, strict=True,
                                    description="test volumes reconstructed (None: all)")


# -- prior and training -----------------------------------------------------------------------
class PriorSection(_Section):
    """The trained prior used for reconstruction."""

    checkpoint: Path = Path("checkpoints/prior_native.pt")
    config: Path | None = Field(Path("configs/prior_native.yaml"),
                                description="network/diffusion config the checkpoint must match")
    weights: Literal["ema", "model"] = "ema"

    def expected(self) -> PriorConfig | None:
        """The prior config the checkpoint must match (``None`` when ``config`` is unset)."""
        if self.config is None:
            return None
        try:
            return load_prior_config(self.config)
        except FileNotFoundError:
            raise CheckpointError(f"prior config not found: {self.config}") from None
        except ValueError as err:
            raise CheckpointError(f"invalid prior config {self.config}: {err}") from None


class TrainSection(_Section):
    """Training the prior (``recon.training.train_prior``); disabled: the shipped checkpoint."""

    enabled: bool = False
    steps: int | None = Field(None, ge=1, le=10_000_000, strict=True,
                              description="override the prior config's steps")
    batch_size: int | None = Field(None, ge=1, le=4096, strict=True)
    lr: float | None = Field(None, gt=0, le=1.0)
    resume: bool = True
    skip_if_matching: bool = Field(True, description="skip training when the checkpoint already "
                                                     "holds weights trained with this config")


# -- reconstruction ---------------------------------------------------------------------------
class _Component(_Section):
    """A library object named from its registry, plus its keyword arguments: an unknown name
    lists the valid ones; unknown or bad parameters fail at load time."""

    KIND: ClassVar[str]
    REGISTRY: ClassVar[Mapping[str, Callable[..., Any]]]
    RESERVED: ClassVar[tuple[str, ...]] = ()
    """Arguments the library fills in, never the user."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(cls.KIND, v, cls.REGISTRY)

    @model_validator(mode="after")
    def _params(self) -> _Component:
        if not _BUILD_COMPONENTS.get():
            return self
        _check_params(self.KIND, self.name, self.REGISTRY[self.name], self.params,
                      reserved=self.RESERVED)
        _try_build(self.KIND, self.name, self._trial)
        return self

    def _trial(self) -> Any:
        """One throwaway instance, so that bad values fail at load time."""
        return self.build()

    def build(self, **given: Any) -> Any:
        """The object: ``REGISTRY[name](**params, **given)`` (``given``: the reserved
        arguments the library fills in). The name and params were checked on load."""
        return self.REGISTRY[self.name](**self.params, **given)


class OperatorConfig(_Component):
    """A measurement operator: ``mask``, ``blur`` or ``fourier`` plus its keyword arguments
    (e.g. ``{keep: 0.5}``, ``{sigma: 1.5}``, ``{acceleration: 4, center_fraction: 0.08}``);
    ``guidance`` overrides the reconstruction's guidance for this operator; ``lam`` gives the
    classical baselines' ``lam`` for it (``{tv: 3.2e-3}``), used where a baseline or warm start
    says ``lam: null`` instead of choosing it on the validation split."""

    KIND = "operator"
    REGISTRY = OPERATORS
    RESERVED = ("shape", "sigma_y", "seed")

    guidance: GuidanceConfig | None = None
    lam: dict[str, float] = Field(default_factory=dict, description="baseline name -> lam for "
                                  "this operator (e.g. chosen once on the public validation "
                                  "split); missing: chosen on data.val_split when needed")

    @field_validator("lam")
    @classmethod
    def _lam(cls, v: dict[str, float]) -> dict[str, float]:
        for name, lam in v.items():
            _check_name("baseline", name, BASELINES)
            if not (lam >= 0 and lam < float("inf")):
                raise ValueError(f"lam of {name} must be a finite number >= 0, got {lam}")
        return v

    @field_validator("guidance", mode="before")
    @classmethod
    def _short_guidance(cls, v: Any) -> Any:
        return _named(v)

    def _trial(self) -> None:
        """Nothing here: building needs the slice size and sigma_y (``Config._cross`` does it)."""

    def build(self, shape: tuple[int, int], sigma_y: float, seed: int = 0) -> Operator:
        """The operator for slices of ``shape``; its mask/kernel drawn from ``seed``."""
        return self.REGISTRY[self.name](tuple(int(n) for n in shape), **self.params,
                                        sigma_y=sigma_y, seed=seed)


def _label(name: str, params: Mapping[str, Any]) -> str:
    """``ddim`` or ``ddim(eta=1.0)``: short and unique per setting."""
    if not params:
        return name
    return name + "(" + ",".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in sorted(params.items())) + ")"


class GuidanceConfig(_Component):
    """Posterior guidance from ``recon.registry.GUIDANCES`` and its keyword arguments."""

    KIND = "guidance"
    REGISTRY = GUIDANCES

    name: str = "data_consistency"

    def build(self) -> Guidance:
        return super().build()

    @property
    def label(self) -> str:
        return _label(self.name, self.params)


class BaselineConfig(_Component):
    """A classical reconstruction from ``recon.registry.BASELINES`` (``tv``, ``l1_wavelet``)
    and its keyword arguments: ``lam`` (null: chosen on the validation split for each
    operator, ``recon.reconstruction.tune_baseline``) and ``iterations``."""

    KIND = "baseline"
    REGISTRY = BASELINES
    RESERVED = ("operator",)

    def _trial(self) -> Any:
        return self.build(OPERATORS["mask"]((8, 8), keep=0.5, sigma_y=0.01, seed=0))

    def build(self, operator: Operator) -> Baseline:
        """The baseline for this operator."""
        return self.REGISTRY[self.name](operator, **self.params)

    @property
    def lam(self) -> float | None:
        return self.params.get("lam")

    @property
    def iterations(self) -> int:
        return self.params.get("iterations") or self.REGISTRY[self.name].iterations

    @property
    def label(self) -> str:
        return _label(self.name, self.params)


class IntegratorConfig(_Component):
    """An integrator from ``recon.registry.INTEGRATORS`` and its keyword arguments."""

    KIND = "integrator"
    REGISTRY = INTEGRATORS

    name: str = "heun"

    def build(self) -> Integrator:
        return super().build()

    @property
    def label(self) -> str:
        """``ddim`` or ``ddim(eta=1.0)``: short and unique per setting."""
        return _label(self.name, self.params)


class TimerConfig(_Component):
    """A time grid from ``recon.registry.TIMERS``; ``steps`` comes from ``reconstruct.steps``."""

    KIND = "timer"
    REGISTRY = TIMERS
    RESERVED = ("steps",)

    name: str = "cosine"
    params: dict[str, Any] = Field(default_factory=lambda: {"t_min": 1e-3})

    def _trial(self) -> Any:
        return self.build(1)

    def build(self, steps: int, t_max: float | None = None) -> Timer:
        """The time grid of ``steps`` steps (from ``t_max`` when given: a warm start)."""
        params = self.params if t_max is None else {**self.params, "t_max": t_max}
        return self.REGISTRY[self.name](steps, **params)


class WarmStartConfig(_Section):
    """Start the sampler near a classical answer (CCDF, Chung et al. 2022): the ``baseline``'s
    solution of the same y (``lam`` null: chosen on the validation split), noised to ``t0``;
    ``reconstruct.steps`` then run from ``t0`` down to the timer's ``t_min``."""

    baseline: BaselineConfig = Field(default_factory=lambda: BaselineConfig(name="tv"))
    t0: float = Field(0.4, gt=0.0, lt=1.0, description="diffusion time the chains start at")

    @field_validator("baseline", mode="before")
    @classmethod
    def _short(cls, v: Any) -> Any:
        return _named(v)

    @property
    def label(self) -> str:
        """``warm tv t0=0.2`` (its lam is in the run's parameters)."""
        return f"warm {self.baseline.name} t0={self.t0:g}"

    def for_operator(self, op: OperatorConfig) -> WarmStartConfig:
        """This warm start with the operator's ``lam`` where its own is null."""
        b = self.baseline
        if b.lam is not None or b.name not in op.lam:
            return self
        return self.model_copy(update={"baseline": b.model_copy(
            update={"params": {**b.params, "lam": op.lam[b.name]}})})


def _default_operators() -> list[OperatorConfig]:
    """Mask 30 %, blur 2 px and 4x Cartesian k-space, each with the TV weight inside its data
    consistency and the baselines' lam chosen on the public validation split (sigma_y 0.01;
    README, "Choosing the sampler")."""
    def op(name: str, params: dict, tv: float, lam: dict[str, float]) -> OperatorConfig:
        return OperatorConfig(name=name, params=params, lam=lam, guidance=GuidanceConfig(
            name="data_consistency", params={"tv": tv}))

    return [op("mask", {"kind": "random", "keep": 0.3}, 1e-3, {"tv": 1e-2, "l1_wavelet": 1e-2}),
            op("blur", {"sigma": 2.0}, 1e-4, {"tv": 3.2e-4, "l1_wavelet": 1e-3}),
            op("fourier", {"acceleration": 4, "center_fraction": 0.08, "kind": "random"}, 1e-3,
               {"tv": 3.2e-3, "l1_wavelet": 3.2e-4})]


class ReconstructSection(_Section):
    """Posterior sampling of every test volume, slice-batched, for each operator. The defaults
    are the sampler chosen on the validation split: DiffPIR's full re-noising, data consistency
    with a little TV, a warm start from TV noised to t0 = 0.2, 29 steps (30 NFE)."""

    operators: list[OperatorConfig] = Field(default_factory=_default_operators, min_length=1,
                                            max_length=64)
    sigma_y: float = Field(0.01, ge=0, le=100.0,
                           description="measurement noise std (image units [0, 1])")
    guidance: GuidanceConfig = Field(default_factory=GuidanceConfig)
    integrator: IntegratorConfig = Field(
        default_factory=lambda: IntegratorConfig(name="diffpir", params={"zeta": 1.0}))
    timer: TimerConfig = Field(default_factory=TimerConfig)
    x0_range: tuple[float, float] | None = Field(
        (0.0, 1.5), description="keep every guided x0 estimate finite and inside [lo, hi] (image "
        "units); e.g. [0, 1.5] for foreground-normalised slices. null: no guard")
    steps: int = Field(29, ge=1, le=10_000, strict=True)
    warm_start: WarmStartConfig | None = Field(
        default_factory=lambda: WarmStartConfig(t0=0.2),
        description="start from a classical solution noised to t0 (null: from noise)")
    baselines: list[BaselineConfig] = Field(
        default_factory=lambda: [BaselineConfig(name="tv"), BaselineConfig(name="l1_wavelet")],
        max_length=64, description="classical reconstructions of the same "
        "y, rows of the same tables (e.g. [tv, l1_wavelet]); lam null: chosen on the validation "
        "split")
    tune_slices: int = Field(2, ge=1, le=64, strict=True, description="central slices per validation volume "
                             "on which a baseline's lam is chosen")
    tune_volumes: int | None = Field(None, ge=1, le=1000, strict=True,
                                     description="validation volumes used to choose "
                                     "lam (None: every T1-weighted one of data.val_split)")
    n_samples: int = Field(4, ge=1, le=64, strict=True,
                           description="posterior samples per slice (mean, std)")
    batch_size: int = Field(16, ge=1, le=1024, strict=True, description="slices per batch "
                            "(memory bound; n_samples x batch_size chains run at once)")
    slab_slices: int | None = Field(32, ge=1, le=100_000, strict=True, description="slices per "
                                    "slab, the unit of work the task runner spreads over workers "
                                    "and that a re-run skips once done (None: a volume per slab)")
    seed: int = Field(0, ge=0, le=2**63 - 1, strict=True, description="measurement and "
                      "sampler seed (below 2^63: torch generators take 64-bit seeds)")
    kspace_phase: Literal["lowres", "sense", "none"] = Field(
        "lowres", description="raw k-space: the image phase absorbed into the coil maps "
        "(recon.raw): of the calibration image, of a SENSE solution, or none")
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="the prior's forward passes: fp32, or bf16 autocast (a GPU's "
        "tensor cores; the samplers' arithmetic and data consistency stay float32)")
    num_threads: int | None = Field(None, ge=1, le=1024, strict=True,
                                    description="torch CPU threads (None: torch's "
                                    "default); 1 avoids oversubscription on shared CPUs")
    progress: bool = True

    @field_validator("operators", "baselines", mode="before")
    @classmethod
    def _short_lists(cls, v: Any) -> Any:
        return _named_list(v)

    @field_validator("guidance", "integrator", "timer", mode="before")
    @classmethod
    def _short(cls, v: Any) -> Any:
        return _named(v)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v == "auto" or v == "cpu" or v == "mps" or v == "cuda" or v.startswith("cuda:"):
            return v
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {v!r}")

    @field_validator("x0_range")
    @classmethod
    def _range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not v[0] < v[1]:
            raise ValueError(f"x0_range must be [lo, hi] with lo < hi, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _unique(self) -> ReconstructSection:
        names = [o.name for o in self.operators]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"operators listed more than once: {dup} (outputs are named by operator)")
        names = [b.name for b in self.baselines]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"baselines listed more than once: {dup} (outputs are named by method)")
        return self

    def guidance_for(self, op: OperatorConfig) -> GuidanceConfig:
        return op.guidance or self.guidance

    def family(self, op: OperatorConfig) -> str:
        """The sampler for ``op`` without its step count: ``dps ddim(eta=1.0)``."""
        warm = "" if self.warm_start is None else f" {self.warm_start.label}"
        return f"{self.guidance_for(op).label} {self.integrator.label}{warm}"

    def label(self, op: OperatorConfig) -> str:
        """The sampler for ``op``, as tables and run names show it: ``dps ddim(eta=1.0) x16``."""
        return f"{self.family(op)} x{self.steps}"


class MethodConfig(_Section):
    """One row of a comparison: the diffusion sampler of ``reconstruct`` with some of
    ``guidance`` / ``integrator`` / ``steps`` / ``warm_start`` / ``n_samples`` changed, or a
    classical ``baseline``. A field left out keeps ``reconstruct``'s value; ``warm_start: null``
    given explicitly starts from pure noise. Short forms: ``tv`` (a baseline name) and
    ``{baseline: l1_wavelet, ...}``."""

    baseline: BaselineConfig | None = None
    guidance: GuidanceConfig | None = None
    integrator: IntegratorConfig | None = None
    steps: int | None = Field(None, ge=1, le=10_000)
    warm_start: WarmStartConfig | None = None
    n_samples: int | None = Field(None, ge=1, le=64, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _short(cls, v: Any) -> Any:
        if isinstance(v, str):
            return {"baseline": {"name": v}} if v in BASELINES else {"guidance": {"name": v}}
        if isinstance(v, dict):
            v = {k: (_named(x) if k in ("baseline", "guidance", "integrator") else x)
                 for k, x in v.items()}
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> MethodConfig:
        if self.baseline is not None and (self.guidance or self.integrator or self.steps
                                          or self.warm_start or self.n_samples):
            raise ValueError("a method is either a baseline or a diffusion setting (guidance, "
                             "integrator, steps, warm_start, n_samples), not both")
        return self

    def setting(self, rs: ReconstructSection) -> ReconstructSection:
        """``reconstruct`` with this method's diffusion fields (unchanged for a baseline)."""
        update = {k: v for k, v in (("guidance", self.guidance), ("integrator", self.integrator),
                                    ("steps", self.steps), ("warm_start", self.warm_start),
                                    ("n_samples", self.n_samples)) if v is not None}
        if "warm_start" in self.model_fields_set:  # given, null included: no warm start
            update["warm_start"] = self.warm_start
        if self.guidance is not None:  # one guidance for every operator in the comparison
            update["operators"] = [o.model_copy(update={"guidance": None}) for o in rs.operators]
        return rs.model_copy(update=update)


class CompareSection(_Section):
    """Method comparison, same data, seed and measurement, one child run per method: the grid
    ``integrators`` x ``steps`` (with ``reconstruct.guidance``) followed by ``methods``."""

    integrators: list[IntegratorConfig] = Field(
        default_factory=lambda: [IntegratorConfig(name=n)
                                 for n in ("euler", "heun", "dpmpp2s", "ddim", "diffpir")],
        max_length=64)
    steps: list[int] = Field(default_factory=lambda: [8, 16, 32], min_length=1, max_length=64)
    methods: list[MethodConfig] = Field(
        default_factory=lambda: [MethodConfig(guidance=GuidanceConfig(name="dps"), steps=16),
                                 MethodConfig.model_validate("tv"),
                                 MethodConfig.model_validate("l1_wavelet")],
        max_length=64, description="further rows: diffusion settings and "
        "baselines, e.g. [{guidance: dps, steps: 16}, tv, l1_wavelet]")
    operator: str | None = Field("fourier", description="operator name (null: the first one)")
    max_volumes: int = Field(1, ge=1, le=100_000, strict=True)

    @field_validator("integrators", mode="before")
    @classmethod
    def _short(cls, v: Any) -> Any:
        return _named_list(v)

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if any(not 1 <= s <= 10_000 for s in v):
            raise ValueError(f"steps must be integers in [1, 10000], got {v}")
        return v

    @field_validator("operator")
    @classmethod
    def _operator(cls, v: str | None) -> str | None:
        return None if v is None else _check_name("operator", v, OPERATORS)

    @model_validator(mode="after")
    def _rows(self) -> CompareSection:
        if not self.integrators and not self.methods:
            raise ValueError("nothing to compare: give integrators or methods")
        return self

    def rows(self) -> list[MethodConfig]:
        """Every method compared: the integrator x steps grid, then ``methods``."""
        grid = [MethodConfig(integrator=i, steps=n) for i in self.integrators for n in self.steps]
        return grid + list(self.methods)


DASK_CLUSTER_CLASSES = frozenset({
    "distributed.LocalCluster", "dask.distributed.LocalCluster",
    *(f"dask_jobqueue.{n}Cluster" for n in ("SLURM", "PBS", "SGE", "LSF", "OAR", "HTCondor",
                                            "Moab")),
    "dask_kubernetes.KubeCluster", "dask_kubernetes.operator.KubeCluster",
    "dask_gateway.GatewayCluster", "coiled.Cluster",
    *(f"dask_cloudprovider.{m}" for m in ("aws.EC2Cluster", "aws.FargateCluster",
                                          "azure.AzureVMCluster", "gcp.GCPCluster")),
})
"""The cluster classes ``runner.cluster_class`` may name: a config value is imported and called,
so it may name a known Dask cluster class and nothing else (never, say, ``subprocess.Popen``)."""

DASK_ADDRESS = r"^(tcp|tls|ucx|ws|wss)://[A-Za-z0-9._\-\[\]:]+:[0-9]{1,5}$"


class RunnerSection(_Section):
    """Where the slabs of a reconstruction run (``pipelines.runners``): ``local`` = Prefect's
    thread pool in the flow's process (``workers`` at a time); ``dask`` = ``prefect-dask`` on a
    new local ``dask.distributed`` cluster (``workers`` processes x ``threads_per_worker``), on
    the running cluster at ``address``, or on one ``cluster_class`` makes (e.g.
    ``dask_jobqueue.SLURMCluster``) with ``cluster_kwargs``, scaled by ``adapt_kwargs``."""

    kind: Literal["local", "dask"] = "local"
    workers: int = Field(1, ge=1, le=1024, strict=True, description="slabs at once (local: "
                         "threads; dask: worker processes of a new local cluster)")
    threads_per_worker: int = Field(1, ge=1, le=256, strict=True,
                                    description="dask local cluster: threads per worker")
    address: str | None = Field(None, description="dask: scheduler of a running cluster, "
                                "e.g. tcp://scheduler:8786")
    cluster_class: str | None = Field(None, description="dask: import path of a cluster class, "
                                      "e.g. dask_jobqueue.SLURMCluster")
    cluster_kwargs: dict[str, Any] = Field(default_factory=dict)
    adapt_kwargs: dict[str, Any] = Field(default_factory=dict, description="dask: "
                                         "cluster.adapt(**adapt_kwargs), e.g. {minimum: 0, maximum: 8}")

    @field_validator("cluster_class")
    @classmethod
    def _known_cluster(cls, v: str | None) -> str | None:
        if v is not None and v not in DASK_CLUSTER_CLASSES:
            raise ValueError(f"{v!r} is not a known Dask cluster class (a config value is never "
                             f"imported and run unless it is one of: "
                             f"{', '.join(sorted(DASK_CLUSTER_CLASSES))}); for another cluster, "
                             f"start it yourself and give its scheduler as runner.address")
        return v

    @field_validator("address")
    @classmethod
    def _scheduler_address(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(DASK_ADDRESS, v):
            raise ValueError(f"{v!r} is not a Dask scheduler address such as "
                             f"tcp://scheduler:8786 (protocol tcp, tls, ucx, ws or wss; host; port)")
        return v

    @model_validator(mode="after")
    def _one_cluster(self) -> RunnerSection:
        if self.kind != "dask" and (self.address or self.cluster_class or self.cluster_kwargs
                                    or self.adapt_kwargs):
            raise ValueError("address, cluster_class, cluster_kwargs and adapt_kwargs need kind: dask")
        if self.address and (self.cluster_class or self.cluster_kwargs or self.adapt_kwargs):
            raise ValueError("give either address (a running cluster) or cluster_class/"
                             "cluster_kwargs/adapt_kwargs (a new one), not both")
        return self


class TrackingSection(_Section):
    """MLflow: ``uri`` None -> ``sqlite:///<work_dir>/mlflow.db`` unless MLFLOW_TRACKING_URI is set."""

    uri: str | None = None
    experiment: str = "recon"
    artifact_root: Path | None = Field(None, description="default <work_dir>/mlartifacts")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is not None and v.startswith("file:"):
            raise ValueError("file: tracking stores are refused by MLflow 3; use "
                             "sqlite:///path/to/mlflow.db or an http(s):// server")
        return v


class Config(_Section):
    """The whole project configuration."""

    name: str = "default"
    work_dir: Path = Field(Path("work"), description="outputs, caches, PREFECT_HOME, mlflow.db")
    data: DataConfig = Field(default_factory=DataConfig)
    prior: PriorSection = Field(default_factory=PriorSection)
    train: TrainSection = Field(default_factory=TrainSection)
    reconstruct: ReconstructSection = Field(default_factory=ReconstructSection)
    compare: CompareSection = Field(default_factory=CompareSection)
    runner: RunnerSection = Field(default_factory=RunnerSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    @model_validator(mode="after")
    def _cross(self) -> Config:
        if not _BUILD_COMPONENTS.get():
            return self
        size = (self.data.image_size or NOMINAL_NATIVE,) * 2  # native: trial-build at a common size
        for i, op in enumerate(self.reconstruct.operators):
            if op.name == "acquired":  # sampled as the raw k-space was: built from the data
                continue
            _try_build(f"reconstruct.operators.{i}: operator", op.name, lambda op=op: op.build(
                size, self.reconstruct.sigma_y, self.reconstruct.seed))
        return self

    # -- helpers --------------------------------------------------------------------------------
    def absolute(self, base_dir: str | Path | None = None) -> Config:
        """A copy with every relative path made absolute against ``base_dir`` (default: cwd)."""
        base = Path(base_dir or Path.cwd()).resolve()

        def fix(p: Path | None) -> Path | None:
            if p is None:
                return None
            p = Path(p).expanduser()
            return p if p.is_absolute() else (base / p).resolve()

        work = fix(self.work_dir)
        data = self.data.model_copy(update={
            "manifest": fix(self.data.manifest), "data_root": fix(self.data.data_root),
            "cache_dir": fix(self.data.cache_dir) or work / "cache"})
        prior = self.prior.model_copy(update={"checkpoint": fix(self.prior.checkpoint),
                                              "config": fix(self.prior.config)})
        tracking = self.tracking.model_copy(update={
            "artifact_root": fix(self.tracking.artifact_root) or work / "mlartifacts"})
        return self.model_copy(update={"work_dir": work, "data": data, "prior": prior,
                                       "tracking": tracking})

    @property
    def compare_operator(self) -> OperatorConfig:
        """The operator ``recon compare`` compares methods on: ``compare.operator``, else the
        first of ``reconstruct.operators``. Checked when a comparison runs, not on load, so a
        config whose operators are changed (``--set reconstruct.operators=[acquired]``) still
        reconstructs. ``ConfigError`` when it names an operator that is not reconstructed."""
        names = [o.name for o in self.reconstruct.operators]
        name = self.compare.operator or names[0]
        if name not in names:
            raise ConfigError(f"invalid config:\n  compare.operator: {name!r} is not among "
                              f"reconstruct.operators {names}")
        return next(o for o in self.reconstruct.operators if o.name == name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible nested dict (paths as strings)."""
        return json.loads(self.model_dump_json())

    def resolved(self) -> dict[str, Any]:
        """Flat ``{"section.key": value}`` of the whole config, for MLflow params."""
        return flatten(self.to_dict())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


OperatorConfig.model_rebuild()


# -- loading ----------------------------------------------------------------------------------
def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "l": [{"x": 2}]}`` -> ``{"a.b": 1, "l.0.x": 2}``; empty containers kept."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and any(isinstance(i, Mapping | list) for i in v):
            out.update(flatten({str(i): item for i, item in enumerate(v)}, key + "."))
        else:
            out[key] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"reconstruct.steps=32"`` -> ``(["reconstruct", "steps"], 32)``; values are YAML."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} must look like section.key=value "
                          f"(e.g. reconstruct.steps=32)")
    try:
        parsed = parse_yaml(value, "value") if value.strip() else ""
    except YamlError as err:
        raise ConfigError(f"override {key}=...: {err}") from None
    return key.split("."), parsed


def apply_override(data: dict[str, Any], path: list[str], value: Any,
                   defaults: Mapping[str, Any] | None = None) -> None:
    """Set ``data[path[0]][path[1]]... = value``; integer parts index lists. Sections missing
    from ``data`` are copied from ``defaults`` (the default config) on the way, and the short
    form ``heun`` becomes ``{name: heun}`` when a key below it is set."""
    node: Any = data
    if defaults is None:
        with fields_only():
            defaults = Config().to_dict()
    dflt: Any = defaults
    full = ".".join(path)
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {full}: {'.'.join(path[: i + 1])!r} needs a list "
                                  f"index < {len(node)}")
            key: Any = int(part)
            dflt = dflt[key] if isinstance(dflt, list) and key < len(dflt) else None
        elif isinstance(node, dict):
            key = part
            dflt = dflt.get(key) if isinstance(dflt, Mapping) else None
        else:
            raise ConfigError(f"override {full}: {'.'.join(path[:i])!r} is not a section")
        if last:
            node[key] = value
            return
        child = node[key] if isinstance(node, list) else node.get(key)
        if child is None:
            child = copy.deepcopy(dflt) if isinstance(dflt, dict | list) else {}
        elif isinstance(child, str) and not path[i + 1].isdigit():
            child = {"name": child}  # short form "heun" -> {name: heun}
            if not (isinstance(dflt, Mapping) and dflt.get("name") == child["name"]):
                dflt = {}  # another component than the default's: none of its params
        node[key] = child
        node = child


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not allowed: check the spelling)"
        given = e.get("input")
        shown = "" if e["type"] in ("extra_forbidden", "missing", "value_error") \
            or isinstance(given, dict) \
            else f" (got {given!r})"
        lines.append(f"  {loc}: {msg}{shown}" if loc else f"  {msg}{shown}")
    return "\n".join(lines)


def validate_config(data: Mapping[str, Any], base_dir: str | Path | None = None,
                    source: str = "config") -> Config:
    """Validate a nested dict; raise ``ConfigError`` listing every bad field. Two passes: the
    fields, names and ranges first (nothing imported: a bad value is refused at once), then
    every component's parameters, by building each once (this imports torch)."""
    try:
        with fields_only():
            Config.model_validate(dict(data))
        cfg = Config.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(f"invalid {source}:\n{_format_errors(err)}") from None
    return cfg.absolute(base_dir)


def load_config(path: str | Path | None = None, overrides: Iterable[str] | Mapping[str, Any] = (),
                base_dir: str | Path | None = None) -> Config:
    """Read a YAML config (``None``: all defaults), apply dotted overrides, validate.

    ``overrides`` are ``"a.b=value"`` strings (values parsed as YAML) or a ``{"a.b": value}``
    mapping. Raises ``ConfigError`` (a ``ValueError``) with every problem, field by field.
    """
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = read_yaml(path, "config")
        except YamlError as err:
            raise ConfigError(str(err)) from None
        except OSError as err:
            raise ConfigError(f"cannot read config {path}: {err.strerror or err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    items = overrides.items() if isinstance(overrides, Mapping) else \
        [parse_override(o) for o in overrides]
    for key, value in items:
        apply_override(data, key.split(".") if isinstance(key, str) else list(key), value)
    return validate_config(data, base_dir, source)
