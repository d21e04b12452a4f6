"""The configuration: one validated schema, below every component it names and builds.

One pydantic (v2) schema for data, prior, training, reconstruction (sampler and classical
baselines), method comparison and tracking.

    cfg = load_config("configs/demo.yaml", ["reconstruct.steps=32", "reconstruct.operators=[fourier]"])
    cfg.reconstruct.integrator.name      # "diffpir"
    cfg.resolved()                       # flat {"reconstruct.steps": 32, ...} for MLflow params

Every section forbids unknown keys (a typo is an error, never silently ignored). Names of
operators, guidances, integrators, timers and diffusions are checked against the registries of
the library, and the error lists the valid ones. Relative paths are resolved against ``base_dir``
(the current directory by default), so the resolved config is self-contained.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from recon.config.base import BUILD_COMPONENTS, ConfigError, Section, fields_only, try_build
from recon.config.components import (
    BaselineConfig,
    GuidanceConfig,
    IntegratorConfig,
    OperatorConfig,
    TimerConfig,
    WarmStartConfig,
)
from recon.config.prior import CheckpointError
from recon.config.sampling import (
    AdaptConfig,
    CompareSection,
    CouplingConfig,
    MethodConfig,
    ReconstructSection,
)
from recon.config.sections import (
    DASK_CLUSTER_CLASSES,
    DataConfig,
    PriorSection,
    RunnerSection,
    TrackingSection,
    TrainSection,
)
from recon.yaml_io import YamlError, parse_yaml, read_yaml

__all__ = [
    "DASK_CLUSTER_CLASSES", "NOMINAL_NATIVE", "AdaptConfig", "BaselineConfig", "CheckpointError",
    "CompareSection", "Config", "ConfigError", "CouplingConfig", "DataConfig", "GuidanceConfig",
    "IntegratorConfig", "MethodConfig",
    "OperatorConfig", "PriorSection", "ReconstructSection", "RunnerSection", "TimerConfig",
    "TrackingSection", "TrainSection", "WarmStartConfig", "apply_override", "fallback_config",
    "fields_only", "flatten", "load_config", "parse_override", "validate_config",
]

NOMINAL_NATIVE = 256
"""Slice size the operators are trial-built at when ``data.image_size`` is null (native)."""


class Config(Section):
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
    def _compare_settings(self) -> Config:
        """Each diffusion row of ``compare.methods`` is ``reconstruct`` with some fields changed;
        refused here, naming the row, when the combination is not a valid ``reconstruct``."""
        for i, method in enumerate(self.compare.methods):
            try:
                method.setting(self.reconstruct)
            except ValidationError as err:
                reasons = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
                raise ValueError(f"compare.methods.{i}: with reconstruct's other fields: "
                                 f"{reasons}") from None
        return self

    @model_validator(mode="after")
    def _cross(self) -> Config:
        if not BUILD_COMPONENTS.get():
            return self
        size = (self.data.image_size or NOMINAL_NATIVE,) * 2  # native: trial-build at a common size
        for i, op in enumerate(self.reconstruct.operators):
            if op.name == "acquired":  # sampled as the raw k-space was: built from the data
                continue
            shape = (4, *size) if op.volume else size
            try_build(f"reconstruct.operators.{i}: operator", op.name, lambda op=op, shape=shape:
                      op.build(shape, self.reconstruct.sigma_y, self.reconstruct.seed))
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


def fallback_config(config: Any, overrides: Iterable[str] = ()) -> Config:
    """Defaults, keeping ``work_dir``/``tracking`` of a config (a path, a dict or a ``Config``,
    and its overrides) that failed to validate, so its FAILED run lands in the user's store.
    Fields only (``fields_only``): nothing is imported or built."""
    raw: dict[str, Any] = {}
    if isinstance(config, Config):
        raw = config.to_dict()
    elif isinstance(config, Mapping):
        raw = dict(config)
    elif isinstance(config, str | Path) and Path(config).is_file():
        try:
            loaded = read_yaml(config, "config")
            raw = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            raw = {}
    for o in overrides or []:
        try:
            path, value = parse_override(o)
            if path[0] in ("work_dir", "tracking"):
                apply_override(raw, path, value)
        except (ConfigError, TypeError, KeyError):
            continue
    with fields_only():
        for keep in ({"work_dir": raw.get("work_dir"), "tracking": raw.get("tracking")},
                     {"work_dir": raw.get("work_dir")}):
            try:
                return validate_config({k: v for k, v in keep.items() if v is not None})
            except ConfigError:
                continue
        return validate_config({})
