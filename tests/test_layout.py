"""The module structure: folders in one order, every import pointing down it, no circles.

The folders of recon/ (and pipelines/), from the top down; a module imports only from its own
folder or from a folder lower in this order (operators and sampling stand side by side and
import neither each other):

    cli -> pipelines -> reconstruct -> prior -> data -> operators / sampling -> classical
        -> config -> basics

``cli`` also holds the package's entry points directly in recon/ (``__init__``, ``__main__``,
``demo``); ``basics`` are the few modules there that import nothing of the project
(registry, yaml_io, filelock, allocator, metrics). No other module sits directly in recon/.

The graph is read from the source with ``ast``: every ``import``/``from ... import`` anywhere in
a module (also inside functions, where a circle would otherwise hide) is an arrow from that
module to the project module it names (``from pkg import name`` -> ``pkg.name`` when that is a
module, else ``pkg``). ``if TYPE_CHECKING:`` blocks are left out: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("recon", "pipelines")

ORDER = ("cli", "pipelines", "reconstruct", "prior", "data", "operators / sampling", "classical",
         "config", "basics")
"""The folders from the top down; one rank may hold folders side by side (``a / b``)."""
RANK = {folder: rank for rank, names in enumerate(ORDER) for folder in names.split(" / ")}
ENTRY_POINTS = {"recon", "recon.__main__", "recon.demo"}
"""Modules directly in recon/ that rank with ``cli``: the package's face, ``python -m recon``
and the mixture demo (``recon demo mixture``)."""
BASICS = {"recon.registry", "recon.yaml_io", "recon.filelock", "recon.allocator", "recon.metrics"}
"""Modules directly in recon/ at the bottom of the order."""


def project_modules() -> dict[str, Path]:
    """``{"recon.config": Path(...), "recon.data": .../__init__.py, ...}``."""
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``module`` imports (anywhere in its body)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in known and m != module}


def import_graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {m: imports_of(m, p, set(mods)) for m, p in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle ``[a, b, ..., a]`` or ``None`` (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = dfs(node)
            if cycle:
                return cycle
    return None


def folder_of(module: str) -> str | None:
    """The folder of ``ORDER`` that ``module`` belongs to (``None``: it has no place)."""
    if module in ENTRY_POINTS:
        return "cli"
    if module in BASICS:
        return "basics"
    parts = module.split(".")
    if parts[0] == "pipelines":
        return "pipelines"
    return parts[1] if len(parts) > 2 or parts[1] in RANK else None


def folder_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The arrows between folders: ``{folder: {folders it imports from}}``."""
    folders: dict[str, set[str]] = {}
    for module, deps in graph.items():
        here = folder_of(module)
        folders.setdefault(here, set()).update(
            there for d in deps if (there := folder_of(d)) != here)
    return folders


