r"""Slice-batched, streaming posterior reconstruction of volumes, built from a config.

A volume ``(S, H, W)`` is processed ``batch_size`` slices at a time: each slice ``x`` is measured
``y = A x + sigma_y n`` (noise seeded per slice, so the measurement of a slice does not depend
on the batch it falls in), the naive baseline is ``A^+ y`` (``operator.pseudo_inverse``), and
``n_samples`` posterior samples ``x0 ~ p(x0 | y)`` are drawn with a ``CondDenoiser``; the
reconstruction is their mean, the uncertainty their pixel-wise std. Only one batch is in memory
at a time: results stream into ``VolumeBuffer`` (``.npy`` memory maps) and become NIfTI files at
the end, written to a temporary name and renamed.

The config names objects; this module builds them:
``build_operator`` (mask / blur / fourier), ``build_guidance``, ``build_integrator``,
``build_timer``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from recon.cond_denoiser import CondDenoiser
from recon.guidance import Guidance, make_guidance
from recon.integrator import INTEGRATORS, Integrator
from recon.operators import (
    Blur,
    Mask,
    Operator,
    UndersampledFourier,
    birdcage_maps,
    box_mask,
    cartesian_mask,
    gaussian_kernel,
    missing_slices_mask,
    random_pixel_mask,
    variable_density_mask,
)
from recon.timer import TIMERS, Timer


# -- operators ----------------------------------------------------------------------------------
def build_mask(shape: Sequence[int], kind: str = "random", keep: float = 0.3, fraction: float = 0.25,
               drop: float = 0.5, *, sigma_y: float = 0.0, seed: int = 0) -> Mask:
    """``kind="random"``: ``keep`` of the pixels kept; ``"box"``: a centred hole covering
    ``fraction`` of the image; ``"lines"``: ``drop`` of the rows missing."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        m = random_pixel_mask(shape, keep, gen)
    elif kind == "box":
        m = box_mask(shape, fraction, centred=True, generator=gen)
    elif kind == "lines":
        m = missing_slices_mask(shape, drop, axis=-2, generator=gen)
    else:
        raise ValueError(f"unknown mask kind {kind!r}; valid kinds: box, lines, random")
    return Mask(m, sigma_y=sigma_y)


def build_blur(shape: Sequence[int], sigma: float = 1.5, truncate: float = 4.0, *,
               sigma_y: float = 0.0, seed: int = 0) -> Blur:
    """Gaussian blur of std ``sigma`` pixels (circular boundary)."""
    kernel = gaussian_kernel(sigma, truncate)
    if min(kernel.shape) > min(shape):
        raise ValueError(f"blur kernel {tuple(kernel.shape)} (sigma={sigma}, truncate={truncate}) "
                         f"is larger than the image {tuple(shape)}")
    op = Blur(kernel, sigma_y=sigma_y)  # Blur(sigma=...) has no truncate; keep sigma for repr
    op.sigma = float(sigma)
    return op


def build_fourier(shape: Sequence[int], acceleration: float = 4.0, center_fraction: float = 0.08,
                  kind: str = "random", coils: int | None = None, *, sigma_y: float = 0.0,
                  seed: int = 0) -> UndersampledFourier:
    """Undersampled k-space: Cartesian lines (``kind="random"`` / ``"equispaced"``) or a 2-D
    ``"variable_density"`` mask at ``acceleration`` with a fully sampled centre; ``coils``:
    number of synthetic birdcage coil maps (None: single coil). Images are real
    (``real_output=True``), so the naive baseline is the real part of the zero-filled image."""
    gen = torch.Generator().manual_seed(seed)
    if kind in ("random", "equispaced"):
        m = cartesian_mask(shape, acceleration, center_fraction, kind=kind, generator=gen)
    elif kind == "variable_density":
        m = variable_density_mask(shape, acceleration, center_fraction, generator=gen)
    else:
        raise ValueError(f"unknown k-space mask kind {kind!r}; valid kinds: equispaced, random, "
                         "variable_density")
    maps = None
    if coils is not None:
        if isinstance(coils, bool) or not isinstance(coils, int) or coils < 1:
            raise ValueError(f"coils must be a positive integer or null, got {coils!r}")
        maps = birdcage_maps(shape, coils)  # normalised: sum_c |S_c|^2 = 1
    return UndersampledFourier(m, coil_maps=maps, sigma_y=sigma_y, real_output=True)


OPERATOR_BUILDERS: dict[str, Callable[..., Operator]] = {
    "mask": build_mask, "blur": build_blur, "fourier": build_fourier}


