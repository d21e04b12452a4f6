"""Files read straight out of package archives, without installing or building anything: wheels
and npm tarballs (zip / tar), sdists (tar), Debian packages (``ar`` holding ``data.tar.*``)."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from recon.data.manifest import DataError


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
        return tar_member(deb_data_tar(archive), member, archive.name)
    if name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        with open(archive, "rb") as fh:
            return tar_member(fh.read(), member, archive.name)
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
        data = deb_data_tar(archive) if archive.name.endswith(".deb") else archive.read_bytes()
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


def tar_member(data: bytes, member: str, label: str) -> bytes:
    want = str(PurePosixPath(member))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
        for info in tf:
            if info.isfile() and str(PurePosixPath(info.name.removeprefix("./"))) == want:
                fh = tf.extractfile(info)
                assert fh is not None
                return fh.read()
    raise DataError(f"{label} has no member {member!r}")


def deb_data_tar(deb: Path) -> bytes:
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
                return dpkg_fsys_tarfile(deb)
            return body
        pos += 60 + size + (size % 2)
    raise DataError(f"{deb.name} has no data.tar member")


def dpkg_fsys_tarfile(deb: Path) -> bytes:
    if shutil.which("dpkg-deb") is None:
        raise DataError(f"{deb.name}: zstd-compressed data needs dpkg-deb, which is missing")
    return subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True,
                          capture_output=True).stdout
