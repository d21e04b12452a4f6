r"""Classical reconstructions (sigpy): the baselines a diffusion result has to beat.

Both solve, for a batch of real slices and any operator of ``recon.operators``,

    x_hat = argmin_x  1/2 ||A x - y||^2 + lam R(x)

- ``tv``: ``R(x) = ||D x||_1``, anisotropic total variation (``sigpy.linop.FiniteDifference``
  over the slice's two axes), solved by primal-dual hybrid gradient;
- ``l1_wavelet``: ``R(x) = ||W x||_1`` with the Daubechies-4 wavelet ``W``
  (``sigpy.linop.Wavelet``), solved by FISTA with the wavelet soft-threshold as prox, what
  ``sigpy.mri.app.L1WaveletRecon`` does. sigpy's wavelet extends the slice by zeros (a
  redundant frame), so the soft-threshold is the usual approximation of the prox; an
  orthonormal periodic wavelet measured 0.2-0.7 dB worse on validation slices.

- ``sense``: ``R(x) = ||x||^2 / 2`` (Tikhonov), conjugate gradient: SENSE for multi-coil
  k-space, regularised least squares otherwise.

On images they run through ``sigpy.app.LinearLeastSquares``, with the operator wrapped as a
sigpy ``Linop`` over real arrays: complex measurements (k-space) are seen as pairs of real
numbers, so ``A`` maps real images to ``R^{2M}`` with adjoint ``Re(A^H v)``, and the solution is
real as the images are. On raw multi-coil k-space (an ``UndersampledFourier`` with coil maps
and complex images, ``recon.raw``) they are what MRI researchers run: ``sigpy.mri.app``'s
``SenseRecon``, ``TotalVariationRecon`` and ``L1WaveletRecon`` with the operator's maps and
sampling mask, over complex images, of which the magnitude is returned. Each baseline has the
sampler's ``sample(y, n_samples)`` API and returns a ``Posterior`` with zero spread and no
network evaluation, so it runs wherever a sampler does.

``lam`` is chosen on validation slices, never on test data (``select_lambda``): the value of
``LAMBDA_GRID`` (log-spaced) with the best mean PSNR.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import sigpy as sp
import torch
from torch import Tensor

from recon.cond_denoiser import Posterior
from recon.guidance import real_adjoint

LAMBDA_GRID: tuple[float, ...] = tuple(float(v) for v in 10.0 ** np.arange(-4.0, -0.25, 0.5))
"""Candidate ``lam`` for ``select_lambda``: two per decade, 1e-4 to 10^-0.5 (image units [0, 1.5],
``sigma_y`` ~ 0.01: the best values measured on validation slices lie inside, not at an end)."""


class OperatorLinop(sp.linop.Linop):
    """A ``recon.operators`` operator as a sigpy ``Linop`` on real numpy arrays.

    ``forward``: real image ``(B, 1, H, W)`` -> ``A x`` (complex as trailing real pairs);
    ``adjoint``: ``v -> Re(A^H v)``, the adjoint for the real inner product. The operator
    computes on ``device`` (where its mask/kernel live); arrays cross to it and back.
    """

    def __init__(self, operator, ishape: Sequence[int], adjoint: bool = False,
                 device: torch.device | str = "cpu"):
        self.operator, self.device = operator, torch.device(device)
        probe = operator.forward(torch.zeros(tuple(ishape), device=self.device))
        self.complex = probe.is_complex()
        yshape = tuple(probe.shape) + ((2,) if self.complex else ())
        self.is_adjoint = adjoint
        oshape, ishape = (tuple(ishape), yshape) if adjoint else (yshape, tuple(ishape))
        super().__init__(oshape, ishape)

    def _apply(self, input):
        v = torch.from_numpy(np.ascontiguousarray(input)).to(self.device)
        with torch.no_grad():
            if self.is_adjoint:
                if self.complex:
                    v = torch.view_as_complex(v.contiguous())
                out = real_adjoint(self.operator, v)
            else:
                out = self.operator.forward(v)
                if out.is_complex():
                    out = torch.view_as_real(out)
        return out.cpu().numpy().astype(input.dtype, copy=False)

    def _adjoint_linop(self):
        image = self.oshape if self.is_adjoint else self.ishape
        return OperatorLinop(self.operator, image, adjoint=not self.is_adjoint, device=self.device)


class Baseline:
    """``argmin_x 1/2 ||A x - y||^2 + lam R(x)`` by ``iterations`` sigpy iterations."""

    name: str = ""

    #: default iterations: enough for the objective to settle on 256 x 256 slices
    iterations: int = 100
    #: network evaluations and vector-Jacobian products: none (the sampler API's counters)
    nfe: int = 0
    vjp: int = 0

    def __init__(self, operator, lam: float | None = None, iterations: int | None = None):
        iterations = type(self).iterations if iterations is None else iterations
        if lam is not None and not (math.isfinite(float(lam)) and float(lam) >= 0):
            raise ValueError(f"lam must be a finite number >= 0 (or null: chosen on the "
                             f"validation split), got {lam}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or not \
                1 <= iterations <= 10_000:
            raise ValueError(f"iterations must be an integer in [1, 10000], got {iterations!r}")
        self.operator = operator
        self.lam = None if lam is None else float(lam)
        self.iterations = iterations

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lam={self.lam}, iterations={self.iterations})"

    def problem(self, ishape: tuple[int, ...], lam: float) -> dict:
        """``LinearLeastSquares`` keywords for the regulariser on images of ``ishape``:
        ``proxg``, ``G``, solver."""
        raise NotImplementedError

    #: the ``sigpy.mri.app`` class for multi-coil k-space
    mri_app: str = ""

    def solve(self, y: Tensor, lam: float | None = None) -> Tensor:
        """The minimiser for a batch of measurements ``y`` (real images like ``Re(A^H y)``; the
        magnitude of the complex image for multi-coil k-space)."""
        lam = self.lam if lam is None else lam
        if lam is None:
            raise ValueError(f"{self.name}: lam is not set; choose it on validation slices "
                             f"(recon.baselines.select_lambda)")
        if _multicoil_complex(self.operator):
            return self._solve_mri(y, lam)
        with torch.no_grad():
            x_like = real_adjoint(self.operator, y)
        ishape = tuple(x_like.shape)
        A = OperatorLinop(self.operator, ishape, device=x_like.device)
        y_np = (torch.view_as_real(y) if y.is_complex() else y).detach().cpu().numpy()
        x = np.zeros(ishape, dtype=y_np.dtype)
        app = sp.app.LinearLeastSquares(A, y_np, x=x, max_iter=self.iterations, show_pbar=False,
                                        **self.problem(ishape, lam))
        with warnings.catch_warnings():  # sigpy's soft threshold computes 0/0 at exact zeros
            warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
            out = torch.from_numpy(np.asarray(app.run()).real.copy())
        if not torch.isfinite(out).all():
            raise FloatingPointError(f"{self!r} produced non-finite values")
        return out.to(x_like.device, x_like.dtype)

    def _solve_mri(self, y: Tensor, lam: float) -> Tensor:
        """``sigpy.mri.app.<mri_app>`` per measurement of the batch ``y (*B, C, H, W)``:
        returns ``|x|`` of shape ``(*B, H, W)``."""
        import sigpy.mri as mr

        _real_soft_threshold_first()
        maps = self.operator.coil_maps.detach().cpu().numpy()
        weights = self.operator.mask.detach().cpu().numpy().astype(np.float32)
        ys = y.detach().cpu().reshape(-1, *y.shape[-3:]).numpy()
        out = []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
            for yb in ys:
                app = getattr(mr.app, self.mri_app)(yb, maps, lam, weights=weights,
                                                    max_iter=self.iterations, show_pbar=False)
                out.append(np.abs(np.asarray(app.run())))
        x = torch.from_numpy(np.stack(out).astype(np.float32)).reshape(*y.shape[:-3], *y.shape[-2:])
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"{self!r} produced non-finite values")
        return x.to(y.device)

    def sample(self, y: Tensor, n_samples: int = 1, generator: torch.Generator | None = None,
               progress: bool = False, keep_samples: bool = True) -> Posterior:
        """The deterministic solution as a ``Posterior`` (std 0, no network evaluations)."""
        start = time.perf_counter()
        self.operator.check_measurement(y)
        x = self.solve(y)
        return Posterior(mean=x, std=torch.zeros_like(x), samples=x[None] if keep_samples else None,
                         nfe=self.nfe, vjp=self.vjp, seconds=time.perf_counter() - start)


@functools.cache
def _real_soft_threshold_first() -> None:
    """Compile sigpy's soft threshold (a lazily typed numba ufunc) for real images before any
    complex one: once it has a complex loop, numpy hands it real input too (a safe cast) and a
    real TV / L1-wavelet solve in the same process then fails with "Cannot cast array data
    from dtype('complex128') to dtype('float32')"."""
    with warnings.catch_warnings():  # 0/0 at the zero it is compiled on
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        for dtype in (np.float32, np.float64):
            sp.thresh.soft_thresh(0.0, np.zeros(1, dtype))


