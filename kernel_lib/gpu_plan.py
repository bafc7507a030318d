"""GPU hours, planned before they are spent: `python run_all.py kaggle plan`.

For each training stage of a profile on the real data: the images it will push through the GPU
(training sites per epoch, control wells included when ``controls`` adds them, x epochs;
validation each epoch; test and validation inference, x8 with TTA; random crops train at the
crop's cost), divided by an images-per-second rate, the chunks that needs within the session budget, and
the total against Kaggle's weekly GPU quota.

Rates, best first: a measured ``train_images_per_s`` from a chunk's metrics.json (the loop records
it in every chunk); the user's ``--images-per-second``; else a published figure for the card,
scaled to the stage's backbone and image size by forward FLOPs (counted on the meta device, so no
weights are built), and capped by what PNG decoding on the session's CPU cores can feed.

The published figure (NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5 README, 224 px): T4
inference 1,190 img/s with mixed precision; training is about 0.37 of inference (V100: 1,200 vs
3,249). Hence ResNet-50 at 512 px on a T4: ~85 img/s training, ~230 img/s inference with AMP. An
estimate, not a measurement: replace it with the first chunk's measured rate.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from . import controls, metadata, models
from .config import TrainConfig
from .outputs import read_metrics
from .parameters import stage_params
from .real_layout import REAL_METADATA_DIR
from .registry import Stage, enabled_stages, get_stage

WEEKLY_QUOTA_H = 30.0           # Kaggle's weekly GPU hours (about 30)
T4_RESNET50_512 = {"train": 85.0, "infer": 230.0}  # img/s, AMP; see the module docstring
PUBLISHED_SOURCE = ("NVIDIA DeepLearningExamples PyTorch ResNet-50 v1.5 README: T4 1,190 img/s inference (AMP, "
                    "224 px); training ~0.37 of inference; scaled to 512 px and by FLOPs")
DECODE_S_PER_SITE = 6 * 3.1e-3  # six 512-px PNGs with OpenCV, one core (benchmarks/RESULTS.md: 3.1 ms each)
KAGGLE_CPUS = 4
NATIVE_SIZE = 512


@dataclass(frozen=True)
class StagePlan:
    """One training stage's estimate. Seconds are GPU seconds; epochs are an upper bound (early stopping)."""

    stage: str
    arch: str
    image_size: int
    epochs: int
    train_sites: int            # per epoch
    val_sites: int
    test_sites: int
    tta: bool
    train_ips: float
    infer_ips: float
    rate_source: str
    seconds: float
    chunks: int

    @property
    def hours(self) -> float:
        return self.seconds / 3600


@lru_cache(maxsize=None)
def forward_gflops(arch: str, image_size: int, n_classes: int = 1108) -> float:
    """GFLOPs of one forward pass of a 6-channel ``arch`` at ``image_size`` (meta tensors: no compute)."""
    with torch.device("meta"):
        model = models.build_model(arch, n_classes, in_chans=6, image_size=image_size).eval()
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.empty(1, 6, image_size, image_size))
    return counter.get_total_flops() / 1e9


def published_rates(arch: str, image_size: int, cpus: int = KAGGLE_CPUS) -> tuple[float, float]:
    """(train, infer) img/s on a T4: ResNet-50 at 512 px scaled by FLOPs, capped by PNG decoding."""
    scale = forward_gflops("resnet50", NATIVE_SIZE) / forward_gflops(arch, image_size)
    loader = cpus / DECODE_S_PER_SITE  # decoding does not get cheaper when the model resizes
    return min(T4_RESNET50_512["train"] * scale, loader), min(T4_RESNET50_512["infer"] * scale, loader)


def measured_rate(stage: str, dirs: Sequence[str | os.PathLike]) -> float | None:
    """The newest measured ``train_images_per_s`` of ``stage`` in metrics.json files under ``dirs``."""
    best = None
    for root in dirs:
        for path in sorted(Path(root).rglob("metrics.json")):
            m = read_metrics(path.parent)
            if m.get("stage") == stage and m.get("train_images_per_s"):
                best = float(m["train_images_per_s"])
    return best


