"""Data: dataset manifests, the offline public brain MRI set, NIfTI I/O and MONAI loading.

- ``recon.data.manifest``: ``load_manifest``, ``Manifest``, ``resolve``, ``DataError``
  (pydantic-validated YAML manifests, split by subject); ``recon.data.verify``: ``verify``,
  ``verify_volume``, ``sha256_file``; ``recon.data.describe``: entries for new files.
- ``recon.data.public``: ``materialise(manifest_path, data_root)``, also
  ``recon materialise --data-root data/public``.
- ``recon.data.nifti``: ``read_nifti``, ``write_nifti`` (keeps affine and header, atomic).
- ``recon.data.loading`` (imports MONAI): ``slice_dataset``, ``SliceDataset``, ``load_slices``,
  ``load_volume``, ``Volume``; ``recon.data.transforms`` its MONAI transforms;
  ``recon.data.slicing``: ``SliceConfig``, ``SliceGeometry``.

Names are imported on first use, so ``import recon.data`` is cheap (no torch/MONAI).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recon.data.loading import SliceDataset, Volume, load_slices, load_volume, slice_dataset
    from recon.data.manifest import (
        SPLITS,
        DataError,
        Manifest,
        ManifestError,
        VolumeEntry,
        load_manifest,
        resolve,
    )
    from recon.data.nifti import read_nifti, write_nifti
    from recon.data.public import MaterialiseReport, materialise
    from recon.data.slicing import SliceConfig, SliceGeometry
    from recon.data.verify import VolumeCheck, sha256_file, verify, verify_volume

_LAZY = {
    **dict.fromkeys(["SPLITS", "DataError", "Manifest", "ManifestError", "VolumeEntry",
                     "load_manifest", "resolve"], "recon.data.manifest"),
    **dict.fromkeys(["VolumeCheck", "sha256_file", "verify", "verify_volume"], "recon.data.verify"),
    "read_nifti": "recon.data.nifti",
    "write_nifti": "recon.data.nifti",
    "SliceConfig": "recon.data.slicing",
    "SliceDataset": "recon.data.loading",
    "SliceGeometry": "recon.data.slicing",
    "Volume": "recon.data.loading",
    "load_slices": "recon.data.loading",
    "load_volume": "recon.data.loading",
    "slice_dataset": "recon.data.loading",
    "MaterialiseReport": "recon.data.public",
    "materialise": "recon.data.public",
}

__all__ = [
    "SPLITS",
    "DataError",
    "Manifest",
    "ManifestError",
    "MaterialiseReport",
    "SliceConfig",
    "SliceDataset",
    "SliceGeometry",
    "Volume",
    "VolumeCheck",
    "VolumeEntry",
    "load_manifest",
    "load_slices",
    "load_volume",
    "materialise",
    "read_nifti",
    "resolve",
    "sha256_file",
    "slice_dataset",
    "verify",
    "verify_volume",
    "write_nifti",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'recon.data' has no attribute {name!r}")
