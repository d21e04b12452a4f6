"""``recon``: the command line of the reconstruction pipeline.

    recon data       [CONFIG] [--set section.key=value ...]   materialise + verify + prepare data
    recon train      [CONFIG] [--set ...]                     train the prior (or reuse the shipped one)
    recon reconstruct [CONFIG] [--set ...]                    reconstruct + evaluate the test volumes
    recon compare    [CONFIG] [--set ...]                     compare integrators x steps
    recon pipeline   [CONFIG] [--set ...]                     data -> train -> reconstruct -> evaluate
    recon schedule   [CONFIG] --cron "0 2 * * *"              serve the reconstruction on a cron schedule
    recon config     [CONFIG] [--set ...]                     print the resolved config

CONFIG is a YAML file or the name of one in configs/ (``demo`` -> ``configs/demo.yaml``);
default ``configs/default.yaml``. Each command runs Prefect flows (embedded API unless
``PREFECT_API_URL`` is set) and records MLflow runs; the end of the output says where.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Diffusion-prior reconstruction of brain MRI: Prefect flows + MLflow tracking.")
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
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        for cand in (root / "configs" / config, root / "configs" / f"{config}.yaml"):
            if cand.is_file():
                return cand
    return p


def load(config: str, overrides: list[str] | None, record: bool = False):
    """The validated config, or exit 2 with the reasons (``record``: also leave a FAILED
    MLflow run saying why)."""
    from recon.config import ConfigError, load_config

    try:
        return load_config(config_path(config), overrides or [])
    except ConfigError as err:
        console.print(f"[bold red]invalid configuration[/]\n{err}", highlight=False)
        if record:
            _record_config_failure(config, overrides, err)
        raise typer.Exit(2) from None


def prepare(config: str, overrides: list[str] | None, verbose: bool = False):
    """Validate the config (exit 2 with the reasons if invalid) and set up Prefect's settings
    for its work dir *before* Prefect is imported."""
    cfg = load(config, overrides, record=True)
    setup_prefect(cfg, verbose)
    return cfg


def setup_prefect(cfg, verbose: bool = False) -> None:
    """Quiet Prefect's INFO logs unless ``verbose``; its state under ``cfg.work_dir``."""
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    use_work_dir(cfg.work_dir)


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


def run_flow(fn, *args, **kwargs) -> Any:
    """Run a flow; a failure prints the reason and exits 1 (the MLflow run is already FAILED)."""
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        raise typer.Exit(130) from None
    except Exception as err:  # noqa: BLE001 - the flow's error, shown plainly
        console.print(f"[bold red]{fn.__name__} failed:[/] {type(err).__name__}: {err}",
                      highlight=False)
        raise typer.Exit(1) from None


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
    for key, header in columns:
        table.add_column(header, no_wrap=True, justify="left" if key in (
            "volume", "operator", "guidance", "integrator") else "right")
    for r in rows:
        table.add_row(*[_fmt(r.get(k, "")) for k, _ in columns])
    console.print(table)


RECON_COLUMNS = [("volume", "volume"), ("operator", "operator"), ("guidance", "guidance"),
                 ("nfe", "NFE"),
                 ("slices", "slices"), ("psnr_naive", "PSNR naive"), ("psnr", "PSNR recon"),
                 ("gain_db", "gain dB"), ("ssim_naive", "SSIM naive"), ("ssim", "SSIM recon"),
                 ("seconds", "seconds"), ("slices_per_s", "slices/s")]
COMPARE_COLUMNS = [("integrator", "integrator"), ("steps", "steps"), ("nfe", "NFE"),
                   ("psnr", "PSNR"), ("ssim", "SSIM"), ("seconds", "seconds"),
                   ("gain_db", "gain over naive dB")]


def margins(rows: list[dict]) -> dict[str, float]:
    """Smallest PSNR gain over the naive pseudo-inverse per operator."""
    out: dict[str, float] = {}
    for r in rows:
        out[r["operator"]] = min(out.get(r["operator"], float("inf")), r["gain_db"])
    return out


def print_reconstruction(cfg, rows: list[dict]) -> bool:
    """The held-out PSNR/SSIM table and each operator's margin over the naive pseudo-inverse;
    True when every operator beats it."""
    r = cfg.reconstruct
    print_table(f"held-out reconstruction vs the naive pseudo-inverse ({r.integrator.label}, "
                f"{r.steps} steps, {r.n_samples} posterior samples, sigma_y={r.sigma_y:g})",
                rows, RECON_COLUMNS)
    console.print("PSNR margins over the naive pseudo-inverse:")
    ok = True
    for op, gain in margins(rows).items():
        good = gain > 0
        ok &= good
        mark = "[green]beats[/]" if good else "[bold red]does NOT beat[/]"
        console.print(f"  {op:8s} reconstruction {mark} the naive pseudo-inverse by "
                      f"{gain:+.2f} dB (worst volume)", highlight=False)
    return ok


# -- commands -----------------------------------------------------------------------------------
@app.command()
def data(config: ConfigArg = "default", overrides: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Materialise the offline public data, verify the manifest and prepare the test slices."""
    cfg = prepare(config, overrides, verbose)
    from pipelines.flows import load_data

    out = run_flow(load_data, cfg.to_dict())
    from recon.reconstruction import PreparedVolume

    rows = []
    for v, p in zip(out["volumes"], out["prepared"], strict=True):
        pv = PreparedVolume.open(p)
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

    out = run_flow(train_prior, cfg.to_dict())
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

    ev = run_flow(evaluate, cfg.to_dict())
    print_reconstruction(cfg, ev["rows"])
    where(cfg)


@app.command()
def compare(config: ConfigArg = "default", overrides: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Compare integrators x steps on the same data, seed and measurement."""
    cfg = prepare(config, overrides, verbose)
    from pipelines.flows import compare_integrators

    out = run_flow(compare_integrators, cfg.to_dict())
    print_table(f"integrators on {cfg.compare_operator.name} (same data, seed, measurement)",
                out["rows"], COMPARE_COLUMNS)
    where(cfg)


@app.command()
def pipeline(config: ConfigArg = "default", overrides: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """load_data -> train_prior -> reconstruct -> evaluate, one parent MLflow run."""
    cfg = prepare(config, overrides, verbose)
    from pipelines.flows import pipeline as pipeline_flow

    out = run_flow(pipeline_flow, cfg.to_dict())
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
    prepare(str(path), overrides, verbose)
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


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
