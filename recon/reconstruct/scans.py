r"""Raw k-space scans prepared for reconstruction (``prepare_scan``, cached per file): the
central slices read, the noise whitened (with noise scans) or estimated, the readout
oversampling removed, the reference made; and ``ViewTransform``, the viewer layout the prior
sees each slice in (from the header's directions)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from recon.classical import coils
from recon.data.kspace import LPS_TO_RAS, read_kspace
from recon.data.nifti import atomic_dir
from recon.reconstruct.volumes import PreparedVolume

PREPARE_VERSION = 2
"""Bumped when the preparation changes, so cached prepared scans are not reused."""


# -- orientation ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ViewTransform:
    """The flips and transpose that bring a ``(readout, phase)`` slice to the viewer layout of
    the prior's training slices (``recon.data.loading``: for an axial slice, rows from anterior
    to posterior and columns towards the patient's right; sagittal and coronal likewise, with
    superior up): ``transpose`` first, then ``flip_rows`` / ``flip_cols``."""

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False

    @classmethod
    def from_directions(cls, read_dir: Sequence[float], phase_dir: Sequence[float],
                        slice_dir: Sequence[float]) -> ViewTransform:
        """From the unit vectors of rows, columns and slices (LPS, as in ISMRMRD headers).

        The slice plane's viewer axes are the two RAS axes other than the one closest to the
        slice normal, ``u < v``: columns must run along ``+u`` and rows along ``-v``."""
        read, phase, normal = (LPS_TO_RAS @ np.asarray(d, float)
                               for d in (read_dir, phase_dir, slice_dir))
        a = int(np.argmax(np.abs(normal)))
        u, v = (i for i in range(3) if i != a)
        transpose = bool(abs(read[u]) > abs(read[v]))  # rows run along u: swap them
        rows, cols = (phase, read) if transpose else (read, phase)
        return cls(transpose, flip_rows=bool(rows[v] > 0), flip_cols=bool(cols[u] < 0))

    def apply(self, x: Tensor) -> Tensor:
        """``(..., R, P)`` -> viewer layout."""
        if self.transpose:
            x = x.transpose(-1, -2)
        dims = [d for d, f in ((-2, self.flip_rows), (-1, self.flip_cols)) if f]
        return torch.flip(x, dims) if dims else x

    def invert(self, x: Tensor) -> Tensor:
        """Viewer layout -> ``(..., R, P)``."""
        dims = [d for d, f in ((-2, self.flip_rows), (-1, self.flip_cols)) if f]
        x = torch.flip(x, dims) if dims else x
        return x.transpose(-1, -2) if self.transpose else x


class ViewOriented(nn.Module):
    """``network(x, t)`` evaluated in the viewer layout: ``invert(network(apply(x), t))``."""

    def __init__(self, network: nn.Module, view: ViewTransform):
        super().__init__()
        self.network, self.view = network, view

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.view.invert(self.network(self.view.apply(x), t))


# -- preparation --------------------------------------------------------------------------------
def crop_phase(image: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` columns (phase field of view of ``reconSpace``)."""
    p = image.shape[-1]
    start = p // 2 - size // 2
    return image[..., start: start + size]


