"""The GPU-hour estimate of a profile's chain on the real data (one Kaggle T4, mixed precision).

Not a measurement: throughput comes from NVIDIA's published ResNet-50 figures (DeepLearningExamples,
PyTorch ResNet-50 v1.5, 224 px, T4 inference 1,190 img/s with AMP at batch 128; training about 0.37 of
inference on a V100) scaled by pixels, ``1,190 x 0.37 x (224/512)^2 = 85 img/s`` training and
about 230 img/s inference at 512 px; DenseNet-161 costs about twice ResNet-50's FLOPs (the figures
in ../shared/docs/anchors.md). A crop of ``crop_size`` trains at ``(512/crop)^2`` times the 512-px
rate. Replace ``T4_IMAGES_PER_S`` by a measured figure as soon as one exists.

`chain_gpu_hours` counts, per training stage of a profile, the epochs over its training sites
(treatments of the training experiments plus the control wells its ``controls`` mode adds), one
validation per epoch, and the prediction of its validation and test sites (x8 with TTA), from the
competition's metadata (the copy in tests/fixtures); plus a fixed overhead per stage for start-up,
per-plate statistics and the chunks' checkpoint round trips.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

# (training, inference) images per second on a T4 at 512 px with AMP: the estimate above
T4_IMAGES_PER_S: dict[str, tuple[float, float]] = {
    "resnet18": (2.3 * 85.0, 2.3 * 230.0),  # about 1.8 of ResNet-50's 4.1 GFLOPs
    "resnet34": (1.2 * 85.0, 1.2 * 230.0),
    "resnet50": (85.0, 230.0),
    "densenet121": (85.0 / 0.7, 230.0 / 0.7),  # 2.9 GFLOPs, but memory-bound: taken as ResNet-50 / 0.7
    "densenet161": (85.0 / 2, 230.0 / 2),   # about 2x ResNet-50's FLOPs
}
REFERENCE_SIZE = 512
OVERHEAD_H_PER_STAGE = 0.25  # start-up, statistics, chunk checkpoints: a guess, kept explicit
WEEKLY_T4_QUOTA_H = 30.0  # Kaggle's weekly GPU hours (about 30)


def _sites(wells: pd.DataFrame, n_sites: int) -> int:
    return len(wells) * n_sites


def stage_sites(wells: pd.DataFrame, params: Mapping[str, Any]) -> dict[str, int]:
    """Training, validation and test sites of one training stage (as train_stage.load_data selects them)."""
    from . import controls, metadata

    train_w, val_w, _ = metadata.split_train_val(wells, params.get("split", "experiment"),
                                                 params.get("val_experiments", 1), params.get("val_fraction", 0.025),
                                                 params.get("seed", 42))
    cell_type = params.get("cell_type", "")
    keep = lambda w: w[(w["well_type"] == metadata.TREATMENT) & ((w["cell_type"] == cell_type) if cell_type else True)]  # noqa: E731
    extra = controls.training_controls(wells, train_w, params.get("controls", "none"), cell_type)
    n = len(params.get("sites", (1, 2)))
    test = wells[wells["dataset"] == "test"]
    return {"train": _sites(pd.concat([keep(train_w), extra]), n), "val": _sites(keep(val_w), n),
            "test": _sites(keep(test), n)}


def stage_gpu_hours(params: Mapping[str, Any], sites: Mapping[str, int]) -> float:
    """Estimated T4 hours of one training stage with these parameters (see the module's docstring)."""
    arch = params.get("arch", "resnet50")
    if arch not in T4_IMAGES_PER_S:
        raise ValueError(f"no T4 throughput estimate for arch {arch!r}; known: {sorted(T4_IMAGES_PER_S)}")
    train_rate, infer_rate = T4_IMAGES_PER_S[arch]
    size = params.get("image_size", 512) or REFERENCE_SIZE
    crop = params.get("crop_size", 0) or size
    train_rate *= (REFERENCE_SIZE / crop) ** 2
    infer_rate *= (REFERENCE_SIZE / size) ** 2
    epochs = params.get("epochs", 15)
    views = 8 if params.get("tta", False) else 1
    seconds = (epochs * sites["train"] / train_rate + epochs * sites["val"] / infer_rate
               + views * (sites["val"] + sites["test"]) / infer_rate)
    return seconds / 3600 + OVERHEAD_H_PER_STAGE


def chain_gpu_hours(profile: str, metadata_dir: str | os.PathLike | None = None) -> dict[str, float]:
    """Stage -> estimated T4 hours of every GPU training stage of ``profile`` (base_cnn excluded:
    profiles that skip it run ``--only``), plus ``total``."""
    from . import metadata, registry
    from .parameters import stage_params
    from .real_layout import REAL_METADATA_DIR

    wells = metadata.read_wells(Path(metadata_dir or REAL_METADATA_DIR))
    hours = {}
    for stage in registry.STAGES:
        if not stage.trains or stage.name == "base_cnn":
            continue
        params = stage_params(stage, profile)
        hours[stage.name] = stage_gpu_hours(params, stage_sites(wells, params))
    hours["total"] = sum(hours.values())
    return hours
