"""The stage registry and the one function that gives a stage's parameters to both the local
chain and the Kaggle build: profiles layered on the full profile, fixed parameters, overrides,
the chunk budget, validation by each stage kind's config."""
from __future__ import annotations

import dataclasses

import pytest

from kernel_lib import registry
from kernel_lib.config import EdaConfig, MergeConfig, TrainConfig
from kernel_lib.parameters import (CONFIGS, accepted_parameters, parse_overrides, stage_params,
                                   with_stage_defaults)
from kernel_lib.registry import CELL_LINE, PROFILES, STAGES, get_stage, group_members


def test_registry_knows_every_stage_once():
    assert [s.name for s in STAGES] == list(registry.STAGE_NAMES)
    assert len(set(registry.STAGE_NAMES)) == len(STAGES)
    assert group_members(CELL_LINE) == ["cell_line_hepg2", "cell_line_huvec", "cell_line_rpe", "cell_line_u2os"]
    assert [s.name for s in STAGES if not s.optional] == ["eda", "base_cnn", "resnet50", *group_members(CELL_LINE),
                                                         "merge"]
    assert [s.kind for s in STAGES if not s.optional] == ["eda", "train", "train", *["train"] * 4, "merge"]
    assert [s.name for s in STAGES if s.optional] == ["final_fit", "fold_0", "fold_1", "fold_2", "pseudo_label",
                                                     "merge_pseudo"]
    for s in STAGES:
        assert s.notebook_path.is_file(), s.notebook
        assert all(u in registry.STAGE_NAMES for u in s.upstream)
    assert get_stage("cell_line_rpe").params == {"cell_type": "RPE"}
    with pytest.raises(KeyError, match="resnet5'.*stages are"):
        get_stage("resnet5")


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_gives_valid_parameters_for_every_stage(profile):
    for stage in STAGES:
        params = stage_params(stage, profile)
        cfg = CONFIGS[stage.kind].from_params(params)   # no folder needed to validate
        assert isinstance(cfg, (TrainConfig, EdaConfig, MergeConfig))
    for key in PROFILES[profile]:
        assert key in registry.STAGE_NAMES or key == CELL_LINE, key


def test_optional_stages_run_when_their_profile_or_with_enables_them():
    base = [s.name for s in STAGES if not s.optional]
    assert registry.enabled_stages("synthetic") == registry.enabled_stages("full") == base
    assert registry.enabled_stages("winners") == [*base, "pseudo_label", "merge_pseudo"]
    folds = registry.enabled_stages("full", ["fold"])
    assert folds == [*base[:3], "fold_0", "fold_1", "fold_2", *base[3:]]
    assert registry.enabled_stages("full", ["merge_pseudo"])[-2:] == ["pseudo_label", "merge_pseudo"]
    assert registry.final_merge(base) == "merge" and registry.final_merge(registry.enabled_stages("winners")) == "merge_pseudo"
    with pytest.raises(ValueError, match="--with 'folds'.*final_fit, fold_0"):
        registry.enabled_stages("full", ["folds"])


def test_folds_and_final_fit_take_the_main_stages_settings_and_the_merges_average_what_runs():
    resnet = stage_params(get_stage("resnet50"), "synthetic")
    final = stage_params(get_stage("final_fit"), "synthetic")
    fold = stage_params(get_stage("fold_2"), "synthetic", {"resnet50": {"epochs": 9}})
    own = ("stage", "split", "predict_with", "patience", "validation_from")
    assert {k: v for k, v in final.items() if k not in own} == {k: v for k, v in resnet.items() if k not in own}
    assert resnet["split"] == "experiment" and "validation_from" not in resnet
    assert (final["split"], final["predict_with"], final["validation_from"]) == ("all", "last", "resnet50")
    assert (fold["split"], fold["fold"], fold["folds"]) == ("fold", 2, registry.FOLDS)
    assert fold["epochs"] == resnet["epochs"]  # -p resnet50.NAME is resnet50's alone
    merge, merge_pseudo = get_stage("merge"), get_stage("merge_pseudo")
    assert stage_params(merge, "synthetic")["average_with"] == []
    assert stage_params(merge, "synthetic", extra=["fold", "final_fit"])["average_with"] == \
        ["final_fit", "fold_0", "fold_1", "fold_2"]
    assert stage_params(merge_pseudo, "winners")["average_with"] == ["pseudo_label"]
    assert stage_params(merge_pseudo, "full", extra=["final_fit"])["average_with"] == ["final_fit", "pseudo_label"]
    pseudo = stage_params(get_stage("pseudo_label"), "winners")
    assert (pseudo["pseudo_labels"], pseudo["init_from"], pseudo["arch"]) == ("merge", "resnet50", "densenet161")


