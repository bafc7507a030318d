"""Issue 13's ingredients outside the loop: controls as classes, the combined head, never predicting a
control, ImageNet weights found or said missing, the winners profile and its GPU-hour estimate."""
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_loop import TinySites  # noqa: E402

from kernel_lib import controls, gpu_plan, inference, metadata, models, registry  # noqa: E402
from kernel_lib.config import TrainConfig  # noqa: E402
from kernel_lib.parameters import stage_params  # noqa: E402


def test_class_lists_put_treatments_first_and_controls_after(real_wells):
    head, treatments = controls.class_lists(real_wells, "train+test")
    assert treatments == metadata.class_list(real_wells) and len(treatments) == 1108
    assert head[:1108] == treatments and len(head) == 1108 + 31
    assert set(head[1108:]) == {str(i) for i in range(1108, 1139)}
    assert controls.class_lists(real_wells, "none") == (treatments, treatments)


def test_training_controls_by_mode_and_never_a_treatment_well(real_wells):
    train_w, val_w, _ = metadata.split_train_val(real_wells, "experiment", 1, 0.025, 42)
    only_train = controls.training_controls(real_wells, train_w, "train")
    every = controls.training_controls(real_wells, train_w, "train+test")
    assert set(only_train["experiment"]) == set(train_w["experiment"])
    assert set(only_train["dataset"]) == {"train"}
    # train+test: the test experiments' controls (public labels) and the validation experiments' too
    assert set(every["experiment"]) == set(real_wells["experiment"])
    assert len(every) == 4097 + 2246 and (every["well_type"] != "treatment").all()
    test_rows = every[every["dataset"] == "test"]
    assert len(test_rows) == 2246 and set(test_rows["well_type"]) == {"negative_control", "positive_control"}
    hepg2 = controls.training_controls(real_wells, train_w, "train+test", "HEPG2")
    assert set(hepg2["cell_type"]) == {"HEPG2"}
    assert len(controls.training_controls(real_wells, train_w, "none")) == 0


def test_load_data_with_test_controls_trains_on_them_and_validates_on_treatments(small_synthetic, tmp_path):
    from kernel_lib import train_stage

    cfg = TrainConfig(stage="resnet50", data_dir=str(small_synthetic), output_dir=str(tmp_path), device="cpu",
                      controls="train+test", normalization="image")
    data = train_stage.load_data(cfg)
    frame = data.train.frame
    test_rows = frame[frame["dataset"] == "test"]
    assert len(test_rows) > 0 and (test_rows["well_type"] != "treatment").all()
    assert (data.val.frame["well_type"] == "treatment").all() and (data.test.frame["well_type"] == "treatment").all()
    n_treat = len(metadata.class_list(data.wells))
    assert data.train.target_classes == data.classes[:n_treat] and len(data.classes) > n_treat
    labels = torch.tensor([data.train[i]["label"].item() for i in range(0, len(frame), 7)])
    assert labels.max() >= n_treat  # control wells train their own classes


class ControlLover(torch.nn.Module):
    """Logits that put every site in the last class (a control) by a wide margin."""

    def forward(self, x, cell_type=None):
        out = torch.zeros(len(x), 3)
        out[:, 2] = 100.0
        out[:, 1] = x.mean((1, 2, 3))
        return out


def test_treatment_wells_are_never_predicted_as_controls(tmp_path):
    sites = TinySites(4, labels=[0, 1, 0, 1])
    sites.target_classes = sites.classes[:2]  # 'UNTREATED' is a training-only class
    logits, labels = inference.infer(ControlLover(), sites, torch.device("cpu"), None, False, 4, 0, False, "t", 60,
                                     show=False)
    assert logits.shape == (8, 2) and labels.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    path = inference.write_predictions(tmp_path / "p.npz", sites, logits.numpy(), "test")
    from kernel_lib.predictions import load_predictions

    assert load_predictions(path).classes == ["sirna_7", "sirna_2"]
    metrics = inference.evaluate(logits, labels, sites.frame["id_code"].tolist(), sites.frame["cell_type"].tolist())
    assert 0 <= metrics["val_acc_well"] <= 1 and math.isfinite(metrics["val_loss"])
    sites.target_classes = ["sirna_2"]
    with pytest.raises(ValueError, match="first classes"):
        inference.target_classes(sites)


def test_combined_head_predicts_from_softmax_and_trains_both():
    torch.manual_seed(0)
    model = models.build_model("resnet18", 5, head="combined")
    x = torch.randn(2, 6, 32, 32)
    model.eval()
    both = model(x, all_heads=True)
    plain = model(x)
    assert both.shape == (2, 10) and plain.shape == (2, 5)
    assert torch.allclose(both[:, :5], plain)
    assert both[:, 5:].abs().max() <= 30.0 + 1e-4  # the ArcFace half is scale * cosine
    assert torch.allclose(plain, model.head.linear(model.backbone(x)))
    head_names = {n for n, _ in model.named_parameters() if n.startswith("head.")}
    assert head_names == {"head.linear.weight", "head.linear.bias", "head.cosine.weight"}


