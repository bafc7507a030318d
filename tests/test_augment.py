"""The dihedral augmentation views."""
import pytest
import torch

from kernel_lib import augment


def test_dihedral_views_are_the_eight_distinct_symmetries():
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    views = [augment.dihedral(x, v) for v in range(8)]
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    assert torch.equal(augment.dihedral(x, 4), x.flip(-1))
    assert torch.equal(augment.dihedral(x, 1), torch.rot90(x, 1, (-2, -1)))
    codes = torch.tensor([0, 1, 4])
    out = augment.apply_views(x.repeat(3, 1, 1, 1), codes)
    assert all(torch.equal(out[i], views[c][0]) for i, c in enumerate(codes.tolist()))
    assert augment.views_of(4, 6) == [0, 2, 4, 6]  # only shape-keeping views for rectangles


def test_the_views_include_both_transposes():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    views = [augment.dihedral(x, v) for v in range(8)]
    assert any(torch.equal(v, x.transpose(-1, -2)) for v in views)
    assert any(torch.equal(v, x.flip(-1).flip(-2).transpose(-1, -2)) for v in views)


def test_mix_seed_is_the_runtimes():
    from kernel_lib.runtime import mix_seed

    assert augment.mix_seed(3, 1, 7) == mix_seed(3, 1, 7) and augment.mix_seed(3, 1, 7, 2) != mix_seed(3, 1, 7)


SPEC = augment.AugmentSpec(views=True, crop_size=5, intensity_scale=0.1, intensity_bias=0.2, cutmix_prob=1.0,
                           cutmix_alpha=1.0)


def test_draw_is_a_function_of_seed_epoch_and_step_and_each_kind_has_its_own_stream():
    a = augment.draw(SPEC, 1, 2, 3, 8, 6, 8, 8, micro_batch=4)
    b = augment.draw(SPEC, 1, 2, 3, 8, 6, 8, 8, micro_batch=4)
    c = augment.draw(SPEC, 1, 2, 4, 8, 6, 8, 8, micro_batch=4)
    for name in ("views", "offsets", "scale", "bias", "boxes"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.offsets, c.offsets) and not torch.equal(a.scale, c.scale)
    # the crops and the views do not change when CutMix and the jitter are switched off
    crops_only = augment.draw(augment.AugmentSpec(views=True, crop_size=5), 1, 2, 3, 8, 6, 8, 8, micro_batch=4)
    assert torch.equal(crops_only.offsets, a.offsets) and torch.equal(crops_only.views, a.views)
    assert crops_only.scale is None and crops_only.boxes is None
    assert a.offsets.min() >= 0 and a.offsets.max() <= 8 - 5


def test_apply_crops_views_jitters_and_cutmixes_with_the_kept_fraction_as_label_weight():
    x = torch.randn(4, 2, 8, 8)
    aug = augment.BatchAugment(views=torch.tensor([0, 1, 5, 0]), offsets=torch.tensor([[0, 0], [1, 2], [3, 3], [0, 0]]),
                               crop=5, scale=torch.full((4, 2), 2.0), bias=torch.full((4, 2), 0.5),
                               boxes=torch.tensor([[0, 5, 0, 5], [0, 0, 0, 0], [1, 3, 2, 4], [0, 0, 0, 0]]), shift=1)
    out, lam, partner = augment.apply(x, aug)
    assert out.shape == (4, 2, 5, 5)
    viewed = [augment.dihedral(x[i, :, oy:oy + 5, ox:ox + 5], v) * 2 + 0.5
              for i, (v, (oy, ox)) in enumerate(zip([0, 1, 5, 0], [(0, 0), (1, 2), (3, 3), (0, 0)]))]
    assert partner.tolist() == [1, 2, 3, 0]
    assert torch.allclose(out[0], viewed[1])             # the whole image pasted from its partner: lam 0
    assert torch.allclose(out[1], viewed[1])             # no box
    expected = viewed[2].clone()
    expected[:, 1:3, 2:4] = viewed[3][:, 1:3, 2:4]
    assert torch.allclose(out[2], expected)
    assert torch.allclose(lam, torch.tensor([0.0, 1.0, 1 - 4 / 25, 1.0]))


def test_cutmix_boxes_keep_lam_on_average_and_skip_images_by_probability():
    spec = augment.AugmentSpec(views=False, cutmix_prob=0.5, cutmix_alpha=1.0)
    aug = augment.draw(spec, 0, 0, 0, 4000, 6, 32, 32, micro_batch=8)
    y0, y1, x0, x1 = aug.boxes.T
    area = (y1 - y0) * (x1 - x0)
    assert 0.45 < (area > 0).float().mean() < 0.55
    # Beta(1, 1): the box covers (1 - lam) of the image before clipping, E = 0.5; clipping at the border shrinks it
    assert 0.2 < (area[area > 0].float() / 1024).mean() < 0.5
    with pytest.raises(ValueError, match="crop_size=40 is larger"):
        augment.draw(augment.AugmentSpec(crop_size=40), 0, 0, 0, 2, 6, 32, 32, micro_batch=2)
