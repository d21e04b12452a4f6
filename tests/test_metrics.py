"""PSNR and SSIM equal scikit-image's on random images, natural images and a real MRI volume."""

import os

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage
import torch
from nibabel.testing import data_path
from skimage import data
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from recon.metrics import evaluate_stacks, head_mask, psnr, ssim

TOL = 1e-4
F64 = torch.float64


def rand(shape, seed, dtype=F64):
    return torch.rand(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def skimage_metrics(pred, target, data_range=None, channel_axis=None):
    """Per-item (psnr, ssim) from skimage for (B, C, ...) tensors, range max - min by default."""
    out_p, out_s = [], []
    for i, (p, t) in enumerate(zip(pred.numpy(), target.numpy(), strict=True)):
        r = float(t.max() - t.min()) if data_range is None else float(np.broadcast_to(
            data_range, (len(pred),))[i])
        if channel_axis is None:
            p, t = p[0], t[0]
        out_p.append(sk_psnr(t, p, data_range=r))
        out_s.append(sk_ssim(t, p, data_range=r, channel_axis=channel_axis))
    return torch.tensor(out_p, dtype=F64), torch.tensor(out_s, dtype=F64)


def assert_matches_skimage(pred, target, data_range=None, channel_axis=None, tol=TOL):
    ref_psnr, ref_ssim = skimage_metrics(pred, target, data_range, channel_axis)
    got_psnr, got_ssim = psnr(pred, target, data_range), ssim(pred, target, data_range)
    assert got_psnr.shape == got_ssim.shape == (pred.shape[0],)
    assert got_psnr.dtype == got_ssim.dtype == F64
    torch.testing.assert_close(got_psnr, ref_psnr, rtol=0, atol=tol)
    torch.testing.assert_close(got_ssim, ref_ssim, rtol=0, atol=tol)


def test_random_images():
    target = rand((3, 1, 24, 28), 0)
    pred = target + 0.2 * rand((3, 1, 24, 28), 1) - 0.1
    assert_matches_skimage(pred, target)


def test_random_images_float32_and_offset_range():
    target = 50 + 200 * rand((2, 1, 20, 20), 0, torch.float32)
    pred = target + 20 * rand((2, 1, 20, 20), 1, torch.float32)
    assert_matches_skimage(pred, target)


def test_multichannel_images_average_channels():
    target = rand((2, 3, 16, 18), 0)
    pred = (target + 0.3 * rand((2, 3, 16, 18), 1)).clamp(0, 1)
    assert_matches_skimage(pred, target, channel_axis=0)


def test_natural_images():
    camera = data.camera()[200:264, 180:244].astype(np.float64) / 255
    phantom = data.shepp_logan_phantom()[150:214, 100:164]
    target = torch.from_numpy(np.stack([camera, phantom])[:, None])
    noisy = target + 0.05 * torch.randn(target.shape, dtype=F64,
                                        generator=torch.Generator().manual_seed(0))
    blurred = torch.from_numpy(scipy.ndimage.gaussian_filter(target.numpy(), (0, 0, 1.5, 1.5)))
    for pred in (noisy, blurred):
        assert_matches_skimage(pred, target)


@pytest.fixture(scope="module")
def mri_volume():
    """A real T1 brain MRI shipped with nibabel (33 x 41 x 25, int16 with some negatives)."""
    vol = np.asanyarray(nib.load(os.path.join(data_path, "anatomical.nii")).dataobj)
    return torch.from_numpy(vol.astype(np.float64))


def test_real_mri_volume_3d(mri_volume):
    target = mri_volume[None, None]
    pred = target + 800 * torch.randn(target.shape, dtype=F64,
                                      generator=torch.Generator().manual_seed(0))
    assert_matches_skimage(pred, target)  # 3-D SSIM with a 7 x 7 x 7 window
    assert target.min() < 0  # max - min differs from max here: the default is max - min
    r = float(target.max())
    assert_matches_skimage(pred, target, data_range=r)


def test_real_mri_slices_fastmri_style(mri_volume):
    """fastMRI's volume SSIM: mean of 2-D slice SSIMs with data_range = volume max."""
    target = mri_volume.permute(2, 0, 1)[:, None]  # (D, 1, H, W) slices as a batch
    pred = target + 800 * torch.randn(target.shape, dtype=F64,
                                      generator=torch.Generator().manual_seed(1))
    r = float(target.max())
    expected = np.mean([sk_ssim(t[0], p[0], data_range=r)
                        for t, p in zip(target.numpy(), pred.numpy(), strict=True)])
    assert abs(ssim(pred, target, data_range=r).mean().item() - expected) < TOL
    assert_matches_skimage(pred, target, data_range=torch.full((target.shape[0],), r))


def test_ssim_inside_a_mask_is_skimages_map_averaged_there(mri_volume):
    """The SSIM map skimage returns (``full=True``), averaged over the mask's pixels whose
    window fits inside the image (skimage crops 3 pixels per side)."""
    target = mri_volume.permute(2, 0, 1)[:3, None]
    pred = target + 800 * torch.randn(target.shape, dtype=F64,
                                      generator=torch.Generator().manual_seed(2))
    r = float(target.max())
    mask = target > target.median()
    assert 0.05 < float(mask.double().mean()) < 0.95
    got = ssim(pred, target, r, mask=mask)
    for i in range(3):
        _, full = sk_ssim(target[i, 0].numpy(), pred[i, 0].numpy(), data_range=r, full=True)
        inside = mask[i, 0].numpy()[3:-3, 3:-3]
        assert abs(got[i].item() - full[3:-3, 3:-3][inside].mean()) < TOL
    with pytest.raises(ValueError, match="does not match"):
        ssim(pred, target, r, mask=mask[..., 1:])


def test_head_metrics_see_the_head_only():
    """A reconstruction that differs from the truth only in the background keeps a perfect score
    inside the head and loses it over the whole image; the head mask fills the ventricles."""
    yy, xx = np.mgrid[-1:1:48j, -1:1:40j]
    head = np.hypot(yy / 0.8, xx / 0.7) < 1.0
    truth = np.stack([np.where(head, 1.0, 0.0)] * 2)
    truth[:, 20:26, 18:22] = 0.0  # a dark ventricle inside
    np.testing.assert_array_equal(head_mask(truth), np.stack([head] * 2))
    recon = truth + np.where(head, 0.0, 0.1)[None]
    m = evaluate_stacks(truth, np.zeros_like(truth), recon)
    assert m["psnr"] == pytest.approx(10 * np.log10(1 / (0.01 * (~head).mean())))
    assert m["psnr_head"] > 250  # the MSE floor: no error inside the head
    assert m["ssim"] < m["ssim_head"] < 1.0  # windows at the edge of the head see the change
    assert m["psnr_head_naive"] == pytest.approx(
        10 * np.log10(1 / np.mean(truth[:, head] ** 2)))


def test_random_volumes_batch():
    target = rand((2, 1, 9, 10, 11), 0)
    pred = target + 0.2 * rand((2, 1, 9, 10, 11), 1)
    assert_matches_skimage(pred, target)


def test_identical_images():
    x = rand((2, 1, 12, 12), 0)
    assert torch.all(psnr(x, x) == float("inf"))
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=F64))


