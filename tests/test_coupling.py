"""3-D consistency from the 2-D prior (issue 24): through-plane TV inside the data-consistency
step, a slab sampled as one volume, slabs with a halo that assemble without seams."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recon.classical.total_variation import (
    finite_difference,
    finite_difference_adjoint,
    total_variation,
    tv_prox,
)
from recon.config import CouplingConfig, OperatorConfig, load_config
from recon.metrics import psnr
from recon.operators import build_mask
from recon.reconstruct.coupling import SliceStack, halo_span, is_volume_method, measure_volume
from recon.reconstruct.reconstruction import measure_slices, reconstruct_prepared, slab_ranges
from recon.reconstruct.volumes import read_stacks

DIMS = (-3, -2, -1)


def test_through_plane_differences_are_adjoint_and_not_circular():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64)
    z = torch.randn(3, 2, 5, 6, 7, generator=g, dtype=torch.float64)
    lhs, rhs = (finite_difference(x, DIMS) * z).sum(), (x * finite_difference_adjoint(z, DIMS)).sum()
    assert abs(lhs - rhs) < 1e-10 * abs(lhs)
    ramp = torch.arange(5, dtype=torch.float64)[:, None, None].expand(5, 6, 7)[None]
    dz = finite_difference(ramp, (-3,))[0]
    assert torch.equal(dz[0, 0], torch.zeros(6, 7))  # no wrap from the last slice to the first
    assert torch.equal(dz[0, 1:], torch.ones(4, 6, 7))


def test_tv_prox_with_tv_z_minimises_the_coupled_problem():
    """PDHG's answer has a lower objective than the plain prox and than small perturbations of
    itself, and TV along z alone leaves in-plane structure to the data."""
    g = torch.Generator().manual_seed(1)
    truth = torch.zeros(1, 6, 12, 12, dtype=torch.float64)
    truth[:, :, 3:9, 3:9] = 1.0  # constant along z
    op = build_mask((12, 12), keep=0.6, sigma_y=0.1, seed=0).double()
    y = op.measure(truth, generator=g)
    x0 = truth + 0.3 * torch.randn(truth.shape, generator=g, dtype=torch.float64)
    lam, mu_z = 0.5, 0.2

    def objective(x):
        return float(0.5 * (y - op.forward(x)).square().sum() + 0.5 * lam * (x - x0).square().sum()
                     + mu_z * total_variation(x, (-3,)).sum())

    x = tv_prox(op, x0, y, lam, 0.0, iterations=500, mu_z=mu_z)
    plain = op.prox(x0, y, lam)
    assert objective(x) < 0.9 * objective(plain)
    for _ in range(5):
        assert objective(x) <= objective(x + 1e-3 * torch.randn(x.shape, generator=g,
                                                                 dtype=torch.float64)) + 1e-9
    assert total_variation(x, (-3,)) < 0.5 * total_variation(plain, (-3,))
    assert psnr(x, truth, 1.0) > psnr(plain, truth, 1.0) + 1.0
    with pytest.raises(ValueError, match="volumes"):
        tv_prox(op, x0[:, 0], y[:, 0], lam, 0.0, mu_z=mu_z)


def test_slice_stack_applies_the_2d_network_to_each_slice():
    net = torch.nn.Conv2d(1, 1, 3, padding=1)

    def eps(x, t):
        return net(x) * t[:, None, None, None]

    stack = SliceStack(lambda x, t: eps(x, t))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 0.25])
    out = stack(x, t)
    for n in range(2):
        for s in range(3):
            torch.testing.assert_close(out[n, s], eps(x[n, s][None, None], t[n: n + 1])[0, 0])


def test_a_slab_measures_what_the_whole_volume_measures():
    """Slice operators: the volume's y is measure_slices'; volume operators: a slab's planes
    carry the same noise as the whole volume's at the same slice indices."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 8, 10, 12, generator=g)
    indices = list(range(20, 28))
    mask = build_mask((10, 12), keep=0.5, sigma_y=0.05, seed=3)
    torch.testing.assert_close(measure_volume(mask, x, indices, 7),
                               measure_slices(mask, x.transpose(0, 1), indices, 7).transpose(0, 1))
    drop = OperatorConfig(name="slice_drop", params={"factor": 2})
    whole = measure_volume(drop.build_for((10, 12), indices, 0.05, 0), x, indices, 7)
    part = measure_volume(drop.build_for((10, 12), indices[2:6], 0.05, 0), x[:, 2:6],
                          indices[2:6], 7)
    torch.testing.assert_close(part, whole[:, 2:6])
    assert bool((whole[:, 1] == 0).all()) and bool((whole[:, 0] != 0).any())  # 21 dropped, 20 kept


