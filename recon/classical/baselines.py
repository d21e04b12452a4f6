r"""Classical reconstructions (sigpy): the baselines a diffusion result has to beat.

Both solve, for a batch of real slices and any operator of ``recon.operators``,

    x_hat = argmin_x  1/2 ||A x - y||^2 + lam R(x)

- ``tv``: ``R(x) = ||D x||_1``, anisotropic total variation (``sigpy.linop.FiniteDifference``
  over the slice's two axes), solved by primal-dual hybrid gradient; ``tv3d``: the same over
  the last three axes (z, H, W) of a volume ``(..., S, H, W)``, for the volume operators;
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
and complex images, ``recon.reconstruct.raw``) they are what MRI researchers run: ``sigpy.mri.app``'s
``SenseRecon``, ``TotalVariationRecon`` and ``L1WaveletRecon`` with the operator's maps and
sampling mask, over complex images, of which the magnitude is returned. Each baseline has the
sampler's ``sample(y, n_samples)`` API and returns a ``Posterior`` with zero spread and no
network evaluation, so it runs wherever a sampler does.

``lam`` is chosen on validation slices, never on test data (``select_lambda``): the value of
``LAMBDA_GRID`` (log-spaced) with the best mean PSNR. Or ``lam: discrepancy``: chosen per
measurement at solve time from its own noise level (``discrepancy_lambda``: Morozov's
``||y - A x_lam||^2 <= tau m sigma_y^2``, or a little above the unregularised fit where that
cannot reach it), since a lam tuned on simulated acquisitions need not transfer to measured
noise and coil maps.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import sigpy as sp
import torch
from torch import Tensor

from recon.classical.linalg import real_adjoint
from recon.classical.posterior import Posterior
from recon.classical.sigpy_linop import OperatorLinop
from recon.config.components import LAM_RULES
from recon.config.components import check_lam as _check_lam

LAMBDA_GRID: tuple[float, ...] = tuple(float(v) for v in 10.0 ** np.arange(-4.0, -0.25, 0.5))
"""Candidate ``lam`` for ``select_lambda``: two per decade, 1e-4 to 10^-0.5 (image units [0, 1.5],
``sigma_y`` ~ 0.01: the best values measured on validation slices lie inside, not at an end);
its ends bound ``discrepancy_lambda``'s search."""

(DISCREPANCY,) = LAM_RULES
"""The ``lam`` that names a rule (``recon.config.components.LAM_RULES``, where the schema checks
it without torch): chosen per measurement at solve time (``discrepancy_lambda``)."""
DISCREPANCY_TAU = 0.9
"""``tau`` of ``discrepancy_lambda``, set on the validation acquisitions at 4x: the lam within
0.2 dB of the best leaves 0.87-1.0 ``m sigma^2`` (SENSE) and 0.88-0.92 (L1-wavelet); tau = 1
over-smooths L1-wavelet by 1-2 dB there (the solution fits part of the noise)."""
DISCREPANCY_KAPPA = 0.03
"""``kappa`` of ``discrepancy_lambda``: where the unregularised fit's residual is near or above
``tau m sigma^2``, lam may add ``kappa m sigma^2`` to it (inside the 0.2 dB window around the
best lam of SENSE and L1-wavelet on each validation acquisition at 8x: 0.016-0.035)."""

log = logging.getLogger(__name__)


