"""The components a config names: ``{name, params}`` checked against ``recon.registry``
(operators, guidances, integrators, timers, classical baselines) and the warm start."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from recon.config.base import (
    BUILD_COMPONENTS,
    Section,
    check_name,
    check_params,
    named,
    try_build,
)
from recon.registry import (
    BASELINES,
    GUIDANCES,
    INTEGRATORS,
    OPERATORS,
    TIMERS,
    VOLUME_OPERATORS,
)

LAM_RULES = ("discrepancy",)
"""A baseline's ``lam`` may name a rule instead of a number: chosen per acquisition at solve time
from its own noise level (``recon.classical.baselines.discrepancy_lambda``)."""


T_MIN = 1e-3
"""``recon.sampling.timer.Timer``'s default ``t_min`` (a test checks they agree)."""


def check_lam(what: str, lam: Any) -> float | str:
    """``lam`` as a float >= 0 or a rule of ``LAM_RULES``; anything else -> a clear error."""
    if isinstance(lam, str) and lam in LAM_RULES:
        return lam
    try:
        value = float(lam)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(lam, bool) or not (value >= 0 and value < float("inf")):
        raise ValueError(f"{what} must be a finite number >= 0 or "
                         f"{' or '.join(map(repr, LAM_RULES))} (chosen per acquisition from its "
                         f"own noise level by the discrepancy principle), got {lam!r}")
    return value


class _Component(Section):
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
        return check_name(cls.KIND, v, cls.REGISTRY)

    @model_validator(mode="after")
    def _params(self) -> _Component:
        if not BUILD_COMPONENTS.get():
            return self
        check_params(self.KIND, self.name, self.REGISTRY[self.name], self.params,
                      reserved=self.RESERVED)
        try_build(self.KIND, self.name, self._trial)
        return self

    def _trial(self) -> Any:
        """One throwaway instance, so that bad values fail at load time."""
        return self.build()

    def build(self, **given: Any) -> Any:
        """The object: ``REGISTRY[name](**params, **given)`` (``given``: the reserved
        arguments the library fills in). The name and params were checked on load."""
        return self.REGISTRY[self.name](**self.params, **given)

    @property
    def label(self) -> str:
        """``ddim`` or ``ddim(eta=1.0)``: short and unique per setting (``label_of``)."""
        return label_of(self.name, self.params)


class OperatorConfig(_Component):
    """A measurement operator: ``mask``, ``blur`` or ``fourier`` plus its keyword arguments
    (e.g. ``{keep: 0.5}``, ``{sigma: 1.5}``, ``{acceleration: 4, center_fraction: 0.08}``);
    ``guidance`` overrides the reconstruction's guidance for this operator, ``warm_start:
    false`` starts its chains from noise whatever ``reconstruct.warm_start`` says; ``lam`` gives the
    classical baselines' ``lam`` for it (``{tv: 3.2e-3}``, or a rule of ``LAM_RULES``: chosen per
    acquisition at solve time), used where a baseline or warm start says ``lam: null`` instead
    of choosing it on the validation split."""

    KIND = "operator"
    REGISTRY = OPERATORS
    RESERVED = ("shape", "sigma_y", "seed", "indices")

    guidance: GuidanceConfig | None = None
    warm_start: Literal[False] | None = Field(
        None, description="false: no warm start for this operator (null: reconstruct's)")
    lam: dict[str, float | str] = Field(
        default_factory=dict, description="baseline name -> lam for this operator (e.g. chosen "
        "once on the public validation split), or 'discrepancy' (chosen per acquisition from its "
        "own noise level); missing: chosen on data.val_split when needed")

    @field_validator("lam", mode="before")
    @classmethod
    def _lam(cls, v: Any) -> Any:
        if not isinstance(v, Mapping):
            return v
        out = {}
        for name, lam in v.items():
            check_name("baseline", name, BASELINES)
            out[name] = check_lam(f"lam of {name}", lam)
        return out

    @field_validator("guidance", mode="before")
    @classmethod
    def _short_guidance(cls, v: Any) -> Any:
        return named(v)

    @field_validator("warm_start", mode="before")
    @classmethod
    def _no_warm_start(cls, v: Any) -> Any:
        if v is not None and v is not False:
            raise ValueError(f"an operator's warm_start can only be false (its chains start from "
                             f"noise) or null (reconstruct.warm_start), got {v!r}")
        return v

    def _trial(self) -> None:
        """Nothing here: building needs the slice size and sigma_y (``Config._cross`` does it)."""

    @property
    def volume(self) -> bool:
        """Whether it measures a volume ``(S, H, W)`` (``recon.registry.VOLUME_OPERATORS``)."""
        return self.name in VOLUME_OPERATORS

    def build(self, shape: tuple[int, ...], sigma_y: float, seed: int = 0,
              indices: Sequence[int] | None = None) -> Any:
        """The ``recon.operators.Operator`` for slices of ``shape`` ``(H, W)`` (a volume
        operator: for the volume ``(S, H, W)`` whose slices sit at ``indices`` in the whole
        volume); its mask/kernel drawn from ``seed``."""
        shape = tuple(int(n) for n in shape)
        if self.volume != (len(shape) == 3):
            raise ValueError(f"operator {self.name!r} measures "
                             f"{'volumes (S, H, W)' if self.volume else 'slices (H, W)'}, "
                             f"got shape {shape}")
        extra = {"indices": list(indices)} if self.name == "slice_drop" and indices is not None \
            else {}
        return self.REGISTRY[self.name](shape, **self.params, sigma_y=sigma_y, seed=seed, **extra)

    def build_for(self, slice_shape: tuple[int, int], indices: Sequence[int], sigma_y: float,
                  seed: int = 0) -> Any:
        """The operator for the slices at ``indices`` (of ``slice_shape``): on their volume
        ``(S, H, W)`` for a volume operator, else on one slice, broadcast over the others."""
        if self.volume:
            return self.build((len(indices), *slice_shape), sigma_y, seed, indices)
        return self.build(slice_shape, sigma_y, seed)