@dataclass
class PreparedScan:
    """A prepared raw k-space volume on disk (``prepare_scan``): ``kspace.npy`` ``(S, C, R, P)``
    complex64 (whitened when the file had noise scans, readout oversampling removed),
    ``mask.npy`` ``(S, P)`` acquired lines, ``reference.npy`` ``(S, R, P_recon)`` when there is
    one, and ``meta.json`` (name, source, ``sigma`` = noise std per complex entry, affine,
    viewer transform, reconstructed matrix, the kept slice ``indices``)."""

    directory: Path
    meta: dict

    @classmethod
    def open(cls, directory: str | Path) -> PreparedScan:
        directory = Path(directory)
        meta = json.loads((directory / "meta.json").read_text())
        if meta.get("kind") != "kspace":
            raise ValueError(f"{directory} is not a prepared k-space volume")
        return cls(directory, meta)

    name = property(lambda self: self.meta["name"])
    indices = property(lambda self: [int(i) for i in self.meta["indices"]])
    sigma = property(lambda self: float(self.meta["sigma"]))
    recon_matrix = property(lambda self: tuple(self.meta["recon_matrix"]))
    affine = property(lambda self: np.asarray(self.meta["affine"], float))
    view = property(lambda self: ViewTransform(**self.meta["view"]))
    shape = recon_matrix
    """The reconstructed slice size ``(R, P_recon)``, as ``PreparedVolume.shape``."""

    @property
    def kspace(self) -> np.ndarray:
        return np.load(self.directory / "kspace.npy", mmap_mode="r")

    @property
    def mask(self) -> np.ndarray:
        return np.load(self.directory / "mask.npy")

    @property
    def reference(self) -> np.ndarray | None:
        path = self.directory / "reference.npy"
        return np.load(path) if path.is_file() else None


def open_prepared(directory: str | Path) -> PreparedVolume | PreparedScan:
    """A prepared folder of either kind: NIfTI slices or raw k-space."""
    return PreparedScan.open(directory) if is_scan(directory) else PreparedVolume.open(directory)


def is_scan(directory: str | Path) -> bool:
    """True for a folder made by ``prepare_scan``."""
    meta = Path(directory) / "meta.json"
    return meta.is_file() and json.loads(meta.read_text()).get("kind") == "kspace"


def central_slices(n: int, count: int | None) -> list[int]:
    if count is None or count >= n:
        return list(range(n))
    start = (n - count) // 2
    return list(range(start, start + count))


def prepare_scan(path: str | Path, out_dir: str | Path, max_slices: int | None = None,
                 name: str | None = None) -> Path:
    """Prepare a raw k-space file (see the module docstring) into ``out_dir/<name>-<key>``
    (written to a temporary folder, then renamed; reused when it exists)."""
    path = Path(path)
    name = name or path.stem
    st = path.stat()
    key = hashlib.sha256(json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, max_slices,
                                     PREPARE_VERSION]).encode()).hexdigest()[:12]
    final = Path(out_dir) / f"{name}-{key}"
    if (final / "meta.json").is_file():
        return final
    scan = read_kspace(path)
    indices = central_slices(scan.shape[0], max_slices)
    scan = scan.select(indices)
    k = scan.kspace
    if scan.noise is not None:
        k = coils.whiten(k, coils.whitening_matrix(coils.noise_covariance(scan.noise)))
        sigma, noise = 1.0, "noise scans: whitened"
    else:
        sigma, noise = float(np.sqrt(coils.corner_noise_variance(k, scan.mask))), "k-space corners"
    r, p_recon = scan.recon_matrix
    k = coils.remove_readout_oversampling(k, r).astype(np.complex64)
    if scan.reference is not None and scan.noise is None:
        reference, ref_source = scan.reference, "file (reconstruction_rss)"
    elif scan.fully_sampled:
        reference = crop_phase(coils.rss(coils.centered_ifft(k)), p_recon)
        ref_source = "root-sum-of-squares of the fully sampled data"
    else:
        reference, ref_source = None, "none (undersampled acquisition)"
    with atomic_dir(final) as tmp:
        np.save(tmp / "kspace.npy", k)
        np.save(tmp / "mask.npy", scan.mask)
        if reference is not None:
            np.save(tmp / "reference.npy", np.asarray(reference, np.float32))
        view = ViewTransform.from_directions(scan.read_dir, scan.phase_dir, scan.slice_dir)
        (tmp / "meta.json").write_text(json.dumps({
            "kind": "kspace", "name": name, "source": str(path.resolve()), "format": scan.format,
            "indices": indices, "sigma": sigma, "noise": noise, "reference": ref_source,
            "recon_matrix": list(scan.recon_matrix), "encoded_matrix": list(scan.encoded_matrix),
            "coils": int(k.shape[1]), "acceleration": scan.acceleration,
            "affine": scan.affine().tolist(), "view": view.__dict__,
            "version": PREPARE_VERSION}, indent=1))
    return final
