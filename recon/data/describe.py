"""Manifest entries for new files (``recon manifest describe``): each file checked as a volume
or a raw k-space scan, its sha256, shape and spacing filled in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
from pydantic import ValidationError

from recon.data.errors import DataError
from recon.data.manifest import VolumeEntry
from recon.data.verify import sha256_file

HDF5_SUFFIXES = (".h5", ".hdf5", ".mrd")
"""Raw k-space file names (ISMRMRD, fastMRI); other files are read as NIfTI."""


def describe_file(path: str | Path, data_root: str | Path, split: str = "train",
                  subject: str = "{id}", modality: str = "unknown") -> dict[str, Any]:
    """A manifest entry for a NIfTI file under ``data_root``: id (the file name without its
    extensions), path, sha256, ``subject`` (``{id}`` is replaced by the id: one subject per
    file), ``split``, ``modality`` (``unknown`` unless given), shape, spacing and orientation;
    add the provenance. An ISMRMRD or fastMRI HDF5 file (read with ``recon.data.kspace``, so it
    is checked as ``manifest check`` would) gives a ``kind: kspace`` entry with its k-space shape
    ``(slices, coils, readout, phase)``. The entry is validated as ``manifest check`` validates
    it: ``DataError`` naming the file and the field otherwise."""
    root = Path(data_root).resolve()
    full = Path(path).resolve()
    if not full.is_relative_to(root):
        raise DataError(f"{full} is not under the data root {root}")
    if split not in ("train", "val", "test"):
        raise DataError(f"split must be train, val or test, got {split!r}")
    if full.is_dir():
        raise DataError(f"{full} is a folder, not a file: give the files in it")
    if not full.is_file():
        raise DataError(f"{full}: no such file")
    vid = full.name.split(".")[0]
    entry = {"id": vid, "path": full.relative_to(root).as_posix(), "sha256": sha256_file(full),
             "subject": subject.replace("{id}", vid), "split": split, "modality": modality}
    _check_entry(full, entry)
    with open(full, "rb") as fh:
        hdf5 = fh.read(8) == b"\x89HDF\r\n\x1a\n"
    if hdf5 or full.name.lower().endswith(HDF5_SUFFIXES):  # raw k-space
        from recon.data.kspace import read_kspace

        scan = read_kspace(full)  # KSpaceError (a DataError) names what it cannot read
        return {**entry, "kind": "kspace", "shape": [int(n) for n in scan.shape]}
    try:
        img = nib.load(full)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise DataError(f"{full}: not a readable NIfTI file ({err})") from None
    return {
        **entry,
        "shape": [int(s) for s in img.shape],
        "spacing": [round(float(z), 4) for z in img.header.get_zooms()[:3]],
        "orientation": "".join(nib.aff2axcodes(img.affine)),
    }


def _check_entry(path: Path, entry: dict[str, Any]) -> None:
    """The entry's fields as ``recon.data.manifest.VolumeEntry`` checks them."""
    try:
        VolumeEntry.model_validate(entry)
    except ValidationError as err:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {_reason(e)}" for e in err.errors())
        raise DataError(f"{path}: its manifest entry would be invalid: {reasons}") from None


def _reason(error: dict) -> str:
    msg = error["msg"].removeprefix("Value error, ")
    given = repr(error.get("input"))
    return msg if given in msg else f"{msg} (got {given})"
