"""`kaggle plan`: GPU hours from the real metadata's site counts and a documented rate."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_lib import gpu_plan, metadata
from kernel_lib.config import TrainConfig
from kernel_lib.parameters import stage_params
from kernel_lib.registry import get_stage

REPO = Path(__file__).resolve().parent.parent


def _treatment_sites(wells, experiments, cell_type=""):
    w = wells[(wells["well_type"] == "treatment") & wells["experiment"].isin(experiments)]
    return 2 * len(w[w["cell_type"] == cell_type] if cell_type else w)


@pytest.mark.slow  # GPU plans of the real metadata (FLOP counts)
def test_full_resnet50_hours_follow_from_site_counts(real_wells):
    plans = {p.stage: p for p in gpu_plan.plan("full", chunk_budget_s=3600.0)}
    p = plans["resnet50"]
    val = set(metadata.split_train_val(real_wells, "experiment", 1, 0.025, 42)[1]["experiment"])
    train = set(real_wells.loc[real_wells["dataset"] == "train", "experiment"]) - val
    test = set(real_wells.loc[real_wells["dataset"] == "test", "experiment"])
    assert len(val) == 4 and p.train_sites == _treatment_sites(real_wells, train) == 64_166
    assert p.val_sites == _treatment_sites(real_wells, val) and p.test_sites == 39_794
    loader = 4 / gpu_plan.DECODE_S_PER_SITE          # 4 Kaggle cores decoding PNGs: ~215 sites/s
    infer = min(230.0, loader)
    assert (p.train_ips, p.infer_ips, p.epochs) == (85.0, infer, 15) and infer < 230
    expected = (p.train_sites * 15 / 85 + p.val_sites * 15 / infer + (p.val_sites + p.test_sites) / infer)
    assert p.seconds == pytest.approx(expected) and p.chunks == math.ceil(expected / 3600)
    hepg2 = plans["cell_line_hepg2"]
    assert hepg2.train_sites == _treatment_sites(real_wells, train, "HEPG2") and hepg2.chunks == 1
    # the README's claim: the full profile fits one weekly quota on one T4
    assert sum(q.hours for q in plans.values()) < gpu_plan.WEEKLY_QUOTA_H


@pytest.mark.slow
def test_rates_scale_with_flops_and_tta_costs_eight_views(real_wells):
    assert 1.7 < gpu_plan.forward_gflops("densenet161", 512) / gpu_plan.forward_gflops("resnet50", 512) < 2.1
    train, infer = gpu_plan.published_rates("resnet50", 256)
    assert train == pytest.approx(min(85 * 4, 4 / gpu_plan.DECODE_S_PER_SITE), rel=0.05)
    cfg = TrainConfig.from_params({**stage_params(get_stage("resnet50"), "full"), "tta": True, "epochs": 1})
    with_tta = gpu_plan.plan_stage(get_stage("resnet50"), cfg, real_wells, 30600)
    without = gpu_plan.plan_stage(get_stage("resnet50"), TrainConfig.from_params({**cfg.to_dict(), "tta": False}),
                                  real_wells, 30600)
    views = (with_tta.val_sites + with_tta.test_sites) / with_tta.infer_ips
    assert with_tta.seconds - without.seconds == pytest.approx(7 * views)


@pytest.mark.slow
def test_measured_rate_wins_over_the_published_one(tmp_path):
    (tmp_path / "chunk").mkdir()
    (tmp_path / "chunk" / "metrics.json").write_text(json.dumps({"stage": "resnet50", "train_images_per_s": 170.0}))
    plans = {p.stage: p for p in gpu_plan.plan("full", 30600, measured_dirs=[tmp_path])}
    assert plans["resnet50"].train_ips == 170.0 and plans["resnet50"].rate_source.startswith("measured")
    assert plans["base_cnn"].rate_source == gpu_plan.PUBLISHED_SOURCE
    forced = {p.stage: p for p in gpu_plan.plan("full", 30600, images_per_second=42.0, measured_dirs=[tmp_path])}
    assert forced["base_cnn"].train_ips == 42.0 and forced["resnet50"].train_ips == 170.0


@pytest.mark.slow
def test_plan_command_prints_the_total_against_the_quota():
    out = subprocess.run([sys.executable, str(REPO / "run_all.py"), "kaggle", "plan", "--quota-hours", "5"],
                         capture_output=True, text=True, check=True).stdout
    assert "resnet50" in out and "EXCEEDS the weekly quota of 5 h" in out and "9-hour sessions" in out
