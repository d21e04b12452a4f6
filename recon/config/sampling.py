"""The sampler's sections: ``reconstruct`` (operators, guidance, integrator, timer, warm start,
baselines, batching) and ``compare`` (the methods side by side, each a ``MethodConfig``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from recon.config.base import Section, check_name, named, named_list
from recon.config.components import (
    BaselineConfig,
    GuidanceConfig,
    IntegratorConfig,
    OperatorConfig,
    TimerConfig,
    WarmStartConfig,
)
from recon.registry import BASELINES, OPERATORS


def _default_operators() -> list[OperatorConfig]:
    """Mask 30 %, blur 2 px and 4x Cartesian k-space, with the baselines' lam chosen on the
    public validation split (sigma_y 0.01; README, "Choosing the sampler"): mask and k-space with
    TV inside their data consistency and the warm start; blur with neither (on the validation
    split they buy it nothing, and cost 2.1x its seconds)."""
    def op(name: str, params: dict, tv: float, lam: dict[str, float], **extra) -> OperatorConfig:
        return OperatorConfig(name=name, params=params, lam=lam, guidance=GuidanceConfig(
            name="data_consistency", params={"tv": tv} if tv else {}), **extra)

    return [op("mask", {"kind": "random", "keep": 0.3}, 1e-3, {"tv": 1e-2, "l1_wavelet": 1e-2}),
            op("blur", {"sigma": 2.0}, 0.0, {"tv": 3.2e-4, "l1_wavelet": 1e-3}, warm_start=False),
            op("fourier", {"acceleration": 4, "center_fraction": 0.08, "kind": "random"}, 1e-3,
               {"tv": 3.2e-3, "l1_wavelet": 3.2e-4})]


class CouplingConfig(Section):
    """How the slices of a slab are tied together (``recon.reconstruct.coupling``): ``none`` (each slice on
    its own) or ``tv_z`` (the slab sampled as one volume, total variation along the slices inside
    every data-consistency step with weight ``weight``, DiffusionMBIR). ``halo`` extra slices on
    each side of a slab are reconstructed with it and dropped, so slabs join without seams."""

    name: Literal["none", "tv_z"] = "none"
    weight: float = Field(1e-3, gt=0, le=10.0, description="mu_z, the through-plane TV weight "
                          "(the units of the TV baseline's lam)")
    halo: int = Field(2, ge=0, le=64, strict=True, description="slices reconstructed on each side "
                      "of a slab and dropped")

    @property
    def label(self) -> str:
        return "" if self.name == "none" else f"{self.name}({self.weight:.4g})"


class AdaptConfig(Section):
    """The prior adapted to the measurement during sampling (``recon.sampling.adaptation.Adapter``):
    ``norms`` fits the normalisation layers' scale and shift of a copy of the prior, one copy
    per slab, by ``iterations`` Adam steps of ``lr`` on the data misfit before each network
    evaluation at ``t <= t_max``; ``none`` samples with the prior as trained."""

    name: Literal["none", "norms"] = "none"
    lr: float = Field(1e-3, gt=0, le=1.0, description="Adam's learning rate")
    iterations: int = Field(1, ge=1, le=10, strict=True,
                            description="Adam steps before each network evaluation")
    t_max: float = Field(1.0, gt=0, le=1.0, description="adapt only at diffusion times t <= "
                         "t_max")

    @property
    def label(self) -> str:
        return "" if self.name == "none" else f"adapt {self.name}(lr={self.lr:g})"


class ReconstructSection(Section):
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
    coupling: CouplingConfig = Field(default_factory=CouplingConfig, description="through-"
                                     "plane coupling of a slab's slices: none | tv_z")
    adapt: AdaptConfig = Field(default_factory=AdaptConfig, description="the prior adapted to "
                               "each slab's measurement while it samples: none | norms")
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
        "(recon.reconstruct.raw): of the calibration image, of a SENSE solution, or none")
    kspace_image: Literal["magnitude", "tracked_phase", "real_imag"] = Field(
        "real_imag", description="raw k-space: how the real prior sees the complex image "
        "(recon.operators.complex_image): its magnitude in the maps' phase frame, its magnitude "
        "with the phase re-estimated at every step, or its real and imaginary parts")
    kspace_virtual_coils: int | None = Field(
        None, ge=1, le=128, strict=True, description="raw k-space: SVD coil compression to this "
        "many virtual coils when a scan has more (from each slice's calibration lines, for every "
        "method alike; recon.classical.coils.compression_matrix), or None for every coil")
    kspace_output: Literal["rss", "magnitude"] = Field(
        "rss", description="raw k-space: the image a method reports of its complex image x "
        "(every method alike, the classical ones too): the root-sum-of-squares of x's coil "
        "images with the acquired samples put back (UndersampledFourier.rss_with_data, as the "
        "fully sampled reference is made), or |x|")
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="the prior's forward passes: bf16 autocast (a GPU's tensor cores, "
        "a CPU's AVX512-BF16 / AMX through oneDNN; the samplers' arithmetic and data "
        "consistency stay float32), fp32, or auto: bf16 where the device computes it natively "
        "(recon.prior.network.native_bf16), else fp32")
    num_threads: int | None = Field(None, ge=1, le=1024, strict=True,
                                    description="torch CPU threads (None: torch's "
                                    "default); 1 avoids oversubscription on shared CPUs")
    progress: bool = True

    @field_validator("operators", "baselines", mode="before")
    @classmethod
    def _short_lists(cls, v: Any) -> Any:
        return named_list(v)

    @field_validator("guidance", "integrator", "timer", "coupling", "adapt", mode="before")
    @classmethod
    def _short(cls, v: Any) -> Any:
        return named(v)

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
        if self.coupling.name != "none":
            other = sorted({self.guidance_for(o).name for o in self.operators} -
                           {"data_consistency"})
            if other:
                raise ValueError(f"coupling {self.coupling.name!r} acts inside the "
                                 f"data-consistency step; guidance {other} has none")
        t_min = self.timer.t_min
        if self.warm_start is not None and isinstance(t_min, int | float) \
                and not isinstance(t_min, bool) and not self.warm_start.t0 > t_min:
            raise ValueError(f"warm_start.t0={self.warm_start.t0:g} must be above the timer's "
                             f"t_min={t_min:g}: the chains run from t0 down to t_min")
        return self

    def guidance_for(self, op: OperatorConfig) -> GuidanceConfig:
        return op.guidance or self.guidance

    def warm_start_for(self, op: OperatorConfig) -> WarmStartConfig | None:
        """``warm_start``, or None where the operator says ``warm_start: false``."""
        return None if op.warm_start is False else self.warm_start

    def family(self, op: OperatorConfig) -> str:
        """The sampler for ``op`` without its step count: ``dps ddim(eta=1.0)``; raw k-space's
        image model and phase when they are not the defaults."""
        start = self.warm_start_for(op)
        warm = "" if start is None else f" {start.label}"
        coupled = f" {self.coupling.label}" if self.coupling.label else ""
        coupled += f" {self.adapt.label}" if self.adapt.label else ""
        image = "".join(f" {getattr(self, k)}" for k in ("kspace_image", "kspace_phase")
                        if getattr(self, k) != type(self).model_fields[k].default)
        return f"{self.guidance_for(op).label} {self.integrator.label}{warm}{coupled}{image}"

    def label(self, op: OperatorConfig) -> str:
        """The sampler for ``op``, as tables and run names show it: ``dps ddim(eta=1.0) x16``."""
        return f"{self.family(op)} x{self.steps}"


class MethodConfig(Section):
    """One row of a comparison: the diffusion sampler of ``reconstruct`` with some of
    ``guidance`` / ``integrator`` / ``timer`` / ``steps`` / ``warm_start`` / ``n_samples`` /
    ``coupling`` / ``kspace_image`` / ``kspace_phase`` / ``adapt`` changed, or a classical
    ``baseline``. A
    field left out keeps ``reconstruct``'s value; ``warm_start: null`` given explicitly starts
    from pure noise. Short forms: ``tv`` (a baseline name) and
    ``{baseline: l1_wavelet, ...}``."""

    baseline: BaselineConfig | None = None
    guidance: GuidanceConfig | None = None
    integrator: IntegratorConfig | None = None
    timer: TimerConfig | None = None
    steps: int | None = Field(None, ge=1, le=10_000, strict=True)
    warm_start: WarmStartConfig | None = None
    n_samples: int | None = Field(None, ge=1, le=64, strict=True)
    coupling: CouplingConfig | None = None
    kspace_image: Literal["magnitude", "tracked_phase", "real_imag"] | None = None
    kspace_phase: Literal["lowres", "sense", "none"] | None = None
    adapt: AdaptConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _short(cls, v: Any) -> Any:
        if isinstance(v, str):
            return {"baseline": {"name": v}} if v in BASELINES else {"guidance": {"name": v}}
        if isinstance(v, dict):
            v = {k: (named(x) if k in ("baseline", "guidance", "integrator", "timer", "coupling",
                                       "adapt") else x)
                 for k, x in v.items()}
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> MethodConfig:
        if self.baseline is not None and (self.guidance or self.integrator or self.timer
                                          or self.steps or self.warm_start or self.n_samples
                                          or self.coupling or self.kspace_image
                                          or self.kspace_phase or self.adapt):
            raise ValueError("a method is either a baseline or a diffusion setting (guidance, "
                             "integrator, timer, steps, warm_start, n_samples, coupling, "
                             "kspace_image, kspace_phase, adapt), not both")
        return self

    def setting(self, rs: ReconstructSection) -> ReconstructSection:
        """``reconstruct`` with this method's diffusion fields (unchanged for a baseline),
        validated as a whole: the rules that tie its fields together hold for it too
        (``ValidationError`` otherwise; ``Config`` checks every row on load). A row whose
        guidance has no data-consistency step (DPS, MMPS) does not inherit ``reconstruct``'s
        coupling, which acts inside that step: it runs uncoupled (its label says so); one that
        sets a coupling too is refused."""
        update = {k: v for k, v in (("guidance", self.guidance), ("integrator", self.integrator),
                                    ("timer", self.timer), ("steps", self.steps),
                                    ("warm_start", self.warm_start),
                                    ("n_samples", self.n_samples),
                                    ("coupling", self.coupling),
                                    ("kspace_image", self.kspace_image),
                                    ("kspace_phase", self.kspace_phase),
                                    ("adapt", self.adapt)) if v is not None}
        if "warm_start" in self.model_fields_set:  # given, null included: no warm start
            update["warm_start"] = self.warm_start
        if self.guidance is not None:  # one guidance for every operator in the comparison
            update["operators"] = [o.model_copy(update={"guidance": None}) for o in rs.operators]
            if self.coupling is None and self.guidance.name != "data_consistency":
                update["coupling"] = CouplingConfig()
        if "warm_start" in self.model_fields_set:  # and one warm start (or none)
            update["operators"] = [o.model_copy(update={"warm_start": None})
                                   for o in update.get("operators", rs.operators)]
        fields = {name: getattr(rs, name) for name in type(rs).model_fields}
        return type(rs).model_validate({**fields, **update})  # the parts were validated on load


class CompareSection(Section):
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
        return named_list(v)

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if any(not 1 <= s <= 10_000 for s in v):
            raise ValueError(f"steps must be integers in [1, 10000], got {v}")
        return v

    @field_validator("operator")
    @classmethod
    def _operator(cls, v: str | None) -> str | None:
        return None if v is None else check_name("operator", v, OPERATORS)

    @model_validator(mode="after")
    def _rows(self) -> CompareSection:
        if not self.integrators and not self.methods:
            raise ValueError("nothing to compare: give integrators or methods")
        return self

    def rows(self) -> list[MethodConfig]:
        """Every method compared: the integrator x steps grid, then ``methods``."""
        grid = [MethodConfig(integrator=i, steps=n) for i in self.integrators for n in self.steps]
        return grid + list(self.methods)