def test_profiles_layer_on_full_then_fixed_then_user():
    resnet = get_stage("resnet50")
    full, synthetic = stage_params(resnet, "full"), stage_params(resnet, "synthetic")
    assert full["epochs"] == 15 and full["image_size"] == 512 and full["schedule"] == "exponential"
    # synthetic overrides what it names and keeps full's other real-data settings
    named = PROFILES["synthetic"]["resnet50"]
    assert (synthetic["epochs"], synthetic["image_size"]) == (named["epochs"], named["image_size"]) != (15, 512)
    assert "gamma" not in named and synthetic["gamma"] == full["gamma"]
    hepg2 = stage_params(get_stage("cell_line_hepg2"), "smoke",
                         {"all": {"lr": 1e-3, "n_sites_per_experiment": 3}, "cell_line_hepg2": {"lr": 2e-3}})
    assert hepg2["cell_type"] == "HEPG2" and hepg2["init_from"] == "resnet50" and hepg2["arch"] == "resnet18"
    assert hepg2["lr"] == 2e-3 and "n_sites_per_experiment" not in hepg2 and hepg2["stage"] == "cell_line_hepg2"
    assert stage_params(get_stage("eda"), "smoke", {"all": {"n_sites_per_experiment": 3}})["n_sites_per_experiment"] == 3
    assert stage_params(get_stage("merge"), "full")["stages"] == group_members(CELL_LINE)


def test_bad_parameters_name_stage_and_parameter():
    with pytest.raises(ValueError, match="stage resnet50: unknown parameter 'learning_rate'"):
        stage_params(get_stage("resnet50"), "full", {"resnet50": {"learning_rate": 1}})
    with pytest.raises(ValueError, match="stage resnet50: .*'arch'"):
        stage_params(get_stage("resnet50"), "full", {"resnet50": {"arch": ""}})
    with pytest.raises(ValueError, match="stage base_cnn: .*'epochs'.*expected int"):
        stage_params(get_stage("base_cnn"), "full", parse_overrides(["base_cnn.epochs=many"]))
    with pytest.raises(ValueError, match="stage merge: .*postprocess"):
        stage_params(get_stage("merge"), "full", {"merge": {"postprocess": "vote"}})
    with pytest.raises(ValueError, match="unknown profile 'fast'"):
        stage_params(get_stage("eda"), "fast")


def test_time_budget_applies_to_training_stages_and_conflicts_are_errors():
    assert stage_params(get_stage("resnet50"), "smoke", time_budget_s=60)["time_budget_s"] == 60.0
    assert "time_budget_s" not in stage_params(get_stage("eda"), "smoke", time_budget_s=60)
    same = stage_params(get_stage("resnet50"), "smoke", {"resnet50": {"time_budget_s": 60}}, time_budget_s=60)
    assert same["time_budget_s"] == 60.0
    with pytest.raises(ValueError, match="time_budget_s=30.*conflicts with --time-budget 60"):
        stage_params(get_stage("resnet50"), "smoke", {"resnet50": {"time_budget_s": 30}}, time_budget_s=60)
    assert stage_params(get_stage("resnet50"), "smoke", {"resnet50": {"time_budget_s": 30}})["time_budget_s"] == 30


def test_bare_notebook_gets_its_stage_defaults():
    params = with_stage_defaults("cell_line_u2os", {"stage": "cell_line_u2os", "output_dir": "o", "epochs": 1})
    cfg = TrainConfig.from_params(params)
    assert cfg.cell_type == "U2OS" and cfg.init_from == "resnet50" and cfg.epochs == 1 and cfg.lr == 4e-4
    assert with_stage_defaults("my_own_stage", {"epochs": 1}) == {"epochs": 1}


def test_accepted_parameters_are_the_config_fields():
    assert accepted_parameters(get_stage("resnet50")) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert "postprocess" in accepted_parameters(get_stage("merge"))
    assert "epochs" not in accepted_parameters(get_stage("eda"))