def build_operator(name: str, params: dict, shape: Sequence[int], sigma_y: float,
                   seed: int = 0) -> Operator:
    """Operator ``name`` for slices of shape ``(H, W)``; masks drawn from ``seed``."""
    if name not in OPERATOR_BUILDERS:
        raise ValueError(f"unknown operator {name!r}; valid operators: {sorted(OPERATOR_BUILDERS)}")
    try:
        return OPERATOR_BUILDERS[name](tuple(int(s) for s in shape), **params, sigma_y=sigma_y, seed=seed)
    except TypeError as err:
        raise ValueError(f"bad parameters for operator {name!r}: {err}") from err


def build_guidance(name: str, params: dict) -> Guidance:
    return make_guidance(name, **params)


def build_integrator(name: str, params: dict) -> Integrator:
    if name not in INTEGRATORS:
        raise ValueError(f"unknown integrator {name!r}; valid integrators: {sorted(INTEGRATORS)}")
    try:
        return INTEGRATORS[name](**params)
    except TypeError as err:
        raise ValueError(f"bad parameters for integrator {name!r}: {err}") from err


def build_timer(name: str, params: dict, steps: int) -> Timer:
    if name not in TIMERS:
        raise ValueError(f"unknown timer {name!r}; valid timers: {sorted(TIMERS)}")
    try:
        return TIMERS[name](steps, **params)
    except TypeError as err:
        raise ValueError(f"bad parameters for timer {name!r}: {err}") from err


# -- one batch of slices ------------------------------------------------------------------------
@dataclass
class SliceResult:
    """Reconstruction of a batch of slices (arrays ``(B, H, W)`` float32 on the host)."""

    indices: list[int]
    truth: np.ndarray
    naive: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    nfe: int
    seconds: float


def slice_seed(seed: int, index: int, salt: int = 0) -> int:
    """A per-slice seed, stable whatever the batching."""
    return (seed * 1_000_003 + index * 7_919 + salt * 104_729) % (2**63 - 1)


class SliceReconstructor:
    """Measure and reconstruct batches of slices ``(B, 1, H, W)`` with a fixed operator.

    ``measure_seed`` fixes the measurement noise (per slice), ``seed`` the sampler's noise, so
    two reconstructors that differ only in integrator/steps see the same ``y``.
    """

    def __init__(self, network, diffusion, operator: Operator, guidance: Guidance,
                 integrator: Integrator, timer: Timer, n_samples: int = 2, seed: int = 0,
                 measure_seed: int | None = None, device: str | torch.device = "cpu",
                 progress: bool = False):
        self.device = torch.device(device)
        self.operator = operator.to(self.device)
        self.sampler = CondDenoiser(diffusion, network, integrator, timer, self.operator, guidance)
        self.n_samples, self.seed = int(n_samples), int(seed)
        self.measure_seed = self.seed if measure_seed is None else int(measure_seed)
        self.progress = progress

    @property
    def nfe(self) -> int:
        return self.sampler.nfe

    def measure(self, x: Tensor, indices: Sequence[int]) -> Tensor:
        """``y`` for each slice, noise drawn from the slice's own seed."""
        ys = [self.operator.measure(x[i: i + 1], generator=torch.Generator(self.device).manual_seed(
            slice_seed(self.measure_seed, idx, salt=1))) for i, idx in enumerate(indices)]
        return torch.cat(ys)

    def __call__(self, x: Tensor, indices: Sequence[int]) -> SliceResult:
        start = time.perf_counter()
        x = x.to(self.device, torch.float32)
        if x.ndim == 3:
            x = x[:, None]
        y = self.measure(x, indices)
        with torch.no_grad():
            naive = self.operator.pseudo_inverse(y)
        naive = naive.real if naive.is_complex() else naive
        gen = torch.Generator(self.device).manual_seed(slice_seed(self.seed, int(indices[0]), salt=2))
        post = self.sampler.sample(y, self.n_samples, generator=gen, progress=self.progress,
                                   keep_samples=False)

        def host(t: Tensor) -> np.ndarray:
            return t[:, 0].detach().float().cpu().numpy()

        return SliceResult(list(map(int, indices)), host(x), host(naive), host(post.mean),
                           host(post.std), post.nfe, time.perf_counter() - start)


def stream(batches: Iterable[tuple[Sequence[int], Tensor]],
           reconstructor: SliceReconstructor) -> Iterator[SliceResult]:
    """Reconstruct ``(indices, slices)`` batches one at a time (lazy: memory ~ one batch)."""
    for indices, x in batches:
        yield reconstructor(x, indices)


