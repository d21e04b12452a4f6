"""What a method gets wrong on a measured multi-coil acquisition, before anything is chosen.

For one slice of each acquisition (default: the measured ones of the k-space manifest, PyQMRI's
test brain and fastMRI's validation T2), retrospectively undersampled as `benchmarks/kspace.py`
does, it prints:

- the noise level sigma: from the k-space corners (what the pipeline uses for files without a
  noise scan), from the background of the fully sampled coil images (E RSS^2 / C outside the
  dilated head) and from the fully sampled coil images' residual off the coil maps (C - 1
  degrees of freedom per pixel inside the maps' support);
- how far the fully sampled, coil-combined image is from real and non-negative after each phase
  rule absorbs its phase into the maps (`recon.reconstruct.raw`: `lowres`, `sense`): its energy in the
  imaginary part inside the head, and the relative error of max(Re, 0) against its magnitude;
- per method (zero-filled, SENSE and L1-wavelet with lam by discrepancy, the diffusion sampler
  under each image model of `recon.operators.complex_image`): the data residual
  ||y - A x||^2 / (m sigma^2) of its complex image (the discrepancy principle aims at 0.9; the
  fully sampled image itself sits where the data's own noise puts it), PSNR whole / inside the
  head / outside it (the background: the noisy RSS's noise floor), and
  the error inside the head split into magnitude (relative, against the fully sampled combined
  image) and phase (RMS radians, magnitude-weighted).

Writes a figure (`--figure`): per acquisition the reference, the phase left after `lowres`, and
each method's magnitude error inside the head.

    python benchmarks/kspace_diagnosis.py                   # configs/kspace.yaml, 4x and 8x
    python benchmarks/kspace_diagnosis.py --volumes fastmri_axt2_kspace --accelerations 4x
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from kspace import ACCELERATIONS  # benchmarks/kspace.py, beside this script
from scipy import ndimage

from recon.classical import coils
from recon.config import BaselineConfig, OperatorConfig, load_config
from recon.data.manifest import load_manifest, resolve
from recon.data.verify import verify
from recon.metrics import head_mask, psnr
from recon.operators.complex_image import IMAGE_MODELS, image_model
from recon.reconstruct.raw import scan_problems, x0_range_for
from recon.reconstruct.reconstruction import sampler_for
from recon.reconstruct.scans import PreparedScan, ViewOriented, crop_phase, prepare_scan

MEASURED = ("pyqmri_vfa_brain", "fastmri_axt2_kspace")


def noise_levels(scan: PreparedScan) -> dict[str, float]:
    """sigma per complex k-space entry (the prepared scan's units) three ways."""
    k = np.asarray(scan.kspace[0])
    full = coils.centered_ifft(k)
    rss = coils.rss(full)
    obj = ndimage.binary_fill_holes(ndimage.binary_dilation(
        rss > 0.1 * np.percentile(rss, 99), iterations=12))
    maps = coils.espirit_maps(k, 24)
    combined = np.sum(np.conj(maps) * full, 0)
    inside = (np.abs(maps) > 0).any(0)
    residual = full - maps * combined[None]
    c = k.shape[0]
    return {"corners": float(np.sqrt(coils.corner_noise_variance(k[None], scan.mask[:1]))),
            "background": float(np.sqrt(np.mean(rss[~obj] ** 2) / c)),
            "coil residual": float(np.sqrt(np.sum(np.abs(residual[:, inside]) ** 2)
                                           / (inside.sum() * (c - 1))))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/kspace.yaml")
    p.add_argument("--volumes", nargs="*", default=list(MEASURED))
    p.add_argument("--accelerations", nargs="*", default=list(ACCELERATIONS))
    p.add_argument("--models", nargs="*", default=list(IMAGE_MODELS), choices=list(IMAGE_MODELS))
    p.add_argument("--figure", default="docs/kspace_diagnosis.png")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [*args.overrides, "reconstruct.progress=false"])
    rs, root = cfg.reconstruct, cfg.data.data_root
    manifest = load_manifest(cfg.data.manifest)
    ok = {c.id for c in verify(manifest, root) if c.status == "ok"}
    panels = []
    with tempfile.TemporaryDirectory() as tmp:
        for vid in args.volumes:
            if vid not in ok:
                print(f"{vid}: not materialised, skipped")
                continue
            scan = PreparedScan.open(prepare_scan(resolve(manifest.volume(vid), root), tmp, 1,
                                                  name=vid))
            sig = noise_levels(scan)
            print(f"\n{vid} ({scan.meta['coils']} coils, {scan.recon_matrix[0]} x "
                  f"{scan.recon_matrix[1]}): sigma " + ", ".join(
                      f"{k} {v / sig['background']:.2f}" for k, v in sig.items())
                  + " (relative to the background's)")
            for acc in args.accelerations:
                op = OperatorConfig(name="fourier", params={**ACCELERATIONS[acc],
                                                            "kind": "random"})
                panels.append((vid, acc, *diagnose(scan, op, rs, cfg.prior, args.models)))
    if args.figure and panels:
        _figure(panels, args.figure)
        print(f"figure: {args.figure}")
    return 0


def diagnose(scan: PreparedScan, op: OperatorConfig, rs, prior, models) -> tuple:
    """Print the phase and method lines of one acquisition under one sampling; returns the
    figure's images."""
    width = scan.recon_matrix[1]
    for phase in ("lowres", "sense"):
        scale, problems = scan_problems(scan, op, rs.seed, phase=phase)
        pr = next(problems)
        full = coils.centered_ifft(np.asarray(scan.kspace[0])) / scale
        combined = crop_phase(np.sum(np.conj(pr.operator.coil_maps.numpy()) * full, 0), width)
        head = head_mask(pr.reference[None])[0]
        mag = np.abs(combined[head])
        imaginary = np.sum(combined.imag[head] ** 2) / np.sum(mag**2)
        real_err = np.linalg.norm(np.maximum(combined.real[head], 0) - mag) / np.linalg.norm(mag)
        print(f"  {op.params['acceleration']}x {phase:6s} phase: fully sampled image "
              f"{100 * imaginary:5.1f} % imaginary, max(Re, 0) off its magnitude by "
              f"{100 * real_err:5.1f} %")
        if phase == "lowres":
            lowres = (pr, combined, head, scale)
    pr, combined, head, scale = lowres
    A, y = pr.operator, pr.y
    m = int(torch.broadcast_to(A._noise_support(), y.shape).sum())
    methods = {"fully sampled": torch.from_numpy(_uncrop(combined, A.mask.shape[-1]))[
        None, None].to(torch.complex64), "zero-filled": A.adjoint(y)}
    for name in ("sense", "l1_wavelet"):
        methods[f"{name} (discrepancy)"] = BaselineConfig(
            name=name, params={"lam": "discrepancy"}).build(A).solve_complex(y)
    for model in models:
        settings = rs.model_copy(update={"kspace_image": model})
        model_op = image_model(A, model)
        make = sampler_for(op, settings, prior, None, torch.device("cpu"),
                           wrap=lambda net, model=model: _wrap(net, scan, model))
        sampler = make(model_op, x0_range_for(rs.x0_range, pr.naive, model_op.signed))
        t0 = time.perf_counter()
        post = sampler.sample(y, rs.n_samples, generator=torch.Generator().manual_seed(0))
        z = model_op.to_complex(post.samples.flatten(0, 1)).mean(0, keepdim=True)
        methods[f"diffusion {model} ({time.perf_counter() - t0:.0f} s)"] = z
    errors = {}
    for name, z in methods.items():
        resid = float((A.forward(z) - y).abs().square().sum()) / (m * A.sigma_y**2)
        x = crop_phase(z[0, 0].detach().numpy(), width)
        whole, inside, outside = (_psnr(np.abs(x)[sel], pr.reference[sel], pr.reference.max())
                                  for sel in (np.ones_like(head), head, ~head))
        ref_mag = np.abs(combined[head])
        mag_err = np.linalg.norm(np.abs(x[head]) - ref_mag) / np.linalg.norm(ref_mag)
        dphi = np.angle(x[head] * np.conj(combined[head]))
        phase_err = np.sqrt(np.sum(ref_mag**2 * dphi**2) / np.sum(ref_mag**2))
        print(f"    {name:34s} ||y - A x||^2 = {resid:5.2f} m sigma^2   PSNR {whole:6.2f} / head "
              f"{inside:6.2f} / outside {outside:6.2f}   head error: magnitude "
              f"{100 * mag_err:5.1f} %, phase {phase_err:.3f} rad")
        errors[name.split(" (")[0]] = np.where(head, np.abs(x) - np.abs(combined), np.nan)
    return pr.reference, np.where(head, np.angle(combined), np.nan), errors


def _uncrop(image: np.ndarray, width: int) -> np.ndarray:
    """``image (R, P_recon)`` back on the encoded phase width (zeros outside)."""
    out = np.zeros((image.shape[0], width), image.dtype)
    start = width // 2 - image.shape[1] // 2
    out[:, start: start + image.shape[1]] = image
    return out


def _wrap(network, scan: PreparedScan, model: str):
    from recon.prior.network import PerChannel

    seen = ViewOriented(network, scan.view)
    return PerChannel(seen) if IMAGE_MODELS[model].channels > 1 else seen


def _psnr(x: np.ndarray, ref: np.ndarray, peak: float) -> float:
    """``recon.metrics.psnr`` of the selected pixels (flat arrays) with the reference's peak."""
    x, ref = (torch.from_numpy(np.ascontiguousarray(a)).reshape(1, 1, 1, -1) for a in (x, ref))
    return float(psnr(x, ref, float(peak))[0])


def _figure(panels, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 2 + max(len(p[4]) for p in panels)
    fig, axes = plt.subplots(len(panels), cols, figsize=(2.2 * cols, 2.4 * len(panels)),
                             squeeze=False)
    for row, (vid, acc, ref, phase, errors) in zip(axes, panels, strict=True):
        for ax in row:
            ax.axis("off")
        row[0].imshow(ref, cmap="gray")
        row[0].set_title(f"{vid}\n{acc}: reference (RSS)", fontsize=7)
        row[1].imshow(phase, cmap="twilight", vmin=-np.pi, vmax=np.pi)
        row[1].set_title("phase after lowres", fontsize=7)
        lim = np.nanpercentile(np.abs(np.concatenate([e[np.isfinite(e)] for e in
                                                      errors.values()])), 99)
        for ax, (name, err) in zip(row[2:], errors.items(), strict=False):
            ax.imshow(err, cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_title(f"{name}\n|x| - |full| (head)", fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"{time.perf_counter() - start:.0f} s")
    raise SystemExit(code)