def _multicoil_complex(operator) -> bool:
    """Raw multi-coil k-space: coil maps and complex images (``recon.raw``)."""
    return getattr(operator, "num_coils", None) is not None and \
        not getattr(operator, "real_output", True)


class Sense(Baseline):
    """``R(x) = ||x||^2 / 2``: Tikhonov-regularised least squares by conjugate gradient (CG
    stopped after ``iterations``: more iterations amplify noise where the coils overlap);
    ``sigpy.mri.app.SenseRecon`` on multi-coil k-space."""

    name = "sense"
    iterations = 30
    mri_app = "SenseRecon"

    def problem(self, ishape, lam):
        return {"lamda": lam, "solver": "ConjugateGradient"}


class TotalVariation(Baseline):
    """``R(x) = ||D x||_1`` (circular finite differences over H and W), primal-dual hybrid
    gradient with dual step 0.1 and primal step ``1 / (0.1 ||[A; D]||^2)``: sigpy's default
    dual step 1 needs about 4x the iterations to reach the same objective."""

    name = "tv"
    iterations = 300
    mri_app = "TotalVariationRecon"

    def problem(self, ishape, lam):
        D = sp.linop.FiniteDifference(ishape, axes=(-2, -1))
        return {"G": D, "proxg": sp.prox.L1Reg(D.oshape, lam), "solver": "PrimalDualHybridGradient",
                "sigma": 0.1}


class L1Wavelet(Baseline):
    """``R(x) = ||W x||_1`` (Daubechies-4 over H and W, ``sigpy.linop.Wavelet``), FISTA with
    the wavelet soft-threshold, as ``sigpy.mri.app.L1WaveletRecon``."""

    name = "l1_wavelet"
    iterations = 150
    mri_app = "L1WaveletRecon"

    def problem(self, ishape, lam):
        W = sp.linop.Wavelet(ishape, axes=(-2, -1), wave_name="db4")
        return {"proxg": sp.prox.UnitaryTransform(sp.prox.L1Reg(W.oshape, lam), W),
                "solver": "GradientMethod", "accelerate": True}


def select_lambda(score: Callable[[float], float],
                  grid: Sequence[float] = LAMBDA_GRID) -> tuple[float, dict[float, float]]:
    """``(best lam, {lam: score(lam)})``: ``score(lam)`` rates the reconstruction of the
    validation slices with ``lam`` (e.g. their mean PSNR; higher is better)."""
    if not grid:
        raise ValueError("the lambda grid is empty")
    scores = {float(lam): float(score(float(lam))) for lam in grid}
    best = max(scores, key=lambda lam: scores[lam])
    return best, scores
