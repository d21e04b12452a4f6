"""Measurement operators ``y = A x + sigma_y n``: masking, blur, undersampled (multi-coil) MRI.

Every operator has ``forward`` (A x), ``adjoint`` (A^H y), ``pseudo_inverse`` (naive baseline),
``measure`` (noisy y), ``check_measurement`` and a ``sigma_y`` noise level; see ``base``.

``OPERATORS`` maps the names a config uses to builders ``build(shape, **params, sigma_y, seed)``
that draw the operator's mask/kernel for slices of ``shape`` from ``seed``.
"""

from collections.abc import Callable

from recon.operators.base import Operator, as_generator, complex_dtype, real_dtype
from recon.operators.blur import Blur, build_blur, gaussian_kernel
from recon.operators.fourier import (
    UndersampledFourier,
    birdcage_maps,
    build_acquired,
    build_fourier,
    cartesian_mask,
    fft2c,
    ifft2c,
    variable_density_mask,
)
from recon.operators.mask import (
    Mask,
    box_mask,
    build_mask,
    missing_slices_mask,
    random_pixel_mask,
)

OPERATORS: dict[str, Callable[..., Operator]] = {
    "mask": build_mask, "blur": build_blur, "fourier": build_fourier, "acquired": build_acquired}
"""Operator name -> builder ``(shape, **params, sigma_y=, seed=) -> Operator``; ``acquired``
(raw k-space as measured) takes its sampling from the data (``recon.raw``)."""

__all__ = [
    "OPERATORS",
    "Blur",
    "Mask",
    "Operator",
    "UndersampledFourier",
    "as_generator",
    "birdcage_maps",
    "box_mask",
    "build_acquired",
    "build_blur",
    "build_fourier",
    "build_mask",
    "cartesian_mask",
    "complex_dtype",
    "fft2c",
    "gaussian_kernel",
    "ifft2c",
    "missing_slices_mask",
    "random_pixel_mask",
    "real_dtype",
    "variable_density_mask",
]