def test_bad_inputs_are_named():
    x = rand((2, 1, 12, 12), 0)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(x, x[:1])
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(x, x[..., :10])
    constant = torch.ones(2, 1, 12, 12, dtype=F64)
    constant[0] = rand((1, 12, 12), 1)
    for metric in (psnr, ssim):
        with pytest.raises(ValueError, match=r"item\(s\) \[1\] are constant.*data_range"):
            metric(x, constant)
    assert torch.isfinite(psnr(x, constant, data_range=1.0)).all()
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        ssim(x[0], x[0])
    with pytest.raises(ValueError, match="abs"):
        psnr(x.to(torch.complex128), x.to(torch.complex128))
    with pytest.raises(ValueError, match="win_size"):
        ssim(x[..., :6, :], x[..., :6, :])
    with pytest.raises(ValueError, match="data_range"):
        ssim(x, x, data_range=torch.ones(3))
    with pytest.raises(ValueError, match="data_range"):
        psnr(x, x, data_range=-1.0)


def test_worst_margins_per_operator_over_naive_and_over_rivals():
    from recon.metrics import worst_margins

    def row(vol, op, method, psnr, naive):
        return {"volume": vol, "operator": op, "method": method, "psnr": psnr,
                "gain_db": psnr - naive}

    rows = [row("a", "mask", "diffusion", 30.0, 20.0), row("a", "mask", "tv", 31.0, 20.0),
            row("a", "mask", "l1", 29.0, 20.0), row("b", "mask", "diffusion", 25.0, 22.0),
            row("b", "mask", "tv", 24.0, 22.0), row("a", "blur", "diffusion", 28.0, 27.0)]
    assert worst_margins(rows, "diffusion") == {"mask": 3.0, "blur": 1.0}
    # volume a: 30 - max(31, 29) = -1; volume b: 25 - 24 = +1; blur has no rival: left out
    assert worst_margins(rows, "diffusion", ["tv", "l1"]) == {"mask": -1.0}
    assert worst_margins(rows, "diffusion", ["l1"]) == {"mask": 1.0}
