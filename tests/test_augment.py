"""Framing augmentation (torchvision.transforms.v2)."""

from __future__ import annotations

import pytest
import torch

from bpd_sr.config import MAX_ROTATION
from bpd_sr.training.augment import augment_faces


def _faces(n=6):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)


def test_no_zoom_no_shift_no_flip_is_the_identity():
    hr = _faces()
    out = augment_faces(hr, torch.Generator().manual_seed(1), max_zoom=1.0, max_shift=0.0,
                        flip=False)
    assert torch.equal(out, hr)


def test_each_face_gets_its_own_framing_reproducibly():
    hr = _faces(1).expand(8, -1, -1, -1).contiguous()  # the same face eight times
    a = augment_faces(hr, torch.Generator().manual_seed(2))
    b = augment_faces(hr, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == hr.shape
    assert len({bytes(x.numpy()) for x in a}) == 8  # eight different framings


def test_zoom_out_shrinks_the_face_into_a_mirrored_border():
    """A bright square in the middle of a dark face covers less of the image zoomed out."""
    hr = torch.zeros(16, 32, 32, 3, dtype=torch.uint8)
    hr[:, 8:24, 8:24] = 255
    out = augment_faces(hr, torch.Generator().manual_seed(3), max_zoom=1.5, max_shift=0.0,
                        flip=False)
    # its area shrinks by 1 / zoom^2: 2/3 on average for zoom uniform in [1, 1.5]
    assert out.float().mean() < 0.8 * hr.float().mean()



def test_only_the_reframed_share_is_zoomed_and_shifted():
    hr = _faces(64)
    same = augment_faces(hr, torch.Generator().manual_seed(3), flip=False, reframed_share=0.0)
    assert torch.equal(same, hr)  # nobody reframed, nobody flipped
    half = augment_faces(hr, torch.Generator().manual_seed(3), flip=False, reframed_share=0.5)
    kept = (half == hr).flatten(1).all(1).float().mean().item()
    assert 0.3 < kept < 0.7  # about half keep the training crop


def test_rotation_turns_the_reframed_faces_and_fills_them_from_the_mirrored_border():
    hr = torch.zeros(32, 32, 32, 3, dtype=torch.uint8)
    hr[:, 14:18, :] = 255  # a horizontal bar through the middle
    turned = augment_faces(hr, torch.Generator().manual_seed(4), max_zoom=1.0, max_shift=0.0,
                           flip=False, max_rotation=15.0)
    assert (turned != hr).flatten(1).any(1).all()  # every face turned
    # a turned bar leaves its rows at the left and right edges, the more the larger the angle
    assert turned[:, 14:18, [0, -1]].float().mean() < 0.8 * 255
    assert turned[:, 14:18, 14:18].float().mean() > 0.95 * 255  # about the centre

@pytest.mark.parametrize("max_zoom, max_shift", [(1.5, 8.0), (2.0, 1.0)])
def test_rotated_cuts_never_reach_an_empty_corner(max_zoom, max_shift):
    flat = torch.full((64, 32, 32, 3), 200, dtype=torch.uint8)
    g = torch.Generator().manual_seed(4)
    for _ in range(4):
        worst = augment_faces(flat, g, max_zoom=max_zoom, max_shift=max_shift,
                              max_rotation=MAX_ROTATION)
        assert torch.equal(worst, flat)  # no empty (black) corner anywhere


def test_a_cut_that_a_rotation_could_take_past_the_mirrored_border_is_refused():
    hr = _faces(2)
    with pytest.raises(ValueError, match="inside the mirrored border"):
        augment_faces(hr, torch.Generator(), max_zoom=2.0, max_shift=4.0, max_rotation=5.0)
    # the same cut unrotated is fine: only rotating brings the square's corners in
    augment_faces(hr, torch.Generator(), max_zoom=2.0, max_shift=4.0, max_rotation=0.0)


def test_no_rotation_draws_nothing_so_older_runs_keep_their_random_stream():
    hr = _faces(16)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(augment_faces(hr, g1), augment_faces(hr, g2, max_rotation=0.0))
    assert torch.equal(g1.get_state(), g2.get_state())
    with pytest.raises(ValueError, match="max_rotation"):
        augment_faces(hr, g1, max_rotation=MAX_ROTATION + 1)


def test_a_rotated_share_of_its_own_turns_faces_that_keep_the_training_crop():
    hr = torch.zeros(64, 32, 32, 3, dtype=torch.uint8)
    hr[:, 14:18, :] = 255  # a horizontal bar through the middle
    kw = dict(max_zoom=1.5, max_shift=2.0, flip=False, reframed_share=0.0, max_rotation=15.0)
    # rotating the reframed faces (the default) turns none when none is reframed ...
    assert torch.equal(augment_faces(hr, torch.Generator().manual_seed(6), **kw), hr)
    assert torch.equal(augment_faces(hr, torch.Generator().manual_seed(6), rotated_share=0.0,
                                     **kw), hr)
    # ... a share of their own turns about that share, unzoomed: the bar stays centred
    half = augment_faces(hr, torch.Generator().manual_seed(6), rotated_share=0.5, **kw)
    turned = (half != hr).flatten(1).any(1).float().mean().item()
    assert 0.3 < turned < 0.7
    assert half[:, 14:18, 14:18].float().mean() > 0.95 * 255
    with pytest.raises(ValueError, match="rotated_share"):
        augment_faces(hr, torch.Generator(), rotated_share=1.5, max_rotation=5.0)


def test_recolouring_changes_colours_not_the_framing_draws():
    hr = _faces(64)
    kw = dict(max_zoom=1.5, max_shift=2.0, reframed_share=0.5, max_rotation=10.0)
    plain = augment_faces(hr, torch.Generator().manual_seed(4), **kw)
    off = augment_faces(hr, torch.Generator().manual_seed(4), color_share=0.0,
                        color_generator=torch.Generator().manual_seed(9), **kw)
    assert torch.equal(off, plain)  # share 0: nothing drawn, the framing untouched
    all_ = augment_faces(hr, torch.Generator().manual_seed(4), color_share=1.0,
                         color_generator=torch.Generator().manual_seed(9), **kw)
    again = augment_faces(hr, torch.Generator().manual_seed(4), color_share=1.0,
                          color_generator=torch.Generator().manual_seed(9), **kw)
    assert torch.equal(all_, again) and all_.dtype == torch.uint8
    changed = (all_ != plain).flatten(1).any(1)
    assert changed.float().mean() > 0.9  # every face recoloured (a few may barely move)
    # recolouring keeps the picture: each face stays correlated with its unrecoloured self
    a, b = all_.float().flatten(1), plain.float().flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    assert corr.min() > 0.5
    half = augment_faces(hr, torch.Generator().manual_seed(4), color_share=0.5,
                         color_generator=torch.Generator().manual_seed(9), **kw)
    share = (half != plain).flatten(1).any(1).float().mean().item()
    assert 0.3 < share < 0.7


def test_recolouring_needs_its_generator_and_a_share_in_range():
    hr = _faces(2)
    with pytest.raises(ValueError, match="color_generator"):
        augment_faces(hr, torch.Generator(), color_share=0.5)
    with pytest.raises(ValueError, match="color_share"):
        augment_faces(hr, torch.Generator(), color_share=1.5,
                      color_generator=torch.Generator())
