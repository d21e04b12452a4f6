"""Measurement operators ``y = A x + sigma_y n``, each with its adjoint, naive inverse and noise.

Masking, blur, undersampled (multi-coil) MRI, and on volumes ``(S, H, W)``: (ky, kz)-undersampled
3-D k-space and dropped slices (``volume``).

Every operator has ``forward`` (A x), ``adjoint`` (A^H y), ``pseudo_inverse`` (naive baseline),
``measure`` (noisy y), ``check_measurement`` and a ``sigma_y`` noise level; see ``base``.

The builders ``build_*(shape, **params, sigma_y, seed)`` draw the operator's mask/kernel for
slices of ``shape`` from ``seed``; ``recon.registry.OPERATORS`` names them for configs.
"""

from recon.operators.base import Operator, as_generator, complex_dtype, real_dtype
from recon.operators.blur import Blur, build_blur, gaussian_kernel
from recon.operators.fourier import UndersampledFourier, build_acquired, build_fourier, fft2c, ifft2c
from recon.operators.kspace_patterns import birdcage_maps, cartesian_mask, variable_density_mask
from recon.operators.mask import (
    Mask,
    box_mask,
    build_mask,
    missing_slices_mask,
    random_pixel_mask,
)
from recon.operators.volume import (
    KyKzFourier,
    SliceDrop,
    build_kykz_fourier,
    build_slice_drop,
    fft3c,
    ifft3c,
    kykz_mask,
)

__all__ = [
    "Blur",
    "KyKzFourier",
    "Mask",
    "Operator",
    "SliceDrop",
    "UndersampledFourier",
    "as_generator",
    "birdcage_maps",
    "box_mask",
    "build_acquired",
    "build_blur",
    "build_fourier",
    "build_kykz_fourier",
    "build_mask",
    "build_slice_drop",
    "cartesian_mask",
    "complex_dtype",
    "fft2c",
    "fft3c",
    "gaussian_kernel",
    "ifft2c",
    "ifft3c",
    "kykz_mask",
    "missing_slices_mask",
    "random_pixel_mask",
    "real_dtype",
    "variable_density_mask",
]