def test_combined_loss_is_the_weighted_sum(tmp_path):
    from kernel_lib import train as tr

    cfg = TrainConfig(stage="x", output_dir=str(tmp_path), head="combined", arcface_weight=0.25,
                      arcface_margin=0.2, arcface_scale=10.0)
    out = torch.randn(4, 6)
    target = torch.tensor([0, 1, 2, 1])
    run = tr._Run.__new__(tr._Run)
    run.cfg = cfg
    expected = (0.75 * torch.nn.functional.cross_entropy(out[:, :3], target)
                + 0.25 * models.margin_cross_entropy(out[:, 3:], target, 0.2, 10.0))
    assert torch.allclose(run.loss(out, target), expected)
    lam, partner = torch.tensor([1.0, 0.5, 0.0, 1.0]), torch.tensor([1, 2, 3, 0])
    mixed = run.loss(out, target, lam, partner)
    per = run.sample_loss(out, target)
    assert torch.allclose(mixed, (lam * per + (1 - lam) * run.sample_loss(out, target[partner])).mean())


def test_pretrained_auto_finds_the_file_or_says_it_trains_from_scratch(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_ROOT", str(tmp_path / "kaggle"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.warns(UserWarning, match="no resnet18 ImageNet weights file found; trained from scratch"):
        model = models.build_model("resnet18", 4, pretrained="auto")
    assert model.pretrained_source.startswith("none (pretrained='auto'")
    name = models.expected_weight_files("resnet18")[0]
    nested = tmp_path / "kaggle" / "input" / "datasets" / "someone" / "imagenet"
    nested.mkdir(parents=True)
    # find_pretrained goes by torchvision's file names only (the hash is checked when the file loads)
    path = nested / name.replace(name.rsplit("-", 1)[-1].split(".")[0], "")  # the name without its hash
    path.write_bytes(b"weights")
    assert models.find_pretrained("resnet18") is None  # a name without torchvision's hash is not its file
    (nested / name).write_bytes(b"weights")
    assert models.find_pretrained("resnet18") == nested / name


@pytest.mark.slow  # GPU plans of the real metadata (FLOP counts)
def test_winners_profile_sets_every_ingredient_and_fits_the_weekly_quota():
    params = stage_params(registry.get_stage("resnet50"), "winners")
    expected = {"arch": "densenet161", "image_size": 512, "crop_size": 384, "controls": "train+test",
                "head": "combined", "arcface_weight": 0.2, "predict_with": "best", "pretrained": "auto", "tta": True}
    assert {k: params[k] for k in expected} == expected
    assert params["cutmix_prob"] > 0 and params["intensity_scale"] > 0 and params["intensity_bias"] > 0
    cell = stage_params(registry.get_stage("cell_line_rpe"), "winners")
    assert (cell["init_from"], cell["cell_type"], cell["controls"], cell["head"]) == ("resnet50", "RPE",
                                                                                      "train+test", "combined")
    plans = {p.stage: p for p in gpu_plan.plan("winners", chunk_budget_s=30600)}
    total = sum(p.hours for p in plans.values())
    assert 10 < total <= 0.8 * gpu_plan.WEEKLY_QUOTA_H, total
    assert "pseudo_label" in plans  # the recipe runs it (registry.PROFILE_EXTRAS)
    assert plans["resnet50"].hours > sum(p.hours for k, p in plans.items() if k.startswith("cell_line"))
    # controls=train+test adds control sites to training; 384-px crops train faster than 512 px
    full = {p.stage: p for p in gpu_plan.plan("full", chunk_budget_s=30600)}
    assert plans["resnet50"].train_sites > full["resnet50"].train_sites
    assert plans["resnet50"].train_ips > gpu_plan.published_rates("densenet161", 512)[0]


@pytest.mark.parametrize("profile", sorted(registry.PROFILES))
def test_cell_lines_build_the_head_their_init_from_stage_trained(profile):
    # init_from loads resnet50's model.pt: the head kind and the class list (controls) must agree
    upstream = stage_params(registry.get_stage("resnet50"), profile)
    for name in [*registry.group_members(registry.CELL_LINE), "pseudo_label"]:
        params = stage_params(registry.get_stage(name), profile)
        assert params["init_from"] == "resnet50"
        assert (params.get("head", "linear"), params.get("controls", "none")) == (
            upstream.get("head", "linear"), upstream.get("controls", "none"))
    if profile == "synthetic":  # what helped in the ablation and fits the 5-minute chain (RESULTS.md)
        cfg = TrainConfig.from_params(upstream)
        assert (cfg.head, cfg.controls, cfg.predict_with) == ("combined", "train+test", "best")
        assert upstream.get("cutmix_prob", 0) == 0 and upstream.get("crop_size", 0) == 0  # they hurt there


def _pseudo_csv(folder: Path, wells: pd.DataFrame, probabilities: list[float]) -> pd.DataFrame:
    """A merge stage's folder with pseudo_labels.csv for the first test treatment wells."""
    from kernel_lib.outputs import update_metrics

    folder.mkdir(parents=True, exist_ok=True)
    update_metrics(folder, stage="merge", finished=True)
    test = wells[(wells["dataset"] == "test") & (wells["well_type"] == "treatment")].iloc[:len(probabilities)]
    labels = test[["id_code", "experiment", "plate", "well", "cell_type"]].assign(
        sirna=metadata.class_list(wells)[:len(probabilities)], probability=probabilities)
    labels.to_csv(folder / "pseudo_labels.csv", index=False)
    return labels


def test_pseudo_labels_train_on_the_confident_test_wells_only(real_wells, tmp_path):
    from kernel_lib import train_stage

    classes = metadata.class_list(real_wells)
    labels = _pseudo_csv(tmp_path / "merge", real_wells, [0.4, 0.95, 0.9, 0.1])
    cfg = TrainConfig(stage="pseudo_label", pseudo_labels="merge", pseudo_threshold=0.9, input_dirs=(str(tmp_path),))
    rows, report = train_stage.pseudo_label_wells(cfg, real_wells, classes, tmp_path)
    assert rows["id_code"].tolist() == labels["id_code"].iloc[[1, 2]].tolist()
    assert rows["sirna"].tolist() == classes[1:3]  # the merge's labels, not test.csv's empty ones
    assert set(rows["dataset"]) == {"test"} and list(rows.columns) == list(real_wells.columns)
    assert report == {"from": "merge", "threshold": 0.9, "wells": 2, "of_wells": 4}
    other = labels["cell_type"].iloc[1]
    none_of_them = "RPE" if other != "RPE" else "U2OS"
    rows, report = train_stage.pseudo_label_wells(
        TrainConfig(**{**cfg.to_dict(), "cell_type": none_of_them}), real_wells, classes, tmp_path)
    assert len(rows) == 0 and report["of_wells"] == 0
    assert train_stage.pseudo_label_wells(TrainConfig(), real_wells, classes, tmp_path)[1] is None


def test_bad_pseudo_labels_are_named(real_wells, tmp_path):
    from kernel_lib import train_stage

    classes = metadata.class_list(real_wells)
    cfg = TrainConfig(stage="pseudo_label", pseudo_labels="merge", input_dirs=(str(tmp_path),))
    with pytest.raises(FileNotFoundError, match="no output of stage 'merge'"):
        train_stage.pseudo_label_wells(cfg, real_wells, classes, tmp_path)
    labels = _pseudo_csv(tmp_path / "merge", real_wells, [0.95, 0.95])
    train_id = real_wells.loc[real_wells["dataset"] == "train", "id_code"].iloc[0]
    labels.assign(id_code=[labels["id_code"].iloc[0], train_id]).to_csv(tmp_path / "merge" / "pseudo_labels.csv",
                                                                         index=False)
    with pytest.raises(ValueError, match=f"id_code '{train_id}' .* is not a test treatment well"):
        train_stage.pseudo_label_wells(cfg, real_wells, classes, tmp_path)
    labels.assign(sirna="not-a-sirna").to_csv(tmp_path / "merge" / "pseudo_labels.csv", index=False)
    with pytest.raises(ValueError, match="pseudo_labels.csv: unknown label 'not-a-sirna'"):
        train_stage.pseudo_label_wells(cfg, real_wells, classes, tmp_path)
    (tmp_path / "merge" / "pseudo_labels.csv").unlink()
    with pytest.raises(FileNotFoundError, match="pseudo_labels='merge': .*pseudo_labels.csv not found"):
        train_stage.pseudo_label_wells(cfg, real_wells, classes, tmp_path)


@pytest.mark.slow  # GPU plans of the real metadata (FLOP counts)
def test_the_gpu_plan_counts_the_optional_stages_it_runs():
    base = {p.stage: p for p in gpu_plan.plan("full", chunk_budget_s=30600)}
    more = {p.stage: p for p in gpu_plan.plan("full", chunk_budget_s=30600, extra=["fold", "final_fit"])}
    assert set(more) - set(base) == {"final_fit", "fold_0", "fold_1", "fold_2"}
    # a final fit trains on the held-out experiments too; each fold holds out about a third of them
    assert more["final_fit"].train_sites == base["resnet50"].train_sites + base["resnet50"].val_sites
    assert more["final_fit"].val_sites == 0
    assert sum(more[f"fold_{k}"].val_sites for k in range(3)) == more["final_fit"].train_sites
    assert sum(p.hours for p in more.values()) > sum(p.hours for p in base.values()) + 3 * base["resnet50"].hours
