"""The prior adapted to its measurement (``recon.sampling.adaptation.Adapter``): only the normalisation
layers' scale and shift move, the prior itself is untouched, and the steps lower the data
misfit they are taken on."""

from __future__ import annotations

import pytest
import torch

from recon.config.prior import PriorConfig
from recon.operators import build_fourier
from recon.prior.network import build_network
from recon.sampling.adaptation import Adapter
from recon.sampling.cond_denoiser import CondDenoiser
from recon.sampling.integrator import DiffPIRIntegrator
from recon.sampling.timer import CosineTimer

SIZE = 16


@pytest.fixture(scope="module")
def prior():
    cfg = PriorConfig.model_validate({"network": {
        "channels": [8, 8], "attention_levels": [False, False], "num_res_blocks": 1,
        "norm_num_groups": 4, "num_head_channels": 8, "mid_attention": False},
        "data": {"image_size": SIZE}})
    torch.manual_seed(0)
    diffusion = cfg.diffusion.build()
    network = build_network(cfg.network, diffusion).eval().requires_grad_(False)
    with torch.no_grad():  # MONAI zeroes the output convolution: a trained prior's is not
        for p in network.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return network, diffusion


def test_only_the_norms_scale_and_shift_adapt_and_the_prior_is_untouched(prior):
    network, _ = prior
    before = {k: v.clone() for k, v in network.state_dict().items()}
    adapter = Adapter(network, lr=1e-2)
    assert adapter.names and all(n.endswith((".weight", ".bias")) for n in adapter.names)
    trainable = {n for n, p in adapter.network.named_parameters() if p.requires_grad}
    assert trainable == set(adapter.names)
    x = torch.randn(2, 1, SIZE, SIZE)
    adapter.fit(lambda: adapter(x, torch.full((2,), 0.5)).square().mean(), t=0.5)
    assert adapter.updates == 1 and adapter.seconds > 0
    assert any(not torch.equal(v, before[n]) for n, v in adapter.state().items())
    for k, v in network.state_dict().items():
        assert torch.equal(v, before[k])  # the shared prior did not move
    late = Adapter(network, lr=1e-2, t_max=0.5)
    late.fit(lambda: late(x, torch.full((2,), 0.9)).square().mean(), t=0.9)
    assert late.updates == 0  # above t_max: nothing fitted
    with pytest.raises(ValueError, match="lr > 0"):
        Adapter(network, lr=0.0)


def test_adapting_lowers_the_misfit_it_steps_on(prior):
    """At a fixed x_t, Adam steps on ||y - A x0_hat||^2 / (m sigma^2) lower it, and a sampler
    with an adapter runs (gradients through the network under no_grad elsewhere)."""
    network, diffusion = prior
    op = build_fourier((SIZE, SIZE), acceleration=2, center_fraction=0.25, sigma_y=0.05)
    x_true = torch.zeros(1, 1, SIZE, SIZE)
    x_true[..., 4:12, 3:13] = 1.0
    y = op.measure(x_true, generator=0)
    adapter = Adapter(network, lr=3e-2, iterations=1)
    sampler = CondDenoiser(diffusion, adapter, DiffPIRIntegrator(), CosineTimer(4), op,
                           "data_consistency", adapter=adapter)
    s, sigma = float(diffusion.s(torch.tensor(0.3))), float(diffusion.sigma(torch.tensor(0.3)))
    x_t = s * x_true + sigma * torch.randn(1, 1, SIZE, SIZE, generator=torch.Generator()
                                           .manual_seed(1))
    with torch.no_grad():
        start = float(sampler.misfit(x_t, 0.3, y))
    for _ in range(20):
        adapter.fit(lambda: sampler.misfit(x_t, 0.3, y), t=0.3)
    with torch.no_grad():
        assert float(sampler.misfit(x_t, 0.3, y)) < 0.7 * start
    post = sampler.sample(y, 2, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(post.mean).all() and adapter.updates == 20 + sampler.nfe


def test_a_slab_keeps_its_adapted_prior_beside_it(workspace, tmp_path):
    """``reconstruct.adapt: norms`` through ``reconstruct_prepared``: one adapter for the slab's
    slices (its updates count both slices' evaluations), saved beside the slab with its seconds,
    and named in the volume's summary; the outputs are finite."""
    import nibabel as nib
    import numpy as np

    from recon.config import OperatorConfig, PriorSection, ReconstructSection
    from recon.data.kspace import write_ismrmrd
    from recon.data.simulate import simulate_scan
    from recon.reconstruct.reconstruction import reconstruct_prepared
    from recon.reconstruct.scans import prepare_scan

    g = np.meshgrid(*[np.linspace(-1.3, 1.3, n) for n in (24, 20, 4)], indexing="ij")
    head = (g[0] ** 2 + g[1] ** 2 < 1.0) * (100 + 30 * np.sin(4 * g[0]))
    nib.save(nib.Nifti1Image(head.astype(np.float32), np.eye(4)), tmp_path / "head.nii.gz")
    raw = write_ismrmrd(simulate_scan(tmp_path / "head.nii.gz", slices=2, coils=4, noise=0.01,
                                      seed=2), tmp_path / "scan.h5")
    prepared = prepare_scan(raw, tmp_path / "cache")
    settings = ReconstructSection(n_samples=1, steps=3, progress=False, device="cpu",
                                  warm_start=None, baselines=[],
                                  adapt={"name": "norms", "lr": 1e-3})
    prior = PriorSection(checkpoint=workspace["checkpoint"], config=workspace["prior_config"])
    out = reconstruct_prepared(prepared, OperatorConfig(name="fourier", params={
        "acceleration": 2, "center_fraction": 0.4}), settings, prior, tmp_path / "out",
        progress=False)
    assert len(out["adapters"]) == 1 and out["adapt_seconds"] > 0
    record = torch.load(out["adapters"][0], weights_only=True)
    assert record["updates"] == 2 * 4 and len(record["losses"]) == 8  # 2 slices x 4 evaluations
    assert set(record["state"]) and all(torch.isfinite(v).all() for v in record["state"].values())
    assert np.isfinite(np.load(out["stacks"])["recon"]).all()
    assert "adapt norms(lr=0.001)" in settings.label(OperatorConfig(name="fourier"))
