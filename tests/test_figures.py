"""The per-volume figure (``pipelines.figures.volume_figure``): axial rows, then sagittal and
coronal reformats (superior up) where slice-to-slice flicker shows."""

import io

import numpy as np
import pytest

from pipelines.figures import COLUMNS, volume_figure


def stacks(s: int, h: int = 12, w: int = 10, seed: int = 0):
    """Truth with a per-slice ramp (so a flip of the slice axis shows) and a reconstruction
    that flickers: a random offset per slice."""
    rng = np.random.default_rng(seed)
    gt = rng.random((s, h, w)) + np.arange(s)[:, None, None]
    recon = gt + rng.normal(0.0, 0.5, (s, 1, 1))
    return gt, gt * 0.5, recon, np.abs(rng.normal(0.0, 0.1, (s, h, w)))


def image_grid(fig) -> np.ndarray:
    """The image axes (not the colour bars) as (rows, columns), in drawing order."""
    axes = [ax for ax in fig.axes if ax.get_images()]
    return np.array(axes, dtype=object).reshape(-1, len(COLUMNS))


def shown(ax) -> np.ndarray:
    return np.asarray(ax.get_images()[0].get_array())


@pytest.mark.parametrize(("s", "slices", "axial", "reformats"),
                         [(1, None, 1, 0), (2, None, 1, 0), (2, [0, 1], 2, 0), (3, None, 1, 2),
                          (3, [0, 1, 2], 3, 2), (9, None, 3, 2)])
def test_reformat_rows_only_from_three_slices(s, slices, axial, reformats):
    fig = volume_figure(*stacks(s), "t", slices=slices)
    grid = image_grid(fig)
    assert grid.shape == (axial + reformats, len(COLUMNS))
    assert len(fig.axes) == grid.size + 2 * grid.shape[0]  # a colour bar for |error| and std
    labels = [row[0].get_ylabel() for row in grid]
    assert all(label.startswith("slice") for label in labels[:axial])
    assert [label.split("\n")[0] for label in labels[axial:]] == ["sagittal", "coronal"][:reformats]


def test_reformats_show_the_middle_planes_superior_up_on_the_axial_colour_scales():
    gt, naive, recon, std = stacks(7, h=12, w=10)
    fig = volume_figure(gt, naive, recon, std, "t", labels=[20 + i for i in range(7)])
    grid = image_grid(fig)
    sagittal, coronal = grid[-2], grid[-1]
    assert shown(sagittal[0]).shape == (7, 12) and shown(coronal[0]).shape == (7, 10)
    # the last slice (most superior) is the top row of the reformat
    np.testing.assert_allclose(shown(sagittal[0]), gt[::-1, :, 5])
    np.testing.assert_allclose(shown(coronal[0]), gt[::-1, 6, :])
    for c, stack in enumerate((gt, naive, recon, np.abs(recon - gt), std)):
        np.testing.assert_allclose(shown(sagittal[c]), stack[::-1, :, 5])
        np.testing.assert_allclose(shown(coronal[c]), stack[::-1, 6, :])
        clims = {row[c].get_images()[0].get_clim() for row in grid}
        assert len(clims) == 1, f"column {COLUMNS[c]}: one colour scale for all rows, got {clims}"
    # the shown axial slices (2, 3, 4 of 0..6) are marked where they sit in the reformat
    marks = dict(zip(sagittal[0].get_yticks(),
                     (t.get_text() for t in sagittal[0].get_yticklabels()), strict=True))
    assert marks == {6 - 2: "22", 6 - 3: "23", 6 - 4: "24"}


@pytest.mark.parametrize("slice_aspect", [1.0, 2.5, 0.5])
def test_reformats_drawn_with_the_slice_aspect(slice_aspect):
    fig = volume_figure(*stacks(5), "t", slice_aspect=slice_aspect)
    grid = image_grid(fig)
    assert all(ax.get_aspect() == 1.0 for ax in grid[:-2].ravel())  # axial: square pixels
    assert all(ax.get_aspect() == slice_aspect for ax in grid[-2:].ravel())
    fig.draw_without_rendering()  # layout done: the boxes have the images' drawn shapes
    for ax, (rows, cols) in zip(grid[-2:, 0], [(5, 12), (5, 10)], strict=True):
        box = ax.get_window_extent()
        assert box.height / box.width == pytest.approx(rows * slice_aspect / cols, rel=0.02)


def test_figure_with_reformats_renders_with_psnr_labels():
    gt, naive, recon, std = stacks(6, h=40, w=32)
    psnr = {"naive": [10.0 + i for i in range(6)], "recon": [20.0 + i for i in range(6)]}
    fig = volume_figure(gt, naive, recon, std, "t", psnr=psnr, slice_aspect=3.0)
    grid = image_grid(fig)
    assert grid[0, 2].get_title() == f"reconstruction\n{psnr['recon'][2]:.1f} dB"
    assert grid[-1, 2].get_title() == ""  # a reformat has no single slice's PSNR
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=40)
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def test_slice_aspect_must_be_positive():
    with pytest.raises(ValueError, match="slice_aspect"):
        volume_figure(*stacks(4), slice_aspect=0.0)
