"""bpd_sr.evaluation.viz: colour maps, per-pixel maps of decoding steps, strips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bpd_sr.evaluation.viz import (
    accepted_length_map,
    colormap,
    colour_bar,
    heatmap_figure,
    labelled_panels,
    step_map,
)


def test_colormap_endpoints_and_clipping() -> None:
    values = np.array([[0.0, 10.0, -5.0, 99.0]])
    out = colormap(values, vmin=0.0, vmax=10.0)
    assert out.shape == (1, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0], [68, 1, 84])  # viridis dark purple
    np.testing.assert_array_equal(out[0, 1], [253, 231, 37])  # viridis yellow
    np.testing.assert_array_equal(out[0, 2], out[0, 0])  # below vmin clips
    np.testing.assert_array_equal(out[0, 3], out[0, 1])  # above vmax clips
    magma = colormap(values, 0.0, 10.0, name="magma")
    np.testing.assert_array_equal(magma[0, 0], [0, 0, 4])
    np.testing.assert_array_equal(magma[0, 1], [252, 253, 191])


def test_colormap_interpolates_and_is_monotone_in_brightness() -> None:
    ramp = np.linspace(0, 1, 101)[None]
    out = colormap(ramp, 0.0, 1.0).astype(float)
    # Midway between the first two anchors (t = 1/16) is their average.
    mid = colormap(np.array([[1 / 16]]), 0.0, 1.0)[0, 0]
    np.testing.assert_allclose(mid, [(68 + 71) / 2, (1 + 45) / 2, (84 + 123) / 2], atol=0.51)
    luma = out[0] @ np.array([0.299, 0.587, 0.114])
    assert (np.diff(luma) > -1.0).all()  # viridis brightens steadily


def test_colormap_nan_flat_and_unknown_name() -> None:
    out = colormap(np.array([[np.nan, 3.0]]), 3.0, 3.0)
    np.testing.assert_array_equal(out[0, 0], [128, 128, 128])
    np.testing.assert_array_equal(out[0, 1], [68, 1, 84])
    with pytest.raises(ValueError, match="unknown colour map"):
        colormap(np.zeros((2, 2)), 0, 1, name="jet")


def test_accepted_length_map_hand_made() -> None:
    # 2x2 image, 12 tokens in raster order, decoded in steps of 5, 3, 4 tokens.
    accepted = torch.tensor([5, 3, 4])
    step_index = torch.tensor([0] * 5 + [1] * 3 + [2] * 4).reshape(2, 2, 3)
    m = accepted_length_map(accepted, step_index)
    assert m.shape == (2, 2) and m.dtype == np.float64
    # pixel (0,0): 5,5,5; (0,1): 5,5,3; (1,0): 3,3,4; (1,1): 4,4,4
    np.testing.assert_allclose(m, [[5.0, 13 / 3], [10 / 3, 4.0]])


def test_accepted_length_map_full_size_and_bad_index() -> None:
    accepted = np.full(3072 // 4, 4)
    step_index = (np.arange(3072) // 4).reshape(32, 32, 3)
    m = accepted_length_map(accepted, step_index)
    assert m.shape == (32, 32) and (m == 4).all()
    with pytest.raises(ValueError):
        accepted_length_map(np.array([1, 2]), np.full((2, 2, 3), 2))


def test_step_map() -> None:
    step_index = np.array([[[0, 0, 1], [1, 2, 2]]])
    np.testing.assert_allclose(step_map(step_index), [[1 / 3, 5 / 3]])


def test_labelled_panels_enlarge_every_image_to_one_size() -> None:
    lr = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    hr = np.full((32, 32, 3), 7, np.uint8)
    out = labelled_panels([("input 8x8", lr), ("result", hr)], size=64)
    gap = 64 // 16
    assert out.dtype == np.uint8 and out.shape[0] > 64 + gap  # room for the labels
    # the 8x8 input in exact 8x8 blocks, the 32x32 in 2x2 blocks
    np.testing.assert_array_equal(out[gap : gap + 64, gap : gap + 64],
                                  np.repeat(np.repeat(lr, 8, 0), 8, 1))
    x = gap + 64 + gap
    assert (out[gap : gap + 64, x : x + 64] == 7).all()
    labels = out[gap + 64 :]
    assert (labels < 128).any() and (labels == 255).mean() > 0.8  # dark text on white
    with pytest.raises(ValueError):
        labelled_panels([], size=64)
    with pytest.raises(ValueError):
        labelled_panels([("float", hr.astype(float))], size=64)


def test_colour_bar_runs_from_vmax_at_the_top_to_vmin() -> None:
    bar = colour_bar(1, 10, height=100, ticks=[1.0, 10.0])
    column = bar[:, 2]  # inside the bar, left of the ticks
    coloured = column[(column != 255).any(-1)]
    np.testing.assert_array_equal(coloured[0], colormap(np.array([[10.0]]), 1, 10)[0, 0])
    np.testing.assert_array_equal(coloured[-1], colormap(np.array([[1.0]]), 1, 10)[0, 0])


def test_heatmap_figure_has_the_map_and_its_meaning() -> None:
    values = np.tile(np.linspace(1, 8, 32), (32, 1))
    fig = heatmap_figure(np.zeros((32, 32, 3), np.uint8), values, k=8, size=128)
    gap = 128 // 16
    x = gap + 128 + gap
    np.testing.assert_array_equal(
        fig[gap : gap + 128 : 4, x : x + 128 : 4], colormap(values, 1, 8))
    assert fig.shape[1] > 2 * (128 + gap) + 10  # a colour bar right of the map
    assert (fig[-30:] < 128).any()  # the caption line
