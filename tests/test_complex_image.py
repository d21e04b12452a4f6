"""The image models between a real prior and multi-coil k-space of a complex image
(``recon.operators.complex_image``): adjoint, exact prox, the phase they can and cannot
represent, the baselines seen through them, and a scan reconstructed with each."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch

from recon.classical.baselines import Sense
from recon.config import OperatorConfig, PriorSection, ReconstructSection
from recon.operators import UndersampledFourier, birdcage_maps, cartesian_mask
from recon.operators.complex_image import (
    IMAGE_MODELS,
    Magnitude,
    RealImag,
    TrackedPhase,
    image_model,
)
from recon.prior.network import PerChannel
from recon.reconstruct.raw import x0_range_for

SHAPE = (12, 10)


def fourier(full: bool = False, coils: int = 3) -> UndersampledFourier:
    mask = torch.ones(SHAPE, dtype=torch.bool) if full else cartesian_mask(SHAPE, 2, 0.3,
                                                                            generator=0)
    return UndersampledFourier(mask, birdcage_maps(SHAPE, coils)).double()


def complex_image(n: int = 1, seed: int = 0) -> torch.Tensor:
    """A magnitude with texture and a phase with a step of 2 rad across the middle."""
    g = torch.Generator().manual_seed(seed)
    rho = 0.5 + torch.rand(n, 1, *SHAPE, generator=g, dtype=torch.float64)
    phase = 0.3 * torch.randn(n, 1, *SHAPE, generator=g, dtype=torch.float64)
    phase[..., SHAPE[1] // 2:] += 2.0
    return torch.polar(rho, phase)


@pytest.mark.parametrize("name", list(IMAGE_MODELS))
def test_each_image_model_is_adjoint_for_the_real_inner_product(name):
    """``Re <A x, v> = <x, A^H v>`` for real images of the model's channels (the tracked phase
    set from a complex image first)."""
    model = image_model(fourier(), name)
    if isinstance(model, TrackedPhase):
        model.from_complex(complex_image(2, seed=3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, model.channels, *SHAPE, generator=g, dtype=torch.float64)
    v = torch.randn(model.measurement_shape(x.shape), generator=g, dtype=torch.complex128)
    lhs = torch.sum(model.forward(x).conj() * v).real
    rhs = torch.sum(x * model.adjoint(v))
    assert abs(lhs - rhs) / abs(lhs) < 1e-10
    assert model.adjoint(v).shape == x.shape and not model.adjoint(v).is_complex()


def test_real_imag_prox_is_the_exact_complex_prox():
    """The minimiser of ``||y - A z||^2 + lam ||z - z0||^2`` over complex images, on (Re, Im):
    its gradient vanishes."""
    op = fourier()
    model = RealImag(op)
    noise = torch.randn(1, 1, 3, *SHAPE, dtype=torch.complex128,
                        generator=torch.Generator().manual_seed(2))
    y = op.forward(complex_image(seed=1)) + 0.01 * noise * op.mask
    z0 = complex_image(seed=4)
    lam = 0.3
    x = model.prox(model.from_complex(z0), y, lam, steps=200)
    z = model.to_complex(x)
    grad = op.adjoint(op.forward(z) - y) + lam * (z - z0)
    assert float(grad.abs().max()) < 1e-9


def test_tracked_phase_finds_a_phase_the_magnitude_model_cannot_represent():
    """Fully sampled, noiseless data of ``rho e^{i phi}`` with a phase step; each prox centred
    on the true magnitude. The magnitude model pulls the phase back to the maps' frame every
    time and keeps a biased magnitude (``rho |cos(phi / 2)|`` after one step); the tracked phase
    converges to the image itself, and so does the real/imaginary model from the complex
    image's own parts."""
    op = fourier(full=True)
    truth = complex_image()
    rho, y = truth.abs(), op.forward(truth)
    magnitude, tracked = Magnitude(op), TrackedPhase(op)
    out = magnitude.prox(rho, y, 1.0, steps=30)
    assert float((out - rho).abs().max()) > 0.3  # biased where the phase is far from 0
    for _ in range(40):
        out = tracked.prox(rho, y, 1.0, steps=30)
    assert float((tracked.to_complex(out) - truth).abs().max()) < 1e-4
    real_imag = RealImag(op)
    np.testing.assert_allclose(real_imag.to_complex(real_imag.prox(
        real_imag.from_complex(truth), y, 1.0, steps=30)).numpy(), truth.numpy(), atol=1e-8)


def test_tracked_phase_follows_each_chain_and_starts_afresh():
    """Chains are sample-major (``n_samples`` copies of a batch of 2): the phase set from the
    batch's complex images is shared by each measurement's chains; after a prox every chain has
    its own; ``reset`` returns to the maps' frame."""
    op = fourier()
    model = TrackedPhase(op)
    z = complex_image(2, seed=5)
    rho = model.from_complex(z)
    chains = rho.repeat(3, 1, 1, 1)
    np.testing.assert_allclose(model.to_complex(chains).numpy(), z.repeat(3, 1, 1, 1).numpy(),
                               rtol=1e-12)
    y = op.forward(z).repeat(3, 1, 1, 1, 1)
    out = model.prox(chains + 0.1 * torch.randn_like(chains), y, 0.5)
    assert model.phase.shape == (6, 1, *SHAPE)
    np.testing.assert_allclose(model.to_complex(out).abs().numpy(), out.numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="cannot share"):
        model.to_complex(torch.ones(4, 1, *SHAPE, dtype=torch.float64))
    model.reset()
    assert model.to_complex(rho).imag.abs().max() == 0