def test_volume_methods_and_whole_volume_slabs():
    cfg = load_config(None, ["reconstruct.coupling=tv_z"]).reconstruct
    plain = cfg.model_copy(update={"coupling": CouplingConfig()})
    mask, kykz = OperatorConfig(name="mask"), OperatorConfig(name="kykz_fourier")
    assert is_volume_method(mask, cfg) and not is_volume_method(mask, plain)
    assert is_volume_method(kykz, plain)
    assert slab_ranges(10, 4, kykz) == [(0, 10)] and slab_ranges(10, 4, mask)[0] == (0, 4)
    assert halo_span(4, 8, 10, 2) == (2, 10) and halo_span(0, 4, 10, 2) == (0, 6)
    assert "tv_z(0.001)" in cfg.label(mask)
    with pytest.raises(Exception, match="data-consistency"):
        load_config(None, ["reconstruct.coupling=tv_z", "reconstruct.guidance=dps",
                           "reconstruct.operators=[mask]"])
    with pytest.raises(Exception, match="tv_z"):  # the weight lives in reconstruct.coupling
        load_config(None, ["reconstruct.operators=[{name: mask, guidance: {name: "
                           "data_consistency, params: {tv_z: 0.1}}}]"])


@pytest.fixture(scope="module")
def volume(workspace, tmp_path_factory):
    from pipelines import tasks

    cfg = load_config(None, [*workspace["overrides"], "data.max_slices=null",
                             "reconstruct.operators=[{name: mask, params: {keep: 0.5}, "
                             "guidance: data_consistency}]"])
    (vol,) = tasks.list_volumes.fn(str(cfg.data.manifest), str(cfg.data.data_root), "test")
    return cfg, tasks.prepare_volume.fn(vol, cfg.data, str(tmp_path_factory.mktemp("cache")))


@pytest.mark.parametrize("method", ["coupled", "tv3d"])
def test_slabs_with_a_halo_join_without_seams(volume, tmp_path, method):
    """Slabs of 4 slices with a halo of 2 give the whole-volume reconstruction within 0.1 dB,
    and the slices at a slab border differ from each other no more than neighbours elsewhere."""
    cfg, prepared = volume
    from recon.config import BaselineConfig

    settings = cfg.reconstruct.model_copy(update={
        "coupling": CouplingConfig(name="tv_z", weight=0.05, halo=2), "n_samples": 4})
    baseline = BaselineConfig(name="tv3d", params={"lam": 0.01}) if method == "tv3d" else None
    op = settings.operators[0]
    out = {}
    for slab in (None, 4):
        r = reconstruct_prepared(prepared, op, settings.model_copy(update={"slab_slices": slab}),
                                 cfg.prior, tmp_path / str(slab), progress=False, baseline=baseline)
        out[slab] = read_stacks(r["stacks"])
    truth, whole, cut = out[None]["truth"], out[None]["recon"], out[4]["recon"]
    n = len(truth)
    assert n >= 8 and r["slabs"] == 2

    def db(x):
        return float(psnr(torch.from_numpy(x)[:, None].double(), torch.from_numpy(truth)[:, None].double(),
                          float(truth.max())).mean())

    assert abs(db(whole) - db(cut)) < 0.1
    jumps = np.abs(np.diff(cut - truth, axis=0)).mean(axis=(1, 2))  # error change per slice pair
    border = jumps[3]  # slices 3 | 4: the first slab's last and the second's first
    others = np.delete(jumps, 3)
    assert border <= 1.5 * others.mean(), (border, others)


def test_outputs_carry_the_slice_aspect_the_figures_draw_reformats_with(volume, tmp_path):
    from recon.data.slicing import SliceGeometry
    from recon.reconstruct.volumes import PreparedVolume

    cfg, prepared = volume
    out = reconstruct_prepared(prepared, cfg.reconstruct.operators[0], cfg.reconstruct, cfg.prior,
                               tmp_path, progress=False)
    geometry = SliceGeometry.from_dict(PreparedVolume.open(prepared).geometry)
    assert geometry.slice_mm == pytest.approx(3.0)  # the synthetic heads' affine: 2 x 2 x 3 mm
    assert float(read_stacks(out["stacks"])["slice_aspect"]) == pytest.approx(
        3.0 / geometry.pixel_mm)


def test_a_whole_volume_operator_refuses_a_slab(volume, tmp_path):
    from recon.reconstruct.reconstruction import reconstruct_slab

    cfg, prepared = volume
    op = OperatorConfig(name="kykz_fourier", params={"acceleration": 2})
    with pytest.raises(ValueError, match="mixes every slice"):
        reconstruct_slab(prepared, op, cfg.reconstruct, cfg.prior, tmp_path / "s.npz", (0, 2),
                         progress=False)
