"""Pipeline services: the library calls the flows' tasks make that are not math — materialise
and list the manifest's volumes, resolve and check the prior's training config, train and
export a prior on the manifest's slices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from recon.config import Config
from recon.config.prior import PriorConfig
from recon.data.manifest import DataError, load_manifest, resolve
from recon.data.public import materialise as build
from recon.data.verify import verify as check
from recon.prior.files import export_prior, load_slices
from recon.prior.network import CheckpointError, read_checkpoint
from recon.prior.training import train_prior


# -- data -------------------------------------------------------------------------------------
def materialise(manifest: str | Path, data_root: str | Path) -> Path:
    """``recon.data.public.materialise``; raises ``DataError`` when a required volume could not
    be produced (the report's table says which)."""
    report = build(manifest, data_root, echo=None)
    if not report.ok:
        raise DataError(f"could not materialise the data under {data_root}:\n{report.table()}")
    return Path(data_root)


def manifest_volumes(manifest: str | Path, data_root: str | Path, split: str,
                     verify: bool = True, ids: Sequence[str] | None = None) -> list[dict[str, str]]:
    """``[{"id", "path", "kind"}]`` of the ``split`` volumes (only ``ids``, in that order, when given)
    present under ``data_root``; ``verify`` checks each one (checksum, readable 3-D NIfTI,
    finite voxels) and raises ``DataError`` naming the bad volume before anything is computed."""
    m = load_manifest(manifest)
    entries = m.volumes(split)
    if ids is not None:
        known = {v.id: v for v in entries}
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise DataError(f"volume id(s) {unknown} are not in split {split!r} of {manifest}; "
                            f"valid ids: {', '.join(known) or 'none'}")
        entries = [known[i] for i in ids]
    if verify:
        ok = {c.id for c in check(m, data_root, split=split, ids=[v.id for v in entries])
              if c.status == "ok"}
        entries = [v for v in entries if v.id in ok]
    else:
        entries = [v for v in entries if resolve(v, data_root).is_file()]
    return [{"id": v.id, "path": str(resolve(v, data_root)), "kind": v.kind} for v in entries]


# -- training ---------------------------------------------------------------------------------
def training_config(cfg: Config) -> PriorConfig:
    """The prior config (``cfg.prior.config``) with ``cfg.train`` overrides."""
    expected = cfg.prior.expected()
    if expected is None:
        raise ValueError("train.enabled needs prior.config (the network/training config)")
    raw = expected.model_dump(mode="json")
    for key in ("steps", "batch_size", "lr"):
        value = getattr(cfg.train, key)
        if value is not None:
            raw["training"][key] = value
    raw["data"]["image_size"] = cfg.data.image_size
    return PriorConfig.model_validate(raw)


def checkpoint_matches(checkpoint: str | Path, prior_cfg: PriorConfig) -> bool:
    """True when ``checkpoint`` exists and was trained, to the end, with exactly ``prior_cfg``
    (device, loader workers and logging cadence aside)."""
    if not Path(checkpoint).is_file():
        return False
    try:
        ckpt = read_checkpoint(checkpoint)
        stored = PriorConfig.model_validate(ckpt["config"]).model_dump(mode="json")
    except (CheckpointError, KeyError, ValueError):
        return False
    ignore = {"device", "log_every", "val_every", "checkpoint_every", "loader_workers"}

    def strip(c: dict) -> dict:
        return {**c, "training": {k: v for k, v in c["training"].items() if k not in ignore}}

    return (strip(stored) == strip(prior_cfg.model_dump(mode="json"))
            and int(ckpt.get("step", -1)) == prior_cfg.training.steps)


def train_and_export(cfg: PriorConfig, data_root: str | Path, manifest: str | Path,
                     out_dir: str | Path, resume: bool = True, progress: bool = True,
                     callback: Callable[[int, dict[str, float]], None] | None = None,
                     axis: int = 2, cache_dir: str | Path | None = None) -> dict:
    """Train with ``recon.prior.training.train_prior`` on the train/val slices of ``manifest`` (cut
    as the prior config says: ``recon.prior.files.load_slices``, crops for a patch prior), export
    the EMA weights (a state dict + config, loadable with ``load_prior``) to
    ``out_dir/prior.pt``."""
    data = cfg.data.model_copy(update={"manifest": Path(manifest), "axis": axis,
                                       "cache_dir": None if cache_dir is None else Path(cache_dir)})
    source = cfg.model_copy(update={"data": data})  # where to read; the checkpoint keeps cfg
    train = load_slices(source, data_root, cfg.data.train_split)
    try:
        val = load_slices(source, data_root, cfg.data.val_split)
    except ValueError:  # no validation slices: train without validation
        val = None
    result = train_prior(cfg, train, val, out_dir, resume=resume, progress=progress,
                         callback=callback)
    exported = export_prior(result.checkpoint, Path(out_dir) / "prior.pt")
    return {"checkpoint": str(exported), "step": result.step, "train_loss": result.train_loss,
            "val_loss": result.val_loss, "seconds": result.seconds}
