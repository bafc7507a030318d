"""Training augmentation on the device batch, every draw a function of (seed, epoch, step).

Owns the dihedral views (`views_of`, `dihedral`, `view_codes`, `apply_views`: the 8 flips,
rot90s and transposes of a square site; inference's TTA sums the logits over the same views)
and the rest of the 2019 winners' augmentation: random crops (`crop_size`: train on crops,
predict at full size), per-channel intensity scale and bias jitter, and CutMix.

`draw` makes a `BatchAugment` for one *global* batch (every image of the optimizer step, all
micro-batches and ranks) from generators seeded by (seed, epoch, step): one stream per kind of
augmentation, so switching one on or off leaves the draws of the others unchanged, and a run
resumed at any step draws exactly what an uninterrupted run draws. The views keep the stream the
loop always used (``mix_seed(seed, epoch, step)``). `BatchAugment.part` slices the images of one
micro-batch on one rank; `apply` transforms that micro-batch of normalised float images:
crop, view, intensity jitter, then CutMix. CutMix pastes a box of image ``(j + shift) % b`` of the
same micro-batch (b images) into image j; `apply` returns each image's kept fraction ``lam``
and its partner, and the loss is ``lam * loss(y_j) + (1 - lam) * loss(y_partner)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor


def views_of(height: int, width: int) -> list[int]:
    """The dihedral views (see `dihedral`) that keep an image's shape: all 8 of a square one;
    identity, rot180, flip and flip+rot180 of a rectangular one."""
    return list(range(8)) if height == width else [0, 2, 4, 6]


def dihedral(x: Tensor, view: int) -> Tensor:
    """(..., H, W) -> view ``view`` of it: rot90 ``view % 4`` times, then a flip if view >= 4.

    Views 5 and 7 are the transpose and the anti-transpose."""
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


# ---------------------------------------------------------------- the whole recipe

def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative ints (the same function as runtime.mix_seed)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class AugmentSpec:
    """Which augmentations a run uses (TrainConfig's fields of the same names)."""

    views: bool = True
    crop_size: int = 0
    intensity_scale: float = 0.0
    intensity_bias: float = 0.0
    cutmix_prob: float = 0.0
    cutmix_alpha: float = 1.0

    @classmethod
    def from_config(cls, cfg: Any) -> "AugmentSpec":
        return cls(cfg.augment, cfg.crop_size, cfg.intensity_scale, cfg.intensity_bias, cfg.cutmix_prob,
                   cfg.cutmix_alpha)

    @property
    def active(self) -> bool:
        return bool(self.views or self.crop_size or self.intensity_scale or self.intensity_bias or self.cutmix_prob)


@dataclass
class BatchAugment:
    """What `draw` drew for a run of images (rows in global batch order; all on the CPU)."""

    views: Tensor | None = None   # (N,) int64 dihedral view
    offsets: Tensor | None = None  # (N, 2) int64 top-left corner of the crop
    crop: int = 0
    scale: Tensor | None = None   # (N, C) float32 gain
    bias: Tensor | None = None    # (N, C) float32 bias
    boxes: Tensor | None = None   # (N, 4) int64 y0, y1, x0, x1 of the CutMix box (y0 == y1: none)
    shift: int = 0                # CutMix partner of image j in its micro-batch of b: (j + shift) % b

    def part(self, start: int, stop: int) -> "BatchAugment":
        cut = lambda t: None if t is None else t[start:stop]  # noqa: E731
        return BatchAugment(cut(self.views), cut(self.offsets), self.crop, cut(self.scale), cut(self.bias),
                            cut(self.boxes), self.shift)


def draw(spec: AugmentSpec, seed: int, epoch: int, step: int, count: int, channels: int, height: int,
         width: int, micro_batch: int) -> BatchAugment:
    """The augmentation of the ``count`` images of global step ``step`` of epoch ``epoch``."""
    out = BatchAugment()
    if spec.crop_size:
        if spec.crop_size > min(height, width):
            raise ValueError(f"crop_size={spec.crop_size} is larger than the training images ({height}x{width})")
        rng = np.random.default_rng(mix_seed(seed, epoch, step, 1))
        out.crop = spec.crop_size
        out.offsets = torch.from_numpy(np.stack([rng.integers(0, height - spec.crop_size + 1, count),
                                                 rng.integers(0, width - spec.crop_size + 1, count)], 1))
        height = width = spec.crop_size
    if spec.views:
        out.views = view_codes(count, height, width, torch.Generator().manual_seed(mix_seed(seed, epoch, step)))
    if spec.intensity_scale or spec.intensity_bias:
        rng = np.random.default_rng(mix_seed(seed, epoch, step, 2))
        noise = rng.standard_normal((2, count, channels)).astype(np.float32)
        out.scale = torch.from_numpy(1 + spec.intensity_scale * noise[0])
        out.bias = torch.from_numpy(spec.intensity_bias * noise[1])
    if spec.cutmix_prob and micro_batch > 1:
        rng = np.random.default_rng(mix_seed(seed, epoch, step, 3))
        mixed = rng.random(count) < spec.cutmix_prob
        lam = rng.beta(spec.cutmix_alpha, spec.cutmix_alpha, count)
        ratio = np.sqrt(1 - lam)
        cy, cx = rng.integers(0, height, count), rng.integers(0, width, count)
        h, w = np.round(height * ratio).astype(np.int64), np.round(width * ratio).astype(np.int64)
        y0, y1 = np.clip(cy - h // 2, 0, height), np.clip(cy - h // 2 + h, 0, height)
        x0, x1 = np.clip(cx - w // 2, 0, width), np.clip(cx - w // 2 + w, 0, width)
        y1 = np.where(mixed, y1, y0)  # no box for the images CutMix skips
        out.boxes = torch.from_numpy(np.stack([y0, y1, x0, x1], 1).astype(np.int64))
        out.shift = int(rng.integers(1, micro_batch))
    return out


def apply(x: Tensor, aug: BatchAugment) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Augment a micro-batch of normalised images x (B,C,H,W) on any device.

    Returns (images, lam, partner): lam (B,) float32 kept fraction of each image's own label and
    partner (B,) int64 (both on x's device; None without CutMix)."""
    if aug.offsets is not None or aug.views is not None:
        size = (aug.crop, aug.crop) if aug.offsets is not None else tuple(x.shape[-2:])
        out = torch.empty(x.shape[:2] + size, dtype=x.dtype, device=x.device)
        views = aug.views.tolist() if aug.views is not None else [0] * len(x)
        offsets = aug.offsets.tolist() if aug.offsets is not None else [(0, 0)] * len(x)
        for i, (view, (oy, ox)) in enumerate(zip(views, offsets)):
            out[i].copy_(dihedral(x[i, :, oy:oy + size[0], ox:ox + size[1]], view))
        x = out
    if aug.scale is not None:
        x = x * aug.scale.to(x.device)[:, :, None, None] + aug.bias.to(x.device)[:, :, None, None]
    if aug.boxes is None or len(x) < 2:
        return x, None, None
    b, (height, width) = len(x), x.shape[-2:]
    partner = (torch.arange(b) + aug.shift) % b
    mixed = x.clone()
    lam = torch.ones(b, dtype=torch.float32)
    for j, (y0, y1, x0, x1) in enumerate(aug.boxes.tolist()):
        if y1 > y0 and x1 > x0:
            mixed[j, :, y0:y1, x0:x1] = x[partner[j], :, y0:y1, x0:x1]
            lam[j] = 1 - (y1 - y0) * (x1 - x0) / (height * width)
    return mixed, lam.to(x.device), partner.to(x.device)
