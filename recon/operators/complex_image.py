r"""How a real-valued prior sees the complex image of multi-coil k-space (``recon.reconstruct.raw``).

A scanner measures ``y_c = M F (S_c x) + n_c`` of a complex image ``x = rho e^{i phi}``: magnitude
``rho``, phase ``phi`` from B0, fat/water shift, vessels and the coils. The prior models real
images, so one of three image models stands between it and ``A`` (an ``UndersampledFourier`` with
coil maps and complex images), each an operator on the real images the sampler draws:

- ``Magnitude``: ``x = rho``, real, in the frame of the phase absorbed into the maps beforehand
  (``recon.classical.coils.absorb_phase``); each data consistency solves over complex images and keeps
  the magnitude (``UndersampledFourier.prox`` of a real image), so its phase is pulled back to
  that frame at every step. Exact only where the absorbed phase is the image's.
- ``TrackedPhase``: ``x = rho e^{i phi}`` with ``phi`` re-estimated from every data-consistent
  estimate: the prox is centred on ``rho_hat e^{i phi}`` and sets ``phi <- arg x_dc``, one step
  of alternating minimisation of ``||y - A x||^2 / v + w (|x| - rho_hat)^2 / r_t^2`` (a prior on
  the magnitude only, the phase free).
- ``RealImag``: the prior on the real and the imaginary part as two images (channels), the data
  consistency exact over complex images (Chung & Ye, Medical Image Analysis 2022, with a
  magnitude-trained prior). Signed images: the sampler's ``x0_range`` is made symmetric.

Each has ``to_complex(x)`` (the complex image of the sampler's images) and ``from_complex(z)``
(its images of a complex image, e.g. a classical warm start), and says how many image channels
the prior sees per chain (``channels``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from recon.operators.base import Operator, complex_dtype, real_dtype
from recon.operators.fourier import UndersampledFourier

__all__ = ["IMAGE_MODELS", "ComplexImageModel", "Magnitude", "RealImag", "TrackedPhase",
           "image_model"]



class ComplexImageModel(Operator):
    """An ``UndersampledFourier`` over complex images, seen on real images."""

    complex_measurements = True
    channels: int = 1
    signed: bool = False
    """Whether the images may be negative (the ``x0_range`` then runs from ``-hi`` to ``hi``)."""

    def __init__(self, operator: UndersampledFourier):
        if not isinstance(operator, UndersampledFourier) or operator.real_output:
            raise TypeError("an image model wraps an UndersampledFourier over complex images "
                            "(real_output=False)")
        nn.Module.__init__(self)  # sigma_y is the wrapped operator's, not a copy
        self.operator = operator

    @property
    def sigma_y(self) -> float:
        return self.operator.sigma_y

    @sigma_y.setter
    def sigma_y(self, value: float) -> None:
        self.operator.sigma_y = value

    @property
    def support(self) -> Tensor | None:
        return self.operator.support

    def _noise_support(self) -> Tensor:
        return self.operator._noise_support()

    def _check_y_shape(self, y: Tensor) -> None:
        self.operator._check_y_shape(y)

    def measurement_shape(self, x_shape: Sequence[int]) -> torch.Size:
        *lead, c, h, w = (int(s) for s in x_shape)
        return self.operator.measurement_shape((*lead, c // self.channels, h, w))

    def pseudo_inverse(self, y: Tensor) -> Tensor:
        self.check_measurement(y)
        return self.adjoint(y)

    def to_complex(self, x: Tensor) -> Tensor:
        """The complex image ``(N, 1, H, W)`` of the sampler's images ``x``."""
        raise NotImplementedError

    def from_complex(self, z: Tensor) -> Tensor:
        """The sampler's images of the complex image ``z`` ``(N, 1, H, W)``."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget what one ``CondDenoiser.sample`` call carried from step to step (a model with
        state: ``TrackedPhase``); called when a sample starts."""


class Magnitude(ComplexImageModel):
    r"""``x = rho`` ``(N, 1, H, W)``, real, in the maps' frame: ``A_m rho = A rho``,
    ``A_m^H v = Re A^H v``; the prox keeps the magnitude of ``A``'s complex prox of ``rho0``."""

    def to_complex(self, x: Tensor) -> Tensor:
        return x.to(complex_dtype(x.dtype))

    def from_complex(self, z: Tensor) -> Tensor:
        return z.abs()

    def forward(self, x: Tensor) -> Tensor:
        self._check_x_dtype(x)
        return self.operator.forward(self.to_complex(x))

    def adjoint(self, y: Tensor) -> Tensor:
        return self.operator.adjoint(y).real

    def prox(self, x0: Tensor, y: Tensor, lam: float, steps: int = 10, tol: float = 0.0) -> Tensor:
        return self.operator.prox(x0, y, lam, steps, tol)  # real x0: the complex fit's magnitude