@pytest.mark.parametrize("name", list(IMAGE_MODELS))
def test_a_baseline_through_an_image_model_gives_the_models_images_of_its_solution(name):
    """SENSE solves the complex problem whatever the model: the model's images of the complex
    solution (its magnitude, the tracked phase's magnitude and phase, or Re and Im)."""
    op = fourier()
    y = op.forward(complex_image(seed=6))
    z = Sense(op, 1e-3, iterations=20).solve_complex(y)
    model = image_model(op, name)
    x = Sense(model, 1e-3, iterations=20).solve(y)
    assert x.shape == (1, model.channels, *SHAPE)
    np.testing.assert_allclose(model.to_complex(x).numpy(), (z.abs() if name == "magnitude"
                                                             else z).numpy(), atol=1e-6)


def test_image_models_refuse_what_they_cannot_wrap():
    with pytest.raises(TypeError, match="complex images"):
        RealImag(UndersampledFourier(torch.ones(SHAPE, dtype=torch.bool), real_output=True))
    with pytest.raises(ValueError, match="valid: magnitude, tracked_phase, real_imag"):
        image_model(fourier(), "phase")
    op = fourier()
    model = RealImag(op)
    model.sigma_y = 0.25  # the wrapped operator's noise level, not a copy
    assert op.sigma_y == 0.25 and model.support is op.support


def test_per_channel_runs_a_one_channel_prior_on_each_channel():
    net = torch.nn.Conv2d(1, 1, 3, padding=1).double()

    def prior(x, t):
        return net(x) * t.reshape(-1, 1, 1, 1)

    x = torch.randn(2, 2, *SHAPE, dtype=torch.float64)
    t = torch.tensor([0.5, 0.25], dtype=torch.float64)
    out = PerChannel(prior)(x, t)
    for c in range(2):
        np.testing.assert_allclose(out[:, c: c + 1].detach().numpy(),
                                   prior(x[:, c: c + 1], t).detach().numpy(), rtol=1e-12)


def test_x0_range_of_a_scan_makes_room_for_what_it_measured():
    naive = np.full((4, 4), 0.5)
    assert x0_range_for((0.0, 1.5), naive, signed=False) == (0.0, 1.5)
    naive[0, 0] = 3.0  # a bright scalp
    assert x0_range_for((0.0, 1.5), naive, signed=False) == (0.0, 4.5)
    assert x0_range_for((0.0, 1.5), naive, signed=True) == (-4.5, 4.5)
    assert x0_range_for(None, naive, signed=True) is None


@pytest.mark.parametrize("name", list(IMAGE_MODELS))
def test_a_scan_is_reconstructed_with_each_image_model(name, workspace, tmp_path):
    """Through ``reconstruct_prepared`` with the tiny prior: magnitude images with the scan's
    shape, std over 2 samples, finite; the samplers' chains keep their own phase."""
    from recon.data.kspace import write_ismrmrd
    from recon.data.simulate import simulate_scan
    from recon.reconstruct.reconstruction import reconstruct_prepared
    from recon.reconstruct.scans import PreparedScan, prepare_scan

    g = np.meshgrid(*[np.linspace(-1.3, 1.3, n) for n in (24, 20, 3)], indexing="ij")
    head = (g[0] ** 2 + g[1] ** 2 < 1.0) * (100 + 30 * np.sin(4 * g[0]))
    nib.save(nib.Nifti1Image(head.astype(np.float32), np.eye(4)), tmp_path / "head.nii.gz")
    raw = write_ismrmrd(simulate_scan(tmp_path / "head.nii.gz", slices=1, coils=4, noise=0.01,
                                      seed=2), tmp_path / "scan.h5")
    prepared = PreparedScan.open(prepare_scan(raw, tmp_path / "cache"))
    settings = ReconstructSection(n_samples=2, steps=3, progress=False, device="cpu",
                                  warm_start=None, baselines=[], kspace_image=name)
    prior = PriorSection(checkpoint=workspace["checkpoint"], config=workspace["prior_config"])
    out = reconstruct_prepared(prepared.directory, OperatorConfig(name="fourier", params={
        "acceleration": 2, "center_fraction": 0.4}), settings, prior, tmp_path / "out",
        progress=False)
    stacks = np.load(out["stacks"])
    assert stacks["recon"].shape == stacks["truth"].shape and len(stacks["recon"]) == 1
    assert np.isfinite(stacks["recon"]).all() and (stacks["recon"] >= 0).all()
    assert (stacks["std"] >= 0).all() and stacks["std"].max() > 0
    assert not math.isnan(out["seconds"])