def batched(volume_slices: Callable[[Sequence[int]], Tensor], indices: Sequence[int],
            batch_size: int) -> Iterator[tuple[list[int], Tensor]]:
    """``(indices, volume_slices(indices))`` for consecutive chunks of ``batch_size`` indices."""
    indices = list(indices)
    for i in range(0, len(indices), batch_size):
        chunk = indices[i: i + batch_size]
        yield chunk, volume_slices(chunk)


# -- streaming outputs --------------------------------------------------------------------------
@dataclass
class VolumeBuffer:
    """Disk-backed ``(S, H, W)`` float32 arrays (``.npy`` memory maps) filled batch by batch.

    ``names`` e.g. ``("truth", "naive", "recon", "std")``; positions are given by the slice's
    rank in ``indices``. ``close()`` removes the scratch directory.
    """

    directory: Path
    indices: Sequence[int]
    shape: tuple[int, int]
    names: Sequence[str] = ("truth", "naive", "recon", "std")
    arrays: dict[str, np.memmap] = field(init=False)

    def __post_init__(self):
        self.directory = Path(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._scratch = Path(tempfile.mkdtemp(dir=self.directory, prefix=".stream-"))
        self._rank = {int(i): r for r, i in enumerate(self.indices)}
        n = len(self.indices)
        self.arrays = {name: np.lib.format.open_memmap(self._scratch / f"{name}.npy", mode="w+",
                                                       dtype=np.float32, shape=(n, *self.shape))
                       for name in self.names}

    def write(self, result: SliceResult) -> None:
        rows = [self._rank[i] for i in result.indices]
        fields = {"truth": result.truth, "naive": result.naive, "recon": result.mean,
                  "std": result.std}
        for name in self.names:
            self.arrays[name][rows] = fields[name]

    def close(self) -> None:
        for a in self.arrays.values():
            a.flush()
        self.arrays = {}
        shutil.rmtree(self._scratch, ignore_errors=True)


# -- volumes in, NIfTI out ----------------------------------------------------------------------
@dataclass
class PreparedVolume:
    """Preprocessed slices of one volume on disk (``prepare_volume``): ``slices.npy``
    ``(S, 1, H, W)`` float32 in the prior's units [0, 1], memory-mapped so that reading a batch
    reads only that batch, and ``meta.json``: the volume id, the source file, the kept slice
    ``indices`` (along the RAS slicing axis) and the ``SliceGeometry`` that maps slices back
    onto the source's grid (``recon.data.loading``)."""

    directory: Path
    name: str
    source: str
    indices: list[int]
    geometry: dict

    @property
    def slices(self) -> np.ndarray:
        return np.load(self.directory / "slices.npy", mmap_mode="r")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(n) for n in self.slices.shape[-2:])

    def read(self, ranks: Sequence[int]) -> Tensor:
        """Slices at positions ``ranks`` (0..S-1) as ``(B, 1, H, W)`` float32."""
        return torch.from_numpy(np.ascontiguousarray(self.slices[list(ranks)]))

    @classmethod
    def open(cls, directory: str | Path) -> PreparedVolume:
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file() or not (directory / "slices.npy").is_file():
            raise FileNotFoundError(f"{directory} is not a prepared volume (meta.json/slices.npy)")
        meta = json.loads(meta_path.read_text())
        return cls(directory, meta["name"], meta["source"], [int(i) for i in meta["indices"]],
                   meta["geometry"])

    def to_native(self, stack: np.ndarray, rescale: bool = True) -> np.ndarray:
        """Slices ``(S, H, W)`` back onto the source's grid (other slices 0)."""
        from recon.data.loading import SliceGeometry

        return SliceGeometry.from_dict(self.geometry).to_native(np.asarray(stack), self.indices,
                                                                rescale=rescale)