def arrows_up(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a folder to one at its own rank or above it."""
    return sorted(f"{m} -> {d} ({folder_of(m)} -> {folder_of(d)})"
                  for m, deps in graph.items() for d in deps
                  if folder_of(m) != folder_of(d) and RANK[folder_of(d)] <= RANK[folder_of(m)])


def test_the_graph_is_read():
    graph = import_graph()
    assert "recon.config" in graph["recon.reconstruct.reconstruction"]
    assert "recon.config.prior" in graph["recon.prior.network"]
    # the config schema sits low: it names components through the registry, never imports them
    below = {d for m, deps in graph.items() if m.startswith("recon.config") for d in deps}
    assert {d for d in below if not d.startswith("recon.config")} == {
        "recon.registry", "recon.yaml_io"}
    assert "pipelines.flows" in graph["recon.cli"]  # an import inside a function counts
    assert "pipelines.embedded_api" in graph["recon.cli.runtime"]


def test_find_cycle_catches_a_circle_hidden_in_a_function():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_every_module_has_a_place_in_the_order():
    """Each module is in a folder of ``ORDER``; directly in recon/ only the entry points and
    the allowed basics."""
    assert sorted(m for m in project_modules() if folder_of(m) not in RANK) == []
    top = {f"recon.{p.stem}" for p in (ROOT / "recon").glob("*.py")} - {"recon.__init__"}
    assert top <= ENTRY_POINTS | BASICS, top - ENTRY_POINTS - BASICS
    folders = {d.name for d in (ROOT / "recon").iterdir() if (d / "__init__.py").is_file()}
    assert folders == set(RANK) - {"pipelines", "basics"}


def test_arrows_up_are_caught():
    graph = {"recon.classical.baselines": {"recon.sampling.cond_denoiser", "recon.config.base"},
             "recon.operators.base": {"recon.sampling.guidance", "recon.classical.linalg"},
             "recon.registry": {"recon.demo"}, "recon.reconstruct.raw": {"recon.prior.network"}}
    assert arrows_up(graph) == [
        "recon.classical.baselines -> recon.sampling.cond_denoiser (classical -> sampling)",
        "recon.operators.base -> recon.sampling.guidance (operators -> sampling)",
        "recon.registry -> recon.demo (basics -> cli)"]


def test_every_import_points_down_the_folder_order():
    """No module imports from a folder above its own, nor from one beside it (function-level
    imports included), so no circle can form between folders."""
    graph = import_graph()
    assert arrows_up(graph) == []
    assert find_cycle(folder_graph(graph)) is None
    # the classical solvers share Posterior and real_adjoint with the samplers from below them
    assert folder_graph(graph)["classical"] <= {"config", "basics"}


def test_the_math_does_not_import_the_pipeline():
    """recon/ never imports pipelines/ (only the CLI, at the top, starts flows)."""
    graph = import_graph()
    offenders = sorted(m for m, deps in graph.items() if m.startswith("recon")
                       and not m.startswith("recon.cli") and any(d.startswith("pipelines")
                                                                 for d in deps))
    assert offenders == []


def _imported(args: list[str]) -> tuple[int, set[str], str]:
    """Run ``python -X importtime -m recon ARGS``: (exit code, top-level packages imported,
    stdout)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "recon", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    names = {line.rpartition("|")[2].strip().split(".")[0]
             for line in done.stderr.splitlines() if line.startswith("import time:")}
    return done.returncode, names, done.stdout


def test_help_and_a_refused_config_import_neither_torch_nor_sigpy():
    """``recon --help`` and a config refused for a bad value never import torch or sigpy (the
    config checks names against ``recon.registry``; components are built only once every field
    is valid), so both answer at once."""
    code, names, out = _imported(["--help"])
    assert code == 0 and "reconstruct" in out
    assert not names & {"torch", "sigpy", "monai", "prefect", "mlflow"}, names
    code, names, out = _imported(["config", "demo", "--set", "reconstruct.steps=true"])
    assert code == 2 and "reconstruct.steps" in out, out
    assert not names & {"torch", "sigpy", "monai"}, names


def test_the_seed_names_import_from_recon_lazily():
    """``from recon import CondDenoiser`` (and the other seed names) gives the module's own
    object, imported on first use: ``import recon`` alone loads no torch."""
    import importlib
    import subprocess
    import sys

    import recon

    assert {"DiffusionModel", "VPLinear", "Denoiser", "CondDenoiser", "HeunIntegrator",
            "DPMpp2sIntegrator", "CosineTimer", "KarrasTimer", "DPS", "Mask", "Blur",
            "UndersampledFourier"} <= set(recon.__all__)
    for name in recon.__all__:
        assert getattr(recon, name) is getattr(importlib.import_module(recon._LAZY[name]), name)
    assert set(recon.__all__) <= set(dir(recon))
    done = subprocess.run([sys.executable, "-c", "import sys, recon, recon.registry; "
                           "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done


def test_every_registry_name_resolves_to_its_component():
    """Each name of ``recon.registry`` imports to the object its module defines."""
    import importlib

    from recon import registry

    kinds = [registry.OPERATORS, registry.GUIDANCES, registry.INTEGRATORS, registry.TIMERS,
             registry.BASELINES, registry.DIFFUSIONS]
    for reg in kinds:
        assert len(reg) >= 2 and sorted(reg) == sorted(reg._entries)
        for name in reg:
            module, _, attribute = reg.where(name).partition(":")
            assert reg[name] is getattr(importlib.import_module(module), attribute), name
            assert callable(reg[name]), name
    assert "nope" not in registry.OPERATORS


def test_no_module_is_over_400_lines():
    """One concept per file: every module of recon/ and pipelines/ stays under 400 lines."""
    long = {m: n for m, path in project_modules().items()
            if (n := len(path.read_text().splitlines())) > 400}
    assert long == {}, long
