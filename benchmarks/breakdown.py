"""Where one slice's seconds go, and how close the prior's forward comes to what these cores can do.

One central slice of a test volume per operator (configs/default.yaml's sampler: its warm start,
data consistency with TV inside, n posterior samples) and one slice of a raw multi-coil scan
(configs/kspace.yaml), each reconstructed through `recon.reconstruct.reconstruction.reconstruct_prepared`
exactly as the `reconstruct` flow runs it, with a stopwatch around every part. Each part's time
is exclusive (a prox inside TV's PDHG counts as prox, not TV):

- network: the prior's forward passes (`Denoiser.eps`);
- prox: the data-consistency solve (closed form, or conjugate gradient over the coils);
- tv: total variation inside the data-consistency step (PDHG), its prox calls excluded;
- warm start: the classical solution the chains start from;
- espirit: the coil maps (once per scan and sampling);
- rest: everything else of the slice's wall time (noise, integrator arithmetic, I/O, files).

Then the physical limit: the FLOPs of one forward (`torch.utils.flop_counter`) over its
measured time, against the GFLOP/s a bare 3x3 convolution of the network's own width reaches
on these cores with the same threads, printed as the fraction achieved. All ratios come from
this one run.

    python benchmarks/breakdown.py                        # 2 threads, every operator, a scan
    python benchmarks/breakdown.py --operators fourier --set reconstruct.precision=bf16
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

PARTS = ("network", "prox", "tv", "warm start", "espirit")


class Stopwatch:
    """Exclusive seconds per part: time inside a nested part counts for the inner one only."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list] = []

    @contextlib.contextmanager
    def part(self, name: str):
        now = time.perf_counter()
        if self._stack:  # pause the enclosing part
            outer = self._stack[-1]
            self.seconds[outer[0]] += now - outer[1]
        self._stack.append([name, now])
        try:
            yield
        finally:
            end = time.perf_counter()
            self.seconds[name] += end - self._stack.pop()[1]
            self.calls[name] += 1
            if self._stack:
                self._stack[-1][1] = end

    def wrap_factory(self, owner, attribute: str, name: str, patches: list) -> None:
        """Time every call of the functions ``owner.attribute`` returns as ``name``."""
        original = getattr(owner, attribute)
        watch = self

        def factory(*args, **kwargs):
            made = original(*args, **kwargs)

            def timed(*a, **k):
                with watch.part(name):
                    return made(*a, **k)
            return timed

        patches.append((owner, attribute, original))
        setattr(owner, attribute, factory)

    def wrap(self, owner, attribute: str, name: str, patches: list) -> None:
        """Time every call of ``owner.attribute`` as ``name`` (undone by ``restore``)."""
        original = getattr(owner, attribute)
        watch = self

        def timed(*args, **kwargs):
            with watch.part(name):
                return original(*args, **kwargs)

        patches.append((owner, attribute, original))
        setattr(owner, attribute, timed)


def instrument(watch: Stopwatch) -> list:
    """Patch the library's parts with the stopwatch; returns what ``restore`` undoes."""
    from recon.classical import baselines, coils
    from recon.operators import base, blur, fourier, mask
    from recon.sampling import denoiser, guidance

    patches: list = []
    watch.wrap(denoiser.Denoiser, "eps", "network", patches)
    for cls in (base.Operator, fourier.UndersampledFourier, mask.Mask, blur.Blur):
        if "prox" in vars(cls):
            watch.wrap(cls, "prox", "prox", patches)
        if "proximal" in vars(cls):  # the prox at one y, as TV's PDHG takes it
            watch.wrap_factory(cls, "proximal", "prox", patches)
    watch.wrap(guidance, "tv_prox", "tv", patches)
    watch.wrap(baselines.Baseline, "solve", "warm start", patches)
    watch.wrap(coils, "espirit_maps", "espirit", patches)
    return patches


def restore(patches: list) -> None:
    for owner, attribute, original in reversed(patches):
        setattr(owner, attribute, original)


