"""Timers give decreasing grids with exact end points."""

import pytest
import torch

from recon.sampling.diffusion import VPCosine, VPLinear
from recon.sampling.timer import CosineTimer, KarrasTimer, LinearTimer


@pytest.mark.parametrize("timer_cls", [LinearTimer, CosineTimer, KarrasTimer])
@pytest.mark.parametrize("model", [VPLinear(), VPCosine()], ids=repr)
def test_grid_is_decreasing_with_exact_ends(timer_cls, model):
    t = timer_cls(10, t_min=1e-3).times(model)
    assert t.shape == (11,) and t.dtype == torch.float64
    assert float(t[0]) == model.t_max and float(t[-1]) == 1e-3
    assert (t.diff() < 0).all()


def test_linear_is_uniform_and_cosine_is_denser_near_zero():
    model = VPLinear()
    lin = LinearTimer(8, t_min=0.01, t_max=1.0).times(model)
    torch.testing.assert_close(lin.diff(), torch.full((8,), -0.99 / 8, dtype=torch.float64))
    cos = CosineTimer(8, t_min=0.01, t_max=1.0).times(model)
    steps = -cos.diff()
    assert steps[-1] < steps[0] / 5 and (steps.diff() < 0).all()


def test_karras_grid_is_uniform_in_rho_root_of_noise_level():
    model = VPLinear()
    t = KarrasTimer(12, t_min=1e-3, rho=7.0).times(model)
    nu = torch.exp(-model.log_snr(t)) ** (1 / 7.0)
    torch.testing.assert_close(nu.diff(), nu.diff().mean().expand(12), rtol=1e-6, atol=1e-9)


def test_invalid_grids_name_the_argument():
    with pytest.raises(ValueError, match="steps"):
        LinearTimer(-3)
    with pytest.raises(ValueError, match="steps"):
        LinearTimer(0)
    with pytest.raises(ValueError, match="steps"):
        LinearTimer(2.5)
    with pytest.raises(ValueError, match="t_min"):
        LinearTimer(10, t_min=0.5, t_max=0.5)
    with pytest.raises(ValueError, match="t_min"):
        LinearTimer(10, t_min=0.0)
    with pytest.raises(ValueError, match="t_max"):
        LinearTimer(10, t_max=1.0).times(VPCosine())
    with pytest.raises(ValueError, match="rho"):
        KarrasTimer(10, rho=0.0)
