"""A valid config checked against the files it names, before anything runs (``recon`` calls
``check_files`` right after ``load_config``): what depends on the data, not on the config alone.

- ``data.data_root`` must not be a symbolic link to nothing, nor a file; ``prior.config`` and
  (unless it is trained) ``prior.checkpoint`` must be files;
- raw k-space (manifest entries of ``kind: kspace``) is reconstructed slice by slice with
  ``fourier`` (no ``coils``: they come from the data) or ``acquired``: no volume operator,
  coupling or 3-D baseline; ``acquired`` applies to raw k-space only;
- a ``lam: discrepancy`` needs a noise level: ``reconstruct.sigma_y > 0`` for image data;
- a baseline whose ``lam`` is chosen on validation data needs validation volumes.

Reads the manifest (a small YAML file), never the data: a manifest that cannot be read is left
to the run, which names it.
"""

from __future__ import annotations

import os
from pathlib import Path

from recon.config import BaselineConfig, Config, ConfigError, OperatorConfig
from recon.data.manifest import DataError, load_manifest
from recon.registry import KSPACE_OPERATORS, VOLUME_BASELINES


def dangling_link(path: str | Path) -> str | None:
    """Why ``path`` cannot be used if it is a symbolic link to nothing, else None."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return (f"{path} is a symbolic link to {os.readlink(path)}, which does not exist; "
                "create that folder or remove the link")
    return None


def check_files(cfg: Config) -> None:
    """``ConfigError`` listing every problem of the module docstring, each naming its key."""
    problems = []
    root = Path(cfg.data.data_root)
    if link := dangling_link(root):
        problems.append(f"data.data_root: {link}")
    elif root.exists() and not root.is_dir():
        problems.append(f"data.data_root: {root} is a file, not a folder")
    prior = cfg.prior
    if prior.config is not None and not Path(prior.config).is_file():
        problems.append(f"prior.config: {prior.config} is not a file (the network config the "
                        "checkpoint must match)")
    if not cfg.train.enabled and not Path(prior.checkpoint).is_file():
        problems.append(f"prior.checkpoint: {prior.checkpoint} is not a file, and train.enabled "
                        "is false (nothing would make it)")
    manifest = _manifest(cfg)
    kinds = set() if manifest is None else \
        {"kspace" if v.kind == "kspace" else "image" for v in _test_volumes(cfg, manifest)}
    problems += _operators(cfg, kinds, cfg.data.manifest)
    if manifest is not None:
        if not manifest.volumes(cfg.data.val_split):
            problems += [f"{key}: {b.name!r} has no lam for operator {op.name!r}, so it would "
                         f"be chosen on validation volumes, and split {cfg.data.val_split!r} of "
                         f"{cfg.data.manifest} has none; give the operator its lam "
                         f"(reconstruct.operators: ... lam: {{{b.name}: 3.2e-3}})"
                         for key, b, on in _solvers(cfg) for op in on if _lam(b, op) is None]
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(f"  {p}" for p in problems))


def _manifest(cfg: Config):
    try:
        return load_manifest(cfg.data.manifest)
    except (DataError, OSError):
        return None


def _test_volumes(cfg: Config, manifest) -> list:
    """The test volumes a run reconstructs (``load_data``: the split, ``data.volumes``,
    ``data.max_volumes``)."""
    ids = cfg.data.volumes
    volumes = [v for v in manifest.volumes(cfg.data.test_split) if ids is None or v.id in ids]
    return volumes[: cfg.data.max_volumes]


def _compared(cfg: Config) -> list[OperatorConfig]:
    """The operator ``compare.methods`` run on (none when it is not reconstructed: ``recon
    compare`` refuses that itself)."""
    ops = cfg.reconstruct.operators
    return [o for o in ops if o.name == (cfg.compare.operator or ops[0].name)]


def _couplings(cfg: Config) -> list[tuple[str, str]]:
    """``(key, coupling name)`` of ``reconstruct`` and of each row of ``compare.methods`` that
    sets its own."""
    rows = [(f"compare.methods.{i}.coupling", m.coupling.name)
            for i, m in enumerate(cfg.compare.methods) if m.coupling is not None]
    return [("reconstruct.coupling", cfg.reconstruct.coupling.name), *rows]


def _solvers(cfg: Config) -> list[tuple[str, BaselineConfig, list[OperatorConfig]]]:
    """Every classical solver a run may use, with its key and the operators it runs on: the
    baselines and the warm start of ``reconstruct``, and the baselines and warm starts of the
    rows of ``compare.methods`` (on the compared operator)."""
    rs = cfg.reconstruct
    out = [(f"reconstruct.baselines.{i}", b, rs.operators) for i, b in enumerate(rs.baselines)]
    warmed = [op for op in rs.operators if rs.warm_start_for(op) is not None]
    if warmed:
        out.append(("reconstruct.warm_start.baseline", rs.warm_start.baseline, warmed))
    for i, m in enumerate(cfg.compare.methods):
        if m.baseline is not None:
            out.append((f"compare.methods.{i}.baseline", m.baseline, _compared(cfg)))
        elif m.warm_start is not None:
            out.append((f"compare.methods.{i}.warm_start.baseline", m.warm_start.baseline,
                        _compared(cfg)))
    return out


def _lam(b: BaselineConfig, op: OperatorConfig) -> float | str | None:
    """The lam ``b`` solves with for ``op``: its own, else the operator's, else None (chosen on
    validation data)."""
    return b.lam if b.lam is not None else op.lam.get(b.name)


def _operators(cfg: Config, kinds: set[str], manifest: Path) -> list[str]:
    problems = []
    ops = list(enumerate(cfg.reconstruct.operators))
    if "kspace" in kinds:
        why = f"the test volumes of {manifest} are raw k-space (kind: kspace)"
        for i, op in ops:
            if op.name not in KSPACE_OPERATORS:
                problems.append(f"reconstruct.operators.{i}: {op.name!r}: raw k-space takes "
                                f"{' or '.join(KSPACE_OPERATORS)}; {why}")
            elif op.params.get("coils") is not None:
                problems.append(f"reconstruct.operators.{i}.params.coils: the coils of raw "
                                f"k-space come from the data; remove it ({why})")
        for key, coupling in _couplings(cfg):
            if coupling != "none":
                problems.append(f"{key}: {coupling!r}: raw k-space is reconstructed slice by "
                                f"slice; set none ({why})")
        for key, b, _ in _solvers(cfg):
            if b.name in VOLUME_BASELINES:
                problems.append(f"{key}: {b.name!r} solves a volume; raw k-space is "
                                f"reconstructed slice by slice: use sense, tv or l1_wavelet "
                                f"({why})")
    if "image" in kinds:
        for i, op in ops:
            if op.name == "acquired":
                problems.append(f"reconstruct.operators.{i}: 'acquired' reconstructs raw "
                                f"k-space as it was measured, and the test volumes of {manifest} "
                                f"are images: use fourier to simulate undersampled k-space")
    if cfg.reconstruct.sigma_y == 0:
        problems += [f"{key}: lam 'discrepancy' (for operator {op.name!r}) needs a noise level, "
                     f"and reconstruct.sigma_y is 0; set sigma_y > 0 or a number for lam"
                     for key, b, on in _solvers(cfg) for op in on
                     if _measures_images(op, kinds) and _lam(b, op) == "discrepancy"]
    return problems


def _measures_images(op: OperatorConfig, kinds: set[str]) -> bool:
    """Whether ``op`` measures image volumes (simulated, with ``reconstruct.sigma_y``); raw
    k-space has its own, measured noise. ``kinds``: those of the test volumes (empty: unknown,
    the manifest could not be read)."""
    return op.name not in KSPACE_OPERATORS or (op.name == "fourier" and "image" in kinds)


def check_prior(cfg: Config) -> None:
    """The samplers' time grids fit the prior's diffusion (``prior.config``; building it imports
    torch, so this runs once the components are built): a warm start's ``t0`` or a timer's
    ``t_max`` beyond the model's own ``t_max`` is named on load, not by the first slab. Nothing
    to check without a readable prior config (``check_files`` names a missing one)."""
    try:
        expected = cfg.prior.expected()
    except ValueError:
        return
    if expected is None:
        return
    diffusion = expected.diffusion.build()
    settings = [("reconstruct", cfg.reconstruct)] + [  # and the rows with a grid of their own
        (f"compare.methods.{i}", m.setting(cfg.reconstruct)) for i, m in enumerate(cfg.compare.methods)
        if m.baseline is None and (m.timer is not None or "warm_start" in m.model_fields_set)]
    problems = []
    for key, rs in settings:
        t0 = None if rs.warm_start is None else rs.warm_start.t0
        try:
            rs.timer.build(rs.steps, t0).times(diffusion)
        except ValueError as err:
            what = f"warm_start.t0={t0:g}" if t0 is not None else "the timer"
            problems.append(f"{key}: {what} does not fit the prior's diffusion "
                            f"({cfg.prior.config}): {err}")
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(f"  {p}" for p in problems))
