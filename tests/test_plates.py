"""Plate groups inferred from train metadata: the real layout, a made-up layout, corrupt data."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kernel_lib import metadata
from kernel_lib.plates import infer_plate_groups


@pytest.fixture(scope="module")
def real_groups(real_wells):
    return infer_plate_groups(real_wells)


def _train_treatments(wells: pd.DataFrame) -> pd.DataFrame:
    return wells[(wells["dataset"] == "train") & (wells["well_type"] == "treatment")]


def test_real_train_gives_four_disjoint_groups_of_277_covering_all_treatments(real_wells, real_groups):
    classes = metadata.class_list(real_wells)
    assert real_groups.n_groups == 4 and real_groups.plates == (1, 2, 3, 4)
    assert [len(g) for g in real_groups.groups] == [277] * 4
    members = [l for g in real_groups.groups for l in g]
    assert len(set(members)) == len(members) == len(classes) == 1108
    assert set(members) == set(classes)
    assert all(g == metadata.sort_labels(g) for g in real_groups.groups)
    assert all(real_groups.label_to_group[l] == k for k, g in enumerate(real_groups.groups) for l in g)


def test_real_train_plates_each_hold_one_group_rotated_per_experiment(real_wells, real_groups):
    train = _train_treatments(real_wells)
    assert len(real_groups.rotation) == train["experiment"].nunique() == 33
    for (experiment, plate), wells in train.groupby(["experiment", "plate"]):
        held = {real_groups.label_to_group[l] for l in wells["sirna"]}
        assert held == {real_groups.plate_group(experiment, plate)}, (experiment, plate)
        assert held == {(plate - 1 + real_groups.rotation[experiment]) % 4}
    # canonical ids: group 0 is what plate 1 of the first experiment holds
    first = sorted(train["experiment"].unique())[0]
    plate1 = train[(train["experiment"] == first) & (train["plate"] == 1)]["sirna"]
    assert set(plate1) <= set(real_groups.groups[0])
    assert real_groups.rotation[first] == 0
    assert len(set(real_groups.rotation.values())) > 1  # rotations really differ between experiments


def test_mask_for_follows_the_class_order_and_excludes_controls(real_wells, real_groups):
    classes = metadata.class_list(real_wells, include_controls=True)
    mask = real_groups.mask_for(classes)
    assert mask.shape == (4, len(classes)) and mask.dtype == bool
    assert mask.sum(axis=1).tolist() == [277] * 4
    assert mask.sum(axis=0).max() == 1
    controls = set(real_wells.loc[real_wells["well_type"] != "treatment", "sirna"])
    assert not mask[:, [j for j, c in enumerate(classes) if c in controls]].any()
    reversed_mask = real_groups.mask_for(classes[::-1])
    np.testing.assert_array_equal(reversed_mask, mask[:, ::-1])
    j = classes.index(real_groups.groups[2][5])
    assert mask[:, j].tolist() == [False, False, True, False]


def test_string_vocabulary_gives_the_same_partition(string_vocabulary, real_groups):
    folder, mapping = string_vocabulary
    groups = infer_plate_groups(metadata.read_wells(folder))
    assert metadata.vocabulary_kind(groups.groups[0]) == "string"
    assert all(l.startswith("sirna_") for g in groups.groups for l in g)
    assert [set(g) for g in groups.groups] == [{mapping[l] for l in g} for g in real_groups.groups]
    assert groups.rotation == real_groups.rotation


def _layout(rotations: dict[str, int], n_plates: int = 3, group_size: int = 5,
            first_plate: int = 1) -> pd.DataFrame:
    """A made-up metadata frame: ``n_plates`` groups of ``group_size`` siRNAs, plates
    first_plate.., experiment e holding group (position + rotation) % n_plates on each plate."""
    rows = []
    for experiment, r in rotations.items():
        for position in range(n_plates):
            plate = first_plate + position
            group = (position + r) % n_plates
            for i in range(group_size):
                well = f"R{i:02d}"
                rows.append(dict(id_code=f"{experiment}_{plate}_{well}", experiment=experiment, plate=plate,
                                 well=well, sirna=f"s{group}_{i}", well_type="treatment",
                                 cell_type=experiment.split("-")[0], dataset="train"))
    return pd.DataFrame(rows, columns=metadata.WELL_COLUMNS)


def test_made_up_layout_with_three_plates_is_recovered_with_canonical_ids():
    truth = {"A-01": 2, "A-02": 0, "B-01": 1, "B-02": 2}
    wells = _layout(truth, first_plate=5)
    wells = wells.drop(wells.index[[3, 17]])  # removed wells
    groups = infer_plate_groups(wells)
    assert groups.n_groups == 3 and groups.plates == (5, 6, 7)
    # A-01 comes first, so its plate 5 (true group 2) becomes group 0
    relabel = {(k + truth["A-01"]) % 3: k for k in range(3)}
    assert groups.rotation == {e: (r - truth["A-01"]) % 3 for e, r in truth.items()}
    for k in range(3):
        assert groups.groups[relabel[k]] == metadata.sort_labels([f"s{k}_{i}" for i in range(5)])
    assert groups.plate_group("B-01", 7) == relabel[(2 + 1) % 3]


def test_a_plate_mixing_two_groups_is_an_error_naming_experiment_plate_and_well(real_wells):
    wells = real_wells.copy()
    train = _train_treatments(wells)
    a = train[(train["experiment"] == "HUVEC-05") & (train["plate"] == 2)].index[10]
    b = train[(train["experiment"] == "HUVEC-05") & (train["plate"] == 3)].index[20]
    wells.loc[[a, b], "sirna"] = wells.loc[[b, a], "sirna"].to_numpy()
    with pytest.raises(ValueError, match=rf"HUVEC-05 plate 2 well {wells.at[a, 'well']} .*mixes two plate groups"):
        infer_plate_groups(wells)


def test_plates_permuted_without_rotation_is_an_error_naming_the_experiment(real_wells):
    wells = real_wells.copy()
    exp = wells["experiment"] == "RPE-03"
    wells.loc[exp, "plate"] = wells.loc[exp, "plate"].map({1: 2, 2: 1, 3: 3, 4: 4})
    with pytest.raises(ValueError, match=r"experiment RPE-03 plate [12] well .*plate group"):
        infer_plate_groups(wells)


def test_a_sirna_twice_in_one_experiment_is_an_error():
    wells = _layout({"A-01": 0, "A-02": 1})
    wells.loc[(wells["id_code"] == "A-02_2_R01"), "sirna"] = "s1_0"
    with pytest.raises(ValueError, match=r"A-02: siRNA 's1_0' appears more than once \(A-02_\d_R0\d, A-02_\d_R0\d\)"):
        infer_plate_groups(wells)


def test_an_experiment_sharing_no_sirna_cannot_be_placed():
    wells = _layout({"A-01": 0})
    stray = _layout({"Z-01": 0}).assign(sirna=lambda f: "x" + f["sirna"])
    with pytest.raises(ValueError, match=r"\['Z-01'\] share no siRNA with \['A-01'\]"):
        infer_plate_groups(pd.concat([wells, stray], ignore_index=True))


def test_errors_for_missing_train_data_unknown_experiment_and_plate(real_groups):
    wells = _layout({"A-01": 0}).assign(dataset="test")
    with pytest.raises(ValueError, match="no train treatment wells"):
        infer_plate_groups(wells)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['well_type'\]"):
        infer_plate_groups(wells.drop(columns="well_type"))
    with pytest.raises(KeyError, match="HEPG2-08"):
        real_groups.plate_group("HEPG2-08", 1)
    with pytest.raises(ValueError, match=r"plate 5 is not one of the train plates \[1, 2, 3, 4\]"):
        real_groups.group_on_plate(0, 5)
