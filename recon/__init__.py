"""Diffusion priors for image reconstruction (MRI first).

The sampling core and the measurement operators are importable from here:

    from recon import CondDenoiser, DiffusionModel, HeunIntegrator, UndersampledFourier, VPLinear

Each name is imported from its module on first use (``recon.sampling.*``, ``recon.operators``),
so ``import recon`` and ``recon --help`` load no torch. The folders and their order: README,
"Architecture".
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    **dict.fromkeys(["DiffusionModel", "VPLinear", "VPCosine"], "recon.sampling.diffusion"),
    **dict.fromkeys(["Timer", "LinearTimer", "CosineTimer", "KarrasTimer"], "recon.sampling.timer"),
    **dict.fromkeys(["Integrator", "EulerIntegrator", "HeunIntegrator", "DDIMIntegrator",
                     "DPMpp2sIntegrator", "DiffPIRIntegrator", "EulerMaruyamaIntegrator"],
                    "recon.sampling.integrator"),
    "Denoiser": "recon.sampling.denoiser",
    "CondDenoiser": "recon.sampling.cond_denoiser",
    **dict.fromkeys(["Guidance", "DPS", "TweedieCovariance", "DataConsistency"],
                    "recon.sampling.guidance"),
    "Posterior": "recon.classical.posterior",
    **dict.fromkeys(["Operator", "Mask", "Blur", "UndersampledFourier", "KyKzFourier", "SliceDrop"],
                    "recon.operators"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'recon' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