class Baseline:
    """``argmin_x 1/2 ||A x - y||^2 + lam R(x)`` by ``iterations`` sigpy iterations."""

    name: str = ""

    #: default iterations: enough for the objective to settle on 256 x 256 slices
    iterations: int = 100
    #: network evaluations and vector-Jacobian products: none (the sampler API's counters)
    nfe: int = 0
    vjp: int = 0

    def __init__(self, operator, lam: float | str | None = None, iterations: int | None = None):
        iterations = type(self).iterations if iterations is None else iterations
        lam = check_lam(lam)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or not \
                1 <= iterations <= 10_000:
            raise ValueError(f"iterations must be an integer in [1, 10000], got {iterations!r}")
        self.operator = operator
        self.lam = lam
        self.iterations = iterations
        #: the lam of each measurement of the last ``solve`` (a rule's choice, or the number)
        self.chosen_lam: list[float] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lam={self.lam}, iterations={self.iterations})"

    def problem(self, ishape: tuple[int, ...], lam: float) -> dict:
        """``LinearLeastSquares`` keywords for the regulariser on images of ``ishape``:
        ``proxg``, ``G``, solver."""
        raise NotImplementedError

    #: the ``sigpy.mri.app`` class for multi-coil k-space
    mri_app: str = ""
    #: start the iterations from ``operator.pseudo_inverse(y)`` instead of zeros
    start_from_naive: bool = False

    def solve(self, y: Tensor, lam: float | str | None = None) -> Tensor:
        """The minimiser for a batch of measurements ``y`` (real images like ``Re(A^H y)``; the
        magnitude of the complex image for multi-coil k-space); ``lam`` a number or a rule of
        ``LAM_RULES`` (applied to each measurement of the batch)."""
        if _image_model(self.operator):  # the prior's images of the solution
            return self.operator.from_complex(self.solve_complex(y, lam))
        if _multicoil_complex(self.operator):
            return self.solve_complex(y, lam).abs()
        lam = self._lam(lam)
        if isinstance(lam, str):  # one lam per measurement of the batch
            self.chosen_lam = []
            return torch.cat([self._by_rule(y[i: i + 1], lam, self._solve_real)
                              for i in range(y.shape[0])])
        self.chosen_lam = [lam] * y.shape[0]
        return self._solve_real(y, lam)

    def _lam(self, lam: float | str | None) -> float | str:
        lam = self.lam if lam is None else check_lam(lam)
        if lam is None:
            raise ValueError(f"{self.name}: lam is not set; choose it on validation slices "
                             f"(recon.classical.baselines.select_lambda) or name a rule ({LAM_RULES})")
        return lam

    def _solve_real(self, y: Tensor, lam: float) -> Tensor:
        with torch.no_grad():
            x_like = real_adjoint(self.operator, y)
        ishape = tuple(x_like.shape)
        A = OperatorLinop(self.operator, ishape, device=x_like.device)
        y_np = (torch.view_as_real(y) if y.is_complex() else y).detach().cpu().numpy()
        x = np.zeros(ishape, dtype=y_np.dtype)
        if self.start_from_naive:
            with torch.no_grad():
                naive = self.operator.pseudo_inverse(y)
            naive = naive.real if naive.is_complex() else naive
            x = np.array(np.broadcast_to(naive.detach().cpu().numpy(), ishape), dtype=y_np.dtype)
        with warnings.catch_warnings(), _seeded_numpy():
            # sigpy's soft threshold computes 0/0 at exact zeros
            warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
            app = sp.app.LinearLeastSquares(A, y_np, x=x, max_iter=self.iterations,
                                            show_pbar=False, **self.problem(ishape, lam))
            out = torch.from_numpy(np.asarray(app.run()).real.copy())
        if not torch.isfinite(out).all():
            raise FloatingPointError(f"{self!r} produced non-finite values")
        return out.to(x_like.device, x_like.dtype)

    @property
    def measured(self):
        """The operator ``y`` is measured through: ``operator``, or for an image model over
        complex images (``recon.operators.complex_image``) the one it wraps."""
        op = self.operator
        return op.operator if _image_model(op) else op

    def _by_rule(self, y: Tensor, rule: str, solve: Callable[[Tensor, float], Tensor]) -> Tensor:
        """``solve(y, lam)`` at the lam ``rule`` chooses for the one measurement ``y``, from the
        residual of the solution itself (complex for multi-coil k-space)."""
        sigma = self.measured.sigma_y
        if not sigma > 0:
            raise ValueError(f"{self.name}: lam {rule!r} needs the noise level, and the "
                             "operator's sigma_y is 0")
        support = self.measured._noise_support()  # the measured entries
        m = y.numel() if support is None else int(torch.broadcast_to(support, y.shape).sum())
        solutions, residuals = {}, {}

        def residual(lam: float) -> float:
            x = solutions[lam] = solve(y, lam)
            with torch.no_grad():
                r = self.measured.forward(x.to(y.device)) - y
            residuals[lam] = float(r.abs().square().sum())
            return residuals[lam]

        lam = discrepancy_lambda(residual, m, sigma)
        self.chosen_lam.append(lam)
        log.info("%s: lam = %.3g by the discrepancy principle: ||y - A x||^2 = %.3f m sigma_y^2 "
                 "(lam = 0: %.3f; %d solves)", self.name, lam, residuals[lam] / (m * sigma**2),
                 residuals.get(0.0, math.nan) / (m * sigma**2), len(residuals),
                 extra={"lam": lam, "baseline": self.name})
        return solutions[lam]

    def solve_complex(self, y: Tensor, lam: float | str | None = None) -> Tensor:
        """Multi-coil k-space ``y (*B, C, H, W)``: the complex solution ``(*B, H, W)`` of
        ``sigpy.mri.app.<mri_app>`` per measurement, ``lam`` a number or a rule (chosen per
        measurement)."""
        if not _multicoil_complex(self.operator):
            raise ValueError(f"{self.name}: solve_complex is for multi-coil k-space with complex "
                             "images (recon.reconstruct.raw); use solve")
        lam = self._lam(lam)
        self.chosen_lam = []
        ys = y.detach().reshape(-1, *y.shape[-3:])
        out = []
        for yb in ys:
            if isinstance(lam, str):
                out.append(self._by_rule(yb, lam, self._solve_mri))
            else:
                out.append(self._solve_mri(yb, lam))
                self.chosen_lam.append(lam)
        x = torch.stack(out).reshape(*y.shape[:-3], *y.shape[-2:])
        return x.to(y.device)

    def _solve_mri(self, y: Tensor, lam: float) -> Tensor:
        """``sigpy.mri.app.<mri_app>`` for one measurement ``y (C, H, W)``: complex ``(H, W)``
        (complex64, on the CPU)."""
        import sigpy.mri as mr

        _real_soft_threshold_first()
        maps = self.measured.coil_maps.detach().cpu().numpy()
        weights = self.measured.mask.detach().cpu().numpy().astype(np.float32)
        with warnings.catch_warnings(), _seeded_numpy():
            warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
            app = getattr(mr.app, self.mri_app)(y.cpu().numpy(), maps, lam, weights=weights,
                                                max_iter=self.iterations, show_pbar=False)
            x = torch.from_numpy(np.asarray(app.run()).astype(np.complex64))
        if not torch.isfinite(torch.view_as_real(x)).all():
            raise FloatingPointError(f"{self!r} produced non-finite values")
        return x

    def sample(self, y: Tensor, n_samples: int = 1, generator: torch.Generator | None = None,
               progress: bool = False, keep_samples: bool = True) -> Posterior:
        """The deterministic solution as a ``Posterior`` (std 0, no network evaluations)."""
        start = time.perf_counter()
        self.operator.check_measurement(y)
        x = self.solve(y)
        return Posterior(mean=x, std=torch.zeros_like(x), samples=x[None] if keep_samples else None,
                         nfe=self.nfe, vjp=self.vjp, seconds=time.perf_counter() - start)


