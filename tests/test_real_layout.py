"""The real RxRx1 layout as a synthetic dataset: the real experiments, plates, wells and plate
groups from the competition's metadata, made-up test labels consistent with them, and the whole
chain at that shape (1,108 classes) on a small subset."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from kernel_lib import metadata, plates, synthetic
from kernel_lib.chain import Chain
from kernel_lib.predictions import load_predictions
from kernel_lib.real_layout import real_layout_wells

# 2 train experiments per cell type + 1 test (plate groups are inferred from whole plates: keep all 4)
CHAIN_SUBSET = ("HEPG2-01", "HEPG2-05", "HEPG2-08", "HUVEC-01", "HUVEC-07", "HUVEC-17",
                "RPE-01", "RPE-06", "RPE-08", "U2OS-01", "U2OS-02", "U2OS-04")


@pytest.fixture(scope="module")
def layout():
    return real_layout_wells()


@pytest.mark.slow  # the real layout's 125,510 sites
def test_the_whole_real_layout(layout, real_wells):
    wells, groups, rotations = layout
    assert len(wells) * 2 == 125_510 and wells["experiment"].nunique() == 51
    assert (wells.groupby("dataset")["experiment"].nunique() == pd.Series({"test": 18, "train": 33})).all()
    # every real well is there, with its real label wherever the metadata has one
    real = real_wells.set_index("id_code")
    ours = wells.set_index("id_code").loc[real.index]
    known = real["sirna"] != ""
    assert (ours.loc[known, "sirna"] == real.loc[known, "sirna"]).all()
    assert [len(g) for g in groups.groups] == [277] * 4
    assert sorted(set(rotations.values())) == [0, 1, 2, 3] and len(rotations) == 18
    assert 3 in rotations.values() and 3 not in groups.rotation.values()   # the rotation only test holds


@pytest.mark.slow  # the real layout's 125,510 sites
def test_made_up_test_labels_respect_groups_and_uniqueness(layout):
    wells, groups, rotations = layout
    test = wells[(wells["dataset"] == "test") & (wells["well_type"] == "treatment")]
    assert (test["sirna"] != "").all() and not test.duplicated(["experiment", "sirna"]).any()
    for (experiment, plate), plate_wells in test.groupby(["experiment", "plate"]):
        group = set(groups.groups[groups.group_on_plate(rotations[experiment], plate)])
        assert set(plate_wells["sirna"]) <= group, (experiment, plate)


@pytest.mark.slow
def test_a_generated_subset_is_a_kaggle_layout_with_the_real_groups(tmp_path, layout):
    _, real_groups, _ = layout
    spec = synthetic.real_layout_spec(8, experiments=("HEPG2-01", "HEPG2-08"))
    data = synthetic.generate(tmp_path, spec, progress=False, workers=2)
    wells = metadata.read_wells(data)
    assert sorted(wells["experiment"].unique()) == ["HEPG2-01", "HEPG2-08"]
    assert len(list(data.rglob("*.png"))) == 6 * 2 * len(wells)
    # one train experiment: all four groups, less the siRNAs of its removed wells
    real_train = layout[0][(layout[0]["dataset"] == "train") & (layout[0]["well_type"] == "treatment")]
    expected = set(real_train.loc[real_train["experiment"] == "HEPG2-01", "sirna"])
    assert set(metadata.class_list(wells)) == expected and len(expected) > 1100
    inferred = plates.infer_plate_groups(wells)
    assert all(set(g) <= set(real) for g, real in zip(inferred.groups, real_groups.groups))
    truth = synthetic.read_test_truth(data)
    assert len(truth) == len(pd.read_csv(data / "test.csv")) and truth["sirna"].isin(real_groups.label_to_group).all()
    spec_json = json.loads((tmp_path / "spec.json").read_text())
    assert spec_json["test_rotations"].keys() == {"HEPG2-08"}


@pytest.mark.slow
def test_string_vocabulary_and_worker_independence(tmp_path):
    spec = synthetic.real_layout_spec(8, experiments=("U2OS-01",), plates_per_experiment=1, vocabulary="string")
    one = synthetic.generate(tmp_path / "one", spec, progress=False, workers=1)
    two = synthetic.generate(tmp_path / "two", spec, progress=False, workers=2)
    train = pd.read_csv(one / "train.csv", dtype=str)
    assert train["sirna"].str.match(r"^sirna_\d+$").all()
    assert (pd.read_csv(one / "train_controls.csv", dtype=str)["sirna"] == "UNTREATED").any()
    for path in sorted(one.rglob("*.png"))[:50]:
        assert path.read_bytes() == (two / path.relative_to(one)).read_bytes()


@pytest.mark.slow  # the real layout's 125,510 sites
def test_named_datasets_and_bad_names():
    assert synthetic.dataset_spec("real-layout").layout == "real"
    assert synthetic.dataset_spec("real-layout-subset", 32).image_size == 32
    with pytest.raises(ValueError, match="unknown synthetic dataset 'real'"):
        synthetic.dataset_spec("real")
    with pytest.raises(ValueError, match="experiments \\['XYZ-01'\\]"):
        real_layout_wells(experiments=["XYZ-01"])


@pytest.mark.slow
def test_every_stage_at_the_real_shape(tmp_path_factory):
    """Every stage on 12 real experiments at 16 px (the base CNN's smallest size): 1,108 classes end to end."""
    root = tmp_path_factory.mktemp("real_layout")
    data = synthetic.ensure(root, synthetic.real_layout_spec(16, experiments=CHAIN_SUBSET),
                            progress=False)
    chain = Chain(data_dir=data, out=root / "out", profile="smoke", progress=False, write_html=False,
                  overrides={"all": {"image_size": 16, "sites": [1]}})  # one site per well: half the reading
    chain.run()
    for stage in ("base_cnn", "resnet50", "cell_line_hepg2"):
        classes = json.loads((chain.out / stage / "classes.json").read_text())
        assert len(classes) == 1108
        pred = load_predictions(chain.out / stage / "predictions_test.npz")
        assert pred.logits.shape[1] == 1108
    sub = pd.read_csv(chain.out / "submission.csv", dtype=str)
    test = pd.read_csv(data / "test.csv", dtype=str)
    assert sorted(sub["id_code"]) == sorted(test["id_code"]) and not sub["id_code"].duplicated().any()
    # the merge keeps each plate's group: every plate's labels come from one plate group
    groups = plates.infer_plate_groups(metadata.read_wells(data))
    merged = sub.merge(test, on="id_code")
    for (_, _), plate in merged.groupby(["experiment", "plate"]):
        assert plate["sirna"].map(groups.label_to_group).nunique() == 1
        assert not plate["sirna"].duplicated().any()               # the assignment: once per plate
    eda = json.loads((chain.out / "eda" / "metrics.json").read_text())
    assert eda["finished"]
