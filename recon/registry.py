"""The names a config may use for each kind of component, and where each one lives.

A ``Registry`` maps a name to ``"module:attribute"`` and imports the module only when the
name is looked up (``REGISTRY[name]``), so the config schema can check names without
importing torch or sigpy: ``recon --help`` and a config refused for a bad value stay fast.
Membership, iteration and ``sorted(REGISTRY)`` never import anything.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any


class Registry(Mapping[str, Any]):
    """``name -> "module:attribute"``, resolved (imported) on lookup."""

    def __init__(self, kind: str, entries: Mapping[str, str]):
        self.kind = kind
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> Any:
        module, _, attribute = self._entries[name].partition(":")
        return getattr(importlib.import_module(module), attribute)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def where(self, name: str) -> str:
        """``"module:attribute"`` of ``name``, without importing it."""
        return self._entries[name]

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"


OPERATORS = Registry("operator", {
    "mask": "recon.operators:build_mask", "blur": "recon.operators:build_blur",
    "fourier": "recon.operators:build_fourier", "acquired": "recon.operators:build_acquired",
    "kykz_fourier": "recon.operators:build_kykz_fourier",
    "slice_drop": "recon.operators:build_slice_drop"})
"""Operator name -> builder ``(shape, **params, sigma_y=, seed=) -> Operator``; ``acquired``
(raw k-space as measured) takes its sampling from the data (``recon.reconstruct.raw``). ``kykz_fourier``
(3-D k-space undersampled in (kz, ky)) and ``slice_drop`` (every k-th slice kept) measure
volumes: their ``shape`` is a volume's ``(S, H, W)``, not a slice's ``(H, W)``."""

GUIDANCES = Registry("guidance", {
    "dps": "recon.sampling.guidance:DPS", "tweedie_covariance": "recon.sampling.guidance:TweedieCovariance",
    "mmps": "recon.sampling.guidance:TweedieCovariance",
    "data_consistency": "recon.sampling.guidance:DataConsistency"})

INTEGRATORS = Registry("integrator", {
    "euler": "recon.sampling.integrator:EulerIntegrator",
    "heun": "recon.sampling.integrator:HeunIntegrator",
    "ddim": "recon.sampling.integrator:DDIMIntegrator",
    "dpmpp2s": "recon.sampling.integrator:DPMpp2sIntegrator",
    "diffpir": "recon.sampling.integrator:DiffPIRIntegrator",
    "euler_maruyama": "recon.sampling.integrator:EulerMaruyamaIntegrator"})

TIMERS = Registry("timer", {"linear": "recon.sampling.timer:LinearTimer",
                            "cosine": "recon.sampling.timer:CosineTimer",
                            "karras": "recon.sampling.timer:KarrasTimer"})

BASELINES = Registry("baseline", {"sense": "recon.classical.baselines:Sense",
                                  "tv": "recon.classical.baselines:TotalVariation",
                                  "tv3d": "recon.classical.baselines:TotalVariation3D",
                                  "l1_wavelet": "recon.classical.baselines:L1Wavelet"})

DIFFUSIONS = Registry("diffusion", {"vp_linear": "recon.sampling.diffusion:VPLinear",
                                    "vp_cosine": "recon.sampling.diffusion:VPCosine"})

VOLUME_OPERATORS = frozenset({"kykz_fourier", "slice_drop"})
"""Operators that measure a volume ``(S, H, W)``, not each slice alone: a slab is sampled as one
(``recon.reconstruct.coupling``). Their builders take ``shape=(S, H, W)``; ``slice_drop`` also the slices'
global ``indices``."""
WHOLE_VOLUME_OPERATORS = frozenset({"kykz_fourier"})
"""Volume operators whose every measurement mixes all slices (a Fourier transform along z): the
volume is one slab."""
VOLUME_BASELINES = frozenset({"tv3d"})
"""Baselines that regularise across slices: they solve a slab at once."""
KSPACE_OPERATORS = ("fourier", "acquired")
"""Operators that apply to raw k-space (``recon.reconstruct.raw``), slice by slice: as acquired, or
retrospectively undersampled; ``acquired`` applies to nothing else."""

__all__ = ["BASELINES", "DIFFUSIONS", "GUIDANCES", "INTEGRATORS", "KSPACE_OPERATORS", "OPERATORS",
           "TIMERS", "VOLUME_BASELINES", "VOLUME_OPERATORS", "WHOLE_VOLUME_OPERATORS", "Registry"]