def prepare_volume(path: str | Path, data, out_dir: str | Path, name: str | None = None) -> Path:
    """Preprocess one NIfTI volume with the prior's transforms (``recon.data.loading``: RAS,
    percentile scaling to [0, 1], slices resized to ``data.image_size``), keep the
    ``data.max_slices`` central foreground slices and store them as a ``PreparedVolume`` in
    ``out_dir/<name>-<key>`` (written to a temporary folder, then renamed)."""
    import hashlib

    from recon.data.loading import SliceConfig, load_volume
    from recon.data.manifest import DataError

    path = Path(path)
    name = name or volume_name(path)
    cfg = SliceConfig(size=data.image_size, axis=data.axis)
    st = path.stat()
    key = hashlib.sha256(json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, cfg.key(),
                                     data.max_slices]).encode()).hexdigest()[:12]
    final = Path(out_dir) / f"{name}-{key}"
    if (final / "meta.json").is_file():
        return final
    vol = load_volume(path, config=cfg, volume_id=name)
    indices = vol.indices(max_slices=data.max_slices)
    if not indices:
        raise DataError(f"volume {name!r}: no slice has enough foreground to reconstruct "
                        f"({path})")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        np.save(tmp / "slices.npy", vol.slices[indices].numpy().astype(np.float32))
        (tmp / "meta.json").write_text(json.dumps({
            "name": name, "source": str(path.resolve()), "indices": indices,
            "geometry": vol.geometry.to_dict(), "slice_config": cfg.key()}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def volume_name(path: str | Path) -> str:
    """``sub-01_T1w`` for ``.../sub-01_T1w.nii.gz``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".mgz", ".npy"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def write_outputs(buffer: VolumeBuffer, prepared: PreparedVolume, out_dir: str | Path) -> dict[str, str]:
    """Write the finished buffers, each file atomically (temporary name, then rename):

    - ``recon.nii.gz``, ``naive.nii.gz``, ``std.nii.gz``: on the *source's* grid with its
      shape, affine and header (``write_nifti(like=source)``), in the source's intensity units
      (std scaled by the same factor); slices that were not reconstructed are 0;
    - ``slices.npz``: ``truth``, ``naive``, ``recon``, ``std`` ``(S, H, W)`` on the prior's grid
      in [0, 1] and the slice ``indices`` (what the metrics and figures use).
    """
    from recon.data.nifti import atomic_path, write_nifti

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stacks = {name: np.asarray(a) for name, a in buffer.arrays.items()}
    lo, hi = prepared.geometry["intensity"]
    paths = {}
    for name in ("recon", "naive", "std"):
        if name == "std":
            native = prepared.to_native(stacks[name], rescale=False) * float(hi - lo)
        else:
            native = prepared.to_native(stacks[name], rescale=True)
        paths[name] = str(write_nifti(native, out_dir / f"{name}.nii.gz", like=prepared.source))
    npz = out_dir / "slices.npz"
    with atomic_path(npz, suffix=".npz") as tmp:
        np.savez_compressed(tmp, indices=np.asarray(prepared.indices), **stacks)
    paths["stacks"] = str(npz)
    return paths


def read_stacks(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a ``slices.npz`` written by ``write_outputs``."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# -- evaluation ---------------------------------------------------------------------------------
def evaluate_stacks(truth: np.ndarray, naive: np.ndarray, recon: np.ndarray,
                    batch_size: int = 64) -> dict[str, object]:
    """PSNR and SSIM per slice and per volume, for the reconstruction and the naive baseline.

    Data range: the volume's ground-truth maximum (fastMRI), the same for every slice. Volume
    PSNR uses the MSE over all kept slices; volume SSIM is the mean of the 2-D slice SSIMs.
    ``gain_db`` = PSNR(recon) - PSNR(naive) per volume.
    """
    from recon.metrics import psnr, ssim

    r = float(np.max(truth))
    if not r > 0:
        raise ValueError("the ground-truth volume is empty (max <= 0): cannot compute PSNR")
    out: dict[str, list[float]] = {"psnr": [], "ssim": [], "psnr_naive": [], "ssim_naive": []}
    sq = {"recon": 0.0, "naive": 0.0}
    n = 0
    for i in range(0, truth.shape[0], batch_size):
        t = torch.from_numpy(np.asarray(truth[i: i + batch_size], dtype=np.float64))[:, None]
        for key, arr in (("", recon), ("_naive", naive)):
            p = torch.from_numpy(np.asarray(arr[i: i + batch_size], dtype=np.float64))[:, None]
            out["psnr" + key] += psnr(p, t, r).tolist()
            out["ssim" + key] += ssim(p, t, r).tolist()
            sq["naive" if key else "recon"] += float((p - t).square().sum())
        n += t.numel()
    vol = {k: 10.0 * np.log10(r * r / max(v / n, 1e-30)) for k, v in sq.items()}
    return {
        "psnr_slices": out["psnr"], "ssim_slices": out["ssim"],
        "psnr_naive_slices": out["psnr_naive"], "ssim_naive_slices": out["ssim_naive"],
        "psnr": float(vol["recon"]), "psnr_naive": float(vol["naive"]),
        "ssim": float(np.mean(out["ssim"])), "ssim_naive": float(np.mean(out["ssim_naive"])),
        "gain_db": float(vol["recon"] - vol["naive"]), "data_range": r,
    }


# -- the prior ----------------------------------------------------------------------------------
def load_network(prior: dict, device: str | torch.device = "auto"):
    """``(network, diffusion)`` from a ``PriorSection`` dict; with ``prior["config"]`` the
    checkpoint must match that network and diffusion config (``CheckpointError`` otherwise)."""
    from recon.network import CheckpointError, load_prior, resolve_device
    from recon.training import load_prior_config

    network_cfg = None
    expected = None
    if prior.get("config"):
        try:
            expected = load_prior_config(prior["config"])
        except FileNotFoundError:
            raise CheckpointError(f"prior config not found: {prior['config']}") from None
        except ValueError as err:
            raise CheckpointError(f"invalid prior config {prior['config']}: {err}") from None
        network_cfg = expected.network
    network, diffusion, cfg = load_prior(prior["checkpoint"], resolve_device(device),
                                         network_cfg=network_cfg, weights=prior.get("weights", "ema"))
    if expected is not None and cfg.diffusion != expected.diffusion:
        raise CheckpointError(f"checkpoint {prior['checkpoint']} was trained with diffusion "
                              f"{cfg.diffusion.model_dump()}, but {prior['config']} says "
                              f"{expected.diffusion.model_dump()}")
    return network, diffusion


# -- one volume, one operator -------------------------------------------------------------------
def reconstruct_prepared(prepared: str | Path, operator: dict, settings: dict, prior: dict,
                         out_dir: str | Path, progress: bool = True) -> dict:
    """Reconstruct every slice of a prepared volume with one operator, ``batch_size`` slices at
    a time, streaming into NIfTI ``truth``/``naive``/``recon``/``std`` in ``out_dir``.

    ``operator``: an ``OperatorConfig`` dict; ``settings``: a ``ReconstructSection`` dict (its
    ``operators`` list is ignored); ``prior``: a ``PriorSection`` dict. Returns the output paths
    and ``nfe``, ``seconds``, ``slices``, ``slices_per_s``; also written to ``summary.json``.
    """
    from tqdm.auto import tqdm

    from recon.config import OperatorConfig, ReconstructSection
    from recon.data.nifti import atomic_write_bytes
    from recon.network import resolve_device

    vol = PreparedVolume.open(prepared)
    op_cfg = OperatorConfig.model_validate(operator)
    rs = ReconstructSection.model_validate({**settings, "operators": [operator]})
    device = resolve_device(rs.device)
    if rs.num_threads is not None and device.type == "cpu":
        torch.set_num_threads(rs.num_threads)
    network, diffusion = load_network(prior, device)
    guidance_cfg = rs.guidance_for(op_cfg)
    op = build_operator(op_cfg.name, op_cfg.params, vol.shape, rs.sigma_y, rs.seed)
    reconstructor = SliceReconstructor(
        network, diffusion, op, build_guidance(guidance_cfg.name, guidance_cfg.params),
        build_integrator(rs.integrator.name, rs.integrator.params),
        build_timer(rs.timer.name, rs.timer.params, rs.steps), n_samples=rs.n_samples,
        seed=rs.seed, device=device, progress=False)
    out_dir = Path(out_dir)
    n = len(vol.indices)
    rank = {idx: r for r, idx in enumerate(vol.indices)}
    buffer = VolumeBuffer(out_dir, vol.indices, vol.shape)
    start = time.perf_counter()
    try:
        batches = batched(lambda idx: vol.read([rank[i] for i in idx]), vol.indices, rs.batch_size)
        # disable=None: no bar when stderr is not a terminal (no \r updates piling up in logs)
        with tqdm(total=n, desc=f"{vol.name} {op_cfg.name}", unit="slice",
                  disable=None if progress else True) as bar:
            for result in stream(batches, reconstructor):
                buffer.write(result)
                bar.update(len(result.indices))
        seconds = time.perf_counter() - start
        paths = write_outputs(buffer, vol, out_dir)
    finally:
        buffer.close()
    summary = {"volume": vol.name, "operator": op_cfg.name, "guidance": guidance_cfg.name,
               "integrator": rs.integrator.label, "steps": rs.steps, "nfe": reconstructor.nfe,
               "n_samples": rs.n_samples, "slices": n, "seconds": seconds,
               "slices_per_s": n / seconds if seconds > 0 else float("nan"),
               "device": str(device)}
    summary_path = atomic_write_bytes(out_dir / "summary.json", json.dumps(summary, indent=1).encode())
    return {**paths, **summary, "summary": str(summary_path)}


# -- data ---------------------------------------------------------------------------------------
def materialise(manifest: str | Path, data_root: str | Path) -> Path:
    """``recon.data.public.materialise``; raises ``DataError`` when a required volume could not
    be produced (the report's table says which)."""
    from recon.data.manifest import DataError
    from recon.data.public import materialise as build

    report = build(manifest, data_root, echo=None)
    if not report.ok:
        raise DataError(f"could not materialise the data under {data_root}:\n{report.table()}")
    return Path(data_root)


def manifest_volumes(manifest: str | Path, data_root: str | Path, split: str,
                     verify: bool = True, ids: Sequence[str] | None = None) -> list[dict[str, str]]:
    """``[{"id", "path"}]`` of the ``split`` volumes (only ``ids``, in that order, when given)
    present under ``data_root``; ``verify`` checks each one (checksum, readable 3-D NIfTI,
    finite voxels) and raises ``DataError`` naming the bad volume before anything is computed."""
    from recon.data.manifest import DataError, load_manifest, resolve
    from recon.data.manifest import verify as check

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
    return [{"id": v.id, "path": str(resolve(v, data_root))} for v in entries]


# -- training -----------------------------------------------------------------------------------
def training_config(cfg) -> dict:
    """The prior config (``cfg.prior.config``) with ``cfg.train`` overrides, as a JSON dict."""
    from recon.training import PriorConfig, load_prior_config

    if cfg.prior.config is None:
        raise ValueError("train.enabled needs prior.config (the network/training config)")
    raw = load_prior_config(cfg.prior.config).model_dump(mode="json")
    for key in ("steps", "batch_size", "lr"):
        value = getattr(cfg.train, key)
        if value is not None:
            raw["training"][key] = value
    raw["data"]["image_size"] = cfg.data.image_size
    return PriorConfig.model_validate(raw).model_dump(mode="json")


def checkpoint_matches(checkpoint: str | Path, prior_cfg: dict) -> bool:
    """True when ``checkpoint`` exists and was trained, to the end, with exactly ``prior_cfg``
    (device and logging cadence aside)."""
    from recon.network import CheckpointError, read_checkpoint
    from recon.training import PriorConfig

    if not Path(checkpoint).is_file():
        return False
    try:
        ckpt = read_checkpoint(checkpoint)
        stored = PriorConfig.model_validate(ckpt["config"]).model_dump(mode="json")
    except (CheckpointError, KeyError, ValueError):
        return False
    ignore = {"device", "log_every", "val_every", "checkpoint_every"}

    def strip(c: dict) -> dict:
        return {**c, "training": {k: v for k, v in c["training"].items() if k not in ignore}}

    return strip(stored) == strip(prior_cfg) and int(ckpt.get("step", -1)) == prior_cfg["training"]["steps"]


def train_and_export(prior_cfg: dict, data_root: str | Path, manifest: str | Path, out_dir: str | Path,
                     resume: bool = True, progress: bool = True, callback=None, axis: int = 2,
                     cache_dir: str | Path | None = None) -> dict:
    """Train with ``recon.training.train_prior`` on the manifest's train/val slices
    (``recon.data.loading.load_slices``), export the EMA weights (a state dict + config,
    loadable with ``load_prior``) to ``out_dir/prior.pt``."""
    from recon.data.loading import load_slices
    from recon.training import PriorConfig, export_prior, train_prior

    cfg = PriorConfig.model_validate(prior_cfg)
    size = cfg.data.image_size
    train = load_slices(manifest, data_root, cfg.data.train_split, size=size, axis=axis,
                        cache_dir=cache_dir)
    if len(train) == 0:
        raise ValueError(f"no training slices in split {cfg.data.train_split!r} of {manifest}")
    val = load_slices(manifest, data_root, cfg.data.val_split, size=size, axis=axis,
                      cache_dir=cache_dir)
    result = train_prior(cfg, train, val if len(val) else None, out_dir, resume=resume,
                         progress=progress, callback=callback)
    exported = export_prior(result.checkpoint, Path(out_dir) / "prior.pt")
    return {"checkpoint": str(exported), "step": result.step, "train_loss": result.train_loss,
            "val_loss": result.val_loss, "seconds": result.seconds}
