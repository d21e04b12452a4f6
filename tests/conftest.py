"""Shared fixtures: ground-truth laws whose score is closed-form."""

import sys

import pytest
import torch

from recon.config import load_config
from recon.demo import demo_mixture
from recon.sampling.analytic import GaussianMixture


@pytest.fixture(scope="session")
def mixture_2d() -> GaussianMixture:
    """Three well-separated 2-D components with unequal weights and correlated covariances."""
    return demo_mixture()


@pytest.fixture(scope="session")
def gaussian_16d() -> GaussianMixture:
    """A 16-D Gaussian with a non-diagonal covariance, eigenvalues spread over [0.1, 3.2]."""
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))[0]
    eig = torch.logspace(-1, 0.5, 16, dtype=torch.float64)
    mean = torch.randn(16, generator=g, dtype=torch.float64)
    return GaussianMixture.gaussian(mean, q @ torch.diag(eig) @ q.T)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A synthetic dataset (train/val/test heads), a tiny untrained prior and the config
    overrides that point a run at them (``tests/test_pipelines.py`` has the helpers)."""
    from test_pipelines import SIZE, write_dataset, write_prior

    root = tmp_path_factory.mktemp("pipelines")
    manifest = write_dataset(root)
    ckpt, prior_cfg = write_prior(root)
    overrides = [
        f"work_dir={root / 'work'}", f"data.manifest={manifest}", f"data.data_root={root / 'data'}",
        "data.materialise=false", f"data.image_size={SIZE}", "data.max_slices=2",
        f"prior.checkpoint={ckpt}", f"prior.config={prior_cfg}",
        "reconstruct.operators=[{name: mask, params: {keep: 0.5}, guidance: data_consistency}, "
        "{name: fourier, params: {acceleration: 4, center_fraction: 0.08}, guidance: data_consistency}]",
        "reconstruct.steps=3", "reconstruct.n_samples=2", "reconstruct.batch_size=1",
        # the tiny sampler of these tests, not the shipped one (no TV warm start, no baselines)
        "data.normalise=percentile", "reconstruct.integrator=heun", "reconstruct.x0_range=null",
        "reconstruct.warm_start=null", "reconstruct.baselines=[]", "compare.methods=[]",
        "reconstruct.num_threads=1", "reconstruct.progress=false", "reconstruct.device=cpu",
        "compare.integrators=[euler, ddim]", "compare.steps=[2, 3]", "compare.operator=fourier",
        "tracking.experiment=test",
    ]
    return {"root": root, "manifest": manifest, "checkpoint": ckpt, "prior_config": prior_cfg,
            "overrides": overrides, "config": load_config(None, overrides)}


@pytest.fixture(scope="session")
def harness():
    """One temporary Prefect API and database for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session", autouse=True)
def prefects_temporary_server():
    """A CLI command run in this process after Prefect was imported cannot start its embedded
    API (Prefect's settings are fixed by then): its flows run on Prefect's own temporary server,
    which Prefect stops at interpreter exit, logging to the stderr that pytest has closed by then
    ("--- Logging error --- ... I/O operation on closed file"). Stopped here, at the end of the
    session, as Prefect's own test fixtures do."""
    yield
    if "prefect.server.api.server" in sys.modules:
        from prefect.server.api.server import SubprocessASGIServer

        SubprocessASGIServer().stop()