@contextlib.contextmanager
def _seeded_numpy(seed: int = 0):
    """numpy's global generator seeded inside, restored after: sigpy starts its power iteration
    (the largest eigenvalue, hence PDHG's and gradient descent's step) from
    ``np.random.normal``, so without it a solve depends on every random draw made before it
    (a PDHG stopped at 100 iterations moved by up to 2.5e-3 on an image peaking at 1)."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


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


def _image_model(operator) -> bool:
    """An image model over complex images (``recon.operators.complex_image``): the prior's real
    images of the complex image that the operator it wraps (``.operator``) measures. Known by its
    ``from_complex``, as the samplers know an operator by what it does: the classical solvers sit
    below the operators and import none."""
    return hasattr(operator, "from_complex")


def _multicoil_complex(operator) -> bool:
    """Raw multi-coil k-space: coil maps and complex images (``recon.reconstruct.raw``), or an
    image model over them (``recon.operators.complex_image``)."""
    if _image_model(operator):
        operator = operator.operator
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
    #: the image axes the finite differences run over
    axes: tuple[int, ...] = (-2, -1)

    def differences(self, ishape):
        """``D``: the sigpy finite differences over ``axes``."""
        return sp.linop.FiniteDifference(ishape, axes=self.axes)

    def problem(self, ishape, lam):
        D = self.differences(ishape)
        return {"G": D, "proxg": sp.prox.L1Reg(D.oshape, lam), "solver": "PrimalDualHybridGradient",
                "sigma": 0.1}


class TotalVariation3D(TotalVariation):
    """``R(x) = ||D x||_1`` over the volume: finite differences over (S, H, W), the last three
    axes of the image ``Re(A^H y)`` (e.g. ``(1, S, H, W)`` for ``kykz_fourier`` or
    ``slice_drop``), so slices share information through z. Circular in-plane as ``tv``, not
    along z (a slab's first and last slices are not neighbours), as ``recon.classical.total_variation``'s
    through-plane TV. The iterations start from the operator's naive solution (for dropped
    slices: linear interpolation along z), since TV alone reaches a slice without data only
    slowly from zeros, and is indifferent to where a dropped slice lies between its neighbours."""

    name = "tv3d"
    axes = (-3, -2, -1)
    start_from_naive = True

    def differences(self, ishape):
        D = super().differences(ishape)  # (3, *ishape); the z differences first
        keep = np.ones((len(self.axes), *[1] * (len(ishape) - 3), ishape[-3], 1, 1), np.float32)
        keep[0, ..., 0, :, :] = 0.0  # x[0] - x[S - 1]: the wrap-around difference
        return sp.linop.Multiply(D.oshape, keep) * D


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


def check_lam(lam: float | str | None) -> float | str | None:
    """A baseline's ``lam``: a finite number >= 0, a rule of ``LAM_RULES`` or None (chosen on
    the validation split)."""
    return None if lam is None else _check_lam("lam", lam)


def discrepancy_lambda(residual: Callable[[float], float], m: int, sigma: float,
                       tau: float = DISCREPANCY_TAU, kappa: float | None = DISCREPANCY_KAPPA,
                       grid: Sequence[float] = LAMBDA_GRID, bisections: int = 5) -> float:
    r"""The discrepancy principle (Morozov): the largest ``lam`` in ``[min(grid), max(grid)]`` with

        residual(lam) = ||y - A x_lam||^2  <=  max(tau m sigma^2, residual(0) + kappa m sigma^2)

    ``m``: the measured entries of ``y`` (complex ones for k-space); ``sigma^2``: the noise
    variance per entry (the operator's ``sigma_y``: whitened, or estimated from the k-space
    corners, for raw scans); ``x_lam`` the baseline's solution (complex for multi-coil
    k-space). Where the unregularised fit cannot reach ``tau m sigma^2`` (coil-map error, or
    iterations stopped early, at 8x), ``lam`` may add only ``kappa m sigma^2`` to its residual
    (``kappa`` None: plain Morozov, and ``min(grid)`` there). The residual grows with ``lam``:
    both ends of the grid, then ``bisections`` bisections of ``log lam`` (to 1/9 of a decade
    over ``LAMBDA_GRID``, finer than its half decades): at most ``bisections + 3`` solves."""
    target = tau * m * sigma**2
    if kappa is not None:
        target = max(target, residual(0.0) + kappa * m * sigma**2)
    lo, hi = math.log(min(grid)), math.log(max(grid))
    if residual(math.exp(hi)) <= target:
        return math.exp(hi)
    if residual(math.exp(lo)) > target:
        return math.exp(lo)
    for _ in range(bisections):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if residual(math.exp(mid)) <= target else (lo, mid)
    return math.exp(lo)


def select_lambda(score: Callable[[float], float],
                  grid: Sequence[float] = LAMBDA_GRID) -> tuple[float, dict[float, float]]:
    """``(best lam, {lam: score(lam)})``: ``score(lam)`` rates the reconstruction of the
    validation slices with ``lam`` (e.g. their mean PSNR; higher is better)."""
    if not grid:
        raise ValueError("the lambda grid is empty")
    scores = {float(lam): float(score(float(lam))) for lam in grid}
    best = max(scores, key=lambda lam: scores[lam])
    return best, scores
