"""Augmentation by the dihedral group: the 8 flip/rot90 views of a site (4 of a rectangular one).

Owns `views_of`, `dihedral`, `view_codes` and `apply_views`. The loop draws each step's views
with a generator seeded by (seed, epoch, step) (`runtime.mix_seed`), so a resumed chunk draws
what an uninterrupted run draws; inference's TTA sums the logits over the same views.
"""
from __future__ import annotations

import torch
from torch import Tensor


def views_of(height: int, width: int) -> list[int]:
    """The dihedral views (see `dihedral`) that keep an image's shape: all 8 of a square one;
    identity, rot180, flip and flip+rot180 of a rectangular one."""
    return list(range(8)) if height == width else [0, 2, 4, 6]


def dihedral(x: Tensor, view: int) -> Tensor:
    """(..., H, W) -> view ``view`` of it: rot90 ``view % 4`` times, then a flip if view >= 4."""
    y = torch.rot90(x, view % 4, dims=(-2, -1)) if view % 4 else x
    return y.flip(-1) if view >= 4 else y


def view_codes(count: int, height: int, width: int, generator: torch.Generator) -> Tensor:
    """(count,) int64 views drawn uniformly from `views_of` (height, width)."""
    views = torch.tensor(views_of(height, width))
    return views[torch.randint(0, len(views), (count,), generator=generator)]


def apply_views(images: Tensor, codes: Tensor) -> Tensor:
    """images (B,C,H,W) on any device, codes (B,) int64 on the CPU -> (B,C,H,W), image i viewed by codes[i]."""
    out = torch.empty_like(images)
    # One copy per image: several times faster on the CPU than gathering the images of each view.
    for i, view in enumerate(codes.tolist()):
        out[i].copy_(dihedral(images[i], view))
    return out