def physical_limit(network, shape: tuple[int, ...], threads: int, precision: str = "fp32",
                   repeats: int = 3) -> dict:
    """FLOPs of one forward of ``network`` on ``shape``, its time, and a bare 3x3 convolution's
    GFLOP/s at the network's widest channel count on a comparable grid, both in ``precision``
    (``bf16``: under bf16 autocast with channels_last inputs, as the sampler runs)."""
    from torch.utils.flop_counter import FlopCounterMode

    from recon.prior.network import autocast

    torch.set_num_threads(threads)
    fmt = torch.channels_last if precision == "bf16" else torch.contiguous_format
    x, t = torch.randn(shape).contiguous(memory_format=fmt), torch.full((shape[0],), 0.5)
    with torch.inference_mode(), autocast(torch.device("cpu"), precision):
        with FlopCounterMode(display=False) as counter:
            network(x, t)
        flops = counter.get_total_flops()
        network(x, t)
        start = time.perf_counter()
        for _ in range(repeats):
            network(x, t)
        forward = (time.perf_counter() - start) / repeats
        width = max(m.out_channels for m in network.modules() if isinstance(m, torch.nn.Conv2d))
        side = max(16, shape[-1] // 4)
        conv = torch.nn.Conv2d(width, width, 3, padding=1).to(memory_format=fmt)
        z = torch.randn(shape[0], width, side, side).contiguous(memory_format=fmt)
        conv(z)
        start = time.perf_counter()
        for _ in range(repeats):
            conv(z)
        bare = (time.perf_counter() - start) / repeats
    bare_flops = 2 * width * width * 9 * shape[0] * side * side
    return {"flops": flops, "forward_s": forward, "achieved": flops / forward,
            "bare": bare_flops / bare}


def main(argv: list[str] | None = None) -> int:
    from recon.config import load_config
    from recon.data.manifest import load_manifest, resolve
    from recon.prior.network import resolve_precision
    from recon.reconstruct.reconstruction import reconstruct_prepared
    from recon.reconstruct.scans import prepare_scan
    from recon.reconstruct.slices import load_network
    from recon.reconstruct.volumes import prepare_volume

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--kspace-config", default="configs/kspace.yaml")
    p.add_argument("--volume", default="antspyx_r85_t1", help="test image volume")
    p.add_argument("--scan", default="pyqmri_vfa_brain",
                   help="test raw k-space acquisition ('' for none)")
    p.add_argument("--operators", nargs="*", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--kspace-set", dest="kspace_overrides", action="append", default=[],
                   help="an override of the k-space config only")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    common = [*args.overrides, f"reconstruct.num_threads={args.threads}",
              "reconstruct.progress=false"]
    cfg = load_config(args.config, common)
    kcfg = load_config(args.kspace_config, [*common, *args.kspace_overrides]) if args.scan \
        else None
    watch, rows = Stopwatch(), []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ops = [op for op in cfg.reconstruct.operators
               if args.operators is None or op.name in args.operators]
        jobs = []
        if ops:
            manifest = load_manifest(cfg.data.manifest)
            volume = prepare_volume(resolve(manifest.volume(args.volume), cfg.data.data_root),
                                    cfg.data, tmp / "prepared", 1, name=args.volume)
            jobs = [(op.name, volume, op, cfg) for op in ops]
        if args.scan:
            kmanifest = load_manifest(kcfg.data.manifest)
            scan = prepare_scan(resolve(kmanifest.volume(args.scan), kcfg.data.data_root),
                                tmp / "scans", 1, name=args.scan)
            jobs += [(f"{args.scan} {op.name}", scan, op, kcfg)
                     for op in kcfg.reconstruct.operators if op.name == "fourier"]
        load_network(cfg.prior, "cpu")  # loaded once, outside every slice's time
        for label, prepared, op, c in jobs:
            watch.seconds.clear()
            watch.calls.clear()
            patches = instrument(watch)
            try:
                start = time.perf_counter()
                reconstruct_prepared(prepared.directory if hasattr(prepared, "directory")
                                     else prepared, op, c.reconstruct, c.prior,
                                     tmp / "out" / label, progress=False)
                wall = time.perf_counter() - start
            finally:
                restore(patches)
            parts = {k: watch.seconds.get(k, 0.0) for k in PARTS}
            parts["rest"] = wall - sum(parts.values())
            rows.append((label, wall, parts, dict(watch.calls)))
    print(f"\none slice each, {args.threads} threads; seconds (share of the slice's wall time)")
    print("| operator | s / slice | " + " | ".join(PARTS + ("rest",)) + " | forward passes |")
    print("| --- | --- | " + " | ".join("---" for _ in PARTS + ("rest",)) + " | --- |")
    for label, wall, parts, calls in rows:
        cells = " | ".join(f"{v:.2f} ({100 * v / wall:.0f} %)" for v in parts.values())
        print(f"| {label} | {wall:.2f} | {cells} | {calls.get('network', 0)} |")
    network, _ = load_network(cfg.prior, "cpu")
    rs = cfg.reconstruct
    precision = resolve_precision("cpu", rs.precision)
    lim = physical_limit(network, (rs.n_samples, 1, 256, 256), args.threads, precision)
    print(f"\nthe prior's forward ({precision}) on {rs.n_samples} x 1 x 256 x 256: "
          f"{lim['flops'] / 1e9:.2f} GFLOP in "
          f"{lim['forward_s'] * 1e3:.0f} ms = {lim['achieved'] / 1e9:.1f} GFLOP/s; a bare 3x3 "
          f"convolution of its width reaches {lim['bare'] / 1e9:.1f} GFLOP/s on these "
          f"{args.threads} threads: {100 * lim['achieved'] / lim['bare']:.0f} % achieved")
    return 0


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"{time.perf_counter() - start:.0f} s")
    raise SystemExit(code)