def _sites(wells: pd.DataFrame, cfg: TrainConfig) -> int:
    w = wells[wells["well_type"] == metadata.TREATMENT]
    if cfg.cell_type:
        w = w[w["cell_type"] == cfg.cell_type]
    return len(w) * len(cfg.sites)


def _control_sites(wells: pd.DataFrame, train_w: pd.DataFrame, cfg: TrainConfig) -> int:
    """The control wells ``cfg.controls`` adds to training, as train_stage.load_data adds them."""
    return len(controls.training_controls(wells, train_w, cfg.controls, cfg.cell_type)) * len(cfg.sites)


def plan_stage(stage: Stage, cfg: TrainConfig, wells: pd.DataFrame, chunk_budget_s: float,
               images_per_second: float = 0.0, measured: float | None = None) -> StagePlan:
    """A training stage's GPU seconds and chunks on ``wells`` (the real metadata)."""
    train_w, val_w, _ = metadata.split_train_val(wells, cfg.split, cfg.val_experiments, cfg.val_fraction, cfg.seed,
                                                 cfg.folds, cfg.fold)
    n_train = _sites(train_w, cfg) + _control_sites(wells, train_w, cfg)
    if cfg.max_train_sites:
        n_train = min(n_train, cfg.max_train_sites)
    n_val, n_test = _sites(val_w, cfg), _sites(wells[wells["dataset"] == "test"], cfg)
    if cfg.pseudo_labels:  # an upper bound: every test well confident enough to train on
        n_train += n_test
    size = cfg.image_size or NATIVE_SIZE
    # random crops train at the crop's cost; prediction stays at full size
    train_ips, infer_ips = published_rates(cfg.arch, cfg.crop_size or size)[0], published_rates(cfg.arch, size)[1]
    source = PUBLISHED_SOURCE
    for rate, what in ((images_per_second, "--images-per-second"), (measured, "measured (metrics.json)")):
        if rate:
            train_ips, infer_ips, source = rate, rate * T4_RESNET50_512["infer"] / T4_RESNET50_512["train"], what
    views = 8 if cfg.tta else 1
    seconds = (n_train * cfg.epochs / train_ips + n_val * cfg.epochs / infer_ips
               + (n_val + n_test) * views / infer_ips)
    return StagePlan(stage.name, cfg.arch, size, cfg.epochs, n_train, n_val, n_test, cfg.tta, train_ips, infer_ips,
                     source, seconds, max(1, math.ceil(seconds / chunk_budget_s)))


def plan(profile: str, chunk_budget_s: float, overrides: Mapping[str, Mapping] | None = None,
         metadata_dir: str | os.PathLike = REAL_METADATA_DIR, images_per_second: float = 0.0,
         measured_dirs: Sequence[str | os.PathLike] = (), extra: Sequence[str] = ()) -> list[StagePlan]:
    """Every training stage the chain of ``profile`` (with the optional ``extra``) runs, in order."""
    wells = metadata.read_wells(metadata_dir)
    out = []
    for stage in (get_stage(n) for n in enabled_stages(profile, extra)):
        if stage.trains:
            cfg = TrainConfig.from_params(stage_params(stage, profile, overrides, extra=extra))
            out.append(plan_stage(stage, cfg, wells, chunk_budget_s, images_per_second,
                                  measured_rate(stage.name, measured_dirs)))
    return out


def plan_table(plans: Sequence[StagePlan], quota_h: float = WEEKLY_QUOTA_H) -> str:
    """The plan as text: one row per stage, the total against the weekly quota, the rates' source."""
    rows = pd.DataFrame([dict(stage=p.stage, arch=p.arch, px=p.image_size, epochs=p.epochs,
                              train_sites=p.train_sites, val_sites=p.val_sites, test_sites=p.test_sites,
                              tta=p.tta, train_img_s=round(p.train_ips, 1), gpu_hours=round(p.hours, 2),
                              chunks=p.chunks) for p in plans]).set_index("stage")
    total = sum(p.hours for p in plans)
    verdict = "fits" if total <= quota_h else "EXCEEDS"
    sources = sorted({p.rate_source for p in plans})
    return (rows.to_string() + f"\n\ntotal {total:.1f} GPU hours (epochs are an upper bound: early stopping ends "
            f"sooner), {verdict} the weekly quota of {quota_h:g} h\nrates: " + "; ".join(sources))
