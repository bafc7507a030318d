"""The dihedral augmentation views."""
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