class RealImag(ComplexImageModel):
    r"""``x = (Re z, Im z)`` as two channels ``(N, 2, H, W)``: ``A_ri x = A (x_0 + i x_1)``,
    ``A_ri^H v = (Re A^H v, Im A^H v)`` (the adjoint for the real inner product), and the prox is
    ``A``'s complex one: ``argmin ||y - A z||^2 + lam ||z - z0||^2`` is the same problem."""

    channels = 2
    signed = True

    def to_complex(self, x: Tensor) -> Tensor:
        return torch.complex(x[:, 0:1], x[:, 1:2])

    def from_complex(self, z: Tensor) -> Tensor:
        return torch.cat([z.real, z.imag], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        self._check_x_dtype(x)
        return self.operator.forward(self.to_complex(x))

    def adjoint(self, y: Tensor) -> Tensor:
        return self.from_complex(self.operator.adjoint(y))

    def prox(self, x0: Tensor, y: Tensor, lam: float, steps: int = 10, tol: float = 0.0) -> Tensor:
        return self.from_complex(self.operator.prox(self.to_complex(x0), y, lam, steps, tol))


class TrackedPhase(ComplexImageModel):
    r"""``x = rho`` ``(N, 1, H, W)`` with a phase ``phi`` per chain: ``A_phi rho = A (rho e^{i phi})``,
    ``A_phi^H v = Re(e^{-i phi} A^H v)``. ``prox(rho0)`` solves the complex prox centred on
    ``rho0 e^{i phi}``, keeps the phase of its solution for the next call and returns its
    magnitude. ``phi`` starts at 0 (the frame of the maps) or at ``from_complex``'s image, and
    follows a batch of chains that is a whole multiple of its own (``n_samples`` chains per
    measurement, sample-major as ``CondDenoiser`` lays them out)."""

    def __init__(self, operator: UndersampledFourier):
        super().__init__(operator)
        self.phase: Tensor | None = None

    def reset(self) -> None:
        self.phase = None

    def _rotation(self, x: Tensor) -> Tensor | None:
        if self.phase is None:
            return None
        n, p = x.shape[0], self.phase.shape[0]
        if n % p:
            raise ValueError(f"{n} chains cannot share the phases of {p}")
        phase = self.phase.to(x.device, real_dtype(x.dtype)).repeat(n // p, 1, 1, 1)
        return torch.polar(torch.ones_like(phase), phase)

    def to_complex(self, x: Tensor) -> Tensor:
        z = x.to(complex_dtype(x.dtype))
        rotation = self._rotation(x)
        return z if rotation is None else z * rotation

    def from_complex(self, z: Tensor) -> Tensor:
        self.phase = torch.angle(z).detach()
        return z.abs()

    def forward(self, x: Tensor) -> Tensor:
        self._check_x_dtype(x)
        return self.operator.forward(self.to_complex(x))

    def adjoint(self, y: Tensor) -> Tensor:
        z = self.operator.adjoint(y)
        rotation = self._rotation(z.real)
        return (z if rotation is None else z * rotation.conj()).real

    def prox(self, x0: Tensor, y: Tensor, lam: float, steps: int = 10, tol: float = 0.0) -> Tensor:
        z = self.operator.prox(self.to_complex(x0), y, lam, steps, tol)
        return self.from_complex(z)


IMAGE_MODELS = {"magnitude": Magnitude, "tracked_phase": TrackedPhase, "real_imag": RealImag}
"""The image models by the names ``reconstruct.kspace_image`` takes."""


def image_model(operator: UndersampledFourier, name: str) -> ComplexImageModel:
    """The operator the prior's images go through for the image model ``name``
    (``IMAGE_MODELS``)."""
    if name not in IMAGE_MODELS:
        raise ValueError(f"unknown image model {name!r}; valid: {', '.join(IMAGE_MODELS)}")
    return IMAGE_MODELS[name](operator)