def label_of(name: str, params: Mapping[str, Any]) -> str:
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

    RESERVED = ("tv_z",)

    def build(self, **given: Any) -> Any:
        """The ``recon.sampling.guidance.Guidance`` (``given``: ``tv_z``, from ``reconstruct.coupling``)."""
        return super().build(**given)


class BaselineConfig(_Component):
    """A classical reconstruction from ``recon.registry.BASELINES`` (``tv``, ``l1_wavelet``)
    and its keyword arguments: ``lam`` (a number; a rule of ``LAM_RULES``, chosen per
    acquisition from its noise level at solve time; null: chosen on the validation split for each
    operator, ``recon.reconstruct.reconstruction.tune_baseline``) and ``iterations``."""

    KIND = "baseline"
    REGISTRY = BASELINES
    RESERVED = ("operator",)

    @model_validator(mode="after")
    def _lam_value(self) -> BaselineConfig:
        if "lam" in self.params and self.params["lam"] is not None:
            check_lam("lam", self.params["lam"])
        return self

    def _trial(self) -> Any:
        return self.build(OPERATORS["mask"]((8, 8), keep=0.5, sigma_y=0.01, seed=0))

    def build(self, operator: Any) -> Any:
        """The ``recon.classical.baselines.Baseline`` for this ``recon.operators.Operator``."""
        return self.REGISTRY[self.name](operator, **self.params)

    @property
    def lam(self) -> float | str | None:
        return self.params.get("lam")

    @property
    def iterations(self) -> int:
        return self.params.get("iterations") or self.REGISTRY[self.name].iterations


class IntegratorConfig(_Component):
    """An integrator from ``recon.registry.INTEGRATORS`` and its keyword arguments."""

    KIND = "integrator"
    REGISTRY = INTEGRATORS

    name: str = "heun"

    def build(self) -> Any:
        """The ``recon.sampling.integrator.Integrator``."""
        return super().build()


class TimerConfig(_Component):
    """A time grid from ``recon.registry.TIMERS``; ``steps`` comes from ``reconstruct.steps``."""

    KIND = "timer"
    REGISTRY = TIMERS
    RESERVED = ("steps",)

    name: str = "cosine"
    params: dict[str, Any] = Field(default_factory=lambda: {"t_min": T_MIN})

    def _trial(self) -> Any:
        return self.build(1)

    @property
    def t_min(self) -> Any:
        """Where the chains end (``params.t_min``, else ``recon.sampling.timer.Timer``'s default)."""
        return self.params.get("t_min", T_MIN)

    def build(self, steps: int, t_max: float | None = None) -> Any:
        """The ``recon.sampling.timer.Timer`` of ``steps`` steps (from ``t_max`` when given: a warm
        start)."""
        params = self.params if t_max is None else {**self.params, "t_max": t_max}
        return self.REGISTRY[self.name](steps, **params)


class WarmStartConfig(Section):
    """Start the sampler near a classical answer (CCDF, Chung et al. 2022): the ``baseline``'s
    solution of the same y (``lam`` null: chosen on the validation split), noised to ``t0``;
    ``reconstruct.steps`` then run from ``t0`` down to the timer's ``t_min``."""

    baseline: BaselineConfig = Field(default_factory=lambda: BaselineConfig(name="tv"))
    t0: float = Field(0.4, gt=0.0, lt=1.0, description="diffusion time the chains start at")

    @field_validator("baseline", mode="before")
    @classmethod
    def _short(cls, v: Any) -> Any:
        return named(v)

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


OperatorConfig.model_rebuild()
