"""The synthetic RxRx1-format dataset: Kaggle's files and headers, the plate structure of the real
data (controls, plate groups and their rotation), determinism, caching, and batch effects that
per-plate normalisation measurably removes."""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kernel_lib import data, metadata, synthetic

TINY = synthetic.SyntheticSpec(cell_types=("HEPG2", "RPE"), train_experiments=1, test_experiments=1, plates=2,
                               sirnas_per_group=2, positive_controls=2, image_size=8, cells_per_site=3)


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def layout(small_synthetic) -> pd.DataFrame:
    """Every well of the small dataset with its true label, from the raw CSVs and test_truth.csv."""
    d = small_synthetic
    truth = read(d.parent / "test_truth.csv")
    parts = [read(d / "train.csv").assign(well_type="treatment", dataset="train"),
             read(d / "test.csv").merge(truth, on="id_code").assign(well_type="treatment", dataset="test"),
             read(d / "train_controls.csv").assign(dataset="train"),
             read(d / "test_controls.csv").assign(dataset="test")]
    wells = pd.concat(parts, ignore_index=True)
    wells["plate"] = wells["plate"].astype(int)
    return wells


@pytest.fixture(scope="module")
def groups(small_synthetic) -> list[list[str]]:
    return json.loads((small_synthetic.parent / "spec.json").read_text())["groups"]


def file_bytes(data_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(data_dir)): p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file()}


def test_csv_headers_are_kaggles(small_synthetic):
    header = {name: (small_synthetic / name).read_text().splitlines()[0]
              for name in ("train.csv", "test.csv", "train_controls.csv", "test_controls.csv",
                           "sample_submission.csv")}
    assert header == {"train.csv": "id_code,experiment,plate,well,sirna",
                      "test.csv": "id_code,experiment,plate,well",
                      "train_controls.csv": "id_code,experiment,plate,well,sirna,well_type",
                      "test_controls.csv": "id_code,experiment,plate,well,sirna,well_type",
                      "sample_submission.csv": "id_code,sirna"}


def test_sample_submission_lists_the_test_treatment_wells(small_synthetic):
    submission = read(small_synthetic / "sample_submission.csv")
    test = read(small_synthetic / "test.csv")
    assert submission["id_code"].tolist() == test["id_code"].tolist() and len(test) > 0
    assert set(submission["sirna"]) <= set(read(small_synthetic / "train.csv")["sirna"])


def test_id_codes_and_experiments(layout, small_synthetic_spec):
    spec = small_synthetic_spec
    assert (layout["id_code"] == layout["experiment"] + "_" + layout["plate"].astype(str) + "_" + layout["well"]).all()
    assert layout["id_code"].is_unique
    train = set(layout.loc[layout["dataset"] == "train", "experiment"])
    test = set(layout.loc[layout["dataset"] == "test", "experiment"])
    assert not train & test
    assert len(train) == spec.train_experiments * len(spec.cell_types)
    assert len(test) == spec.test_experiments * len(spec.cell_types)
    assert {e.split("-")[0] for e in test} == set(spec.cell_types)
    assert set(layout.groupby("experiment")["plate"].nunique()) == {spec.plates}


def test_b02_is_the_negative_control_on_every_plate(layout):
    plates = layout[["experiment", "plate"]].drop_duplicates()
    negative = layout[layout["well_type"] == "negative_control"]
    assert (negative["well"] == "B02").all()
    assert len(negative) == len(plates) and negative["sirna"].nunique() == 1
    assert not (layout.loc[layout["well_type"] != "negative_control", "well"] == "B02").any()


def test_positive_controls_sit_at_the_same_wells_on_every_plate(layout, small_synthetic_spec):
    positive = layout[layout["well_type"] == "positive_control"]
    per_plate = positive.groupby(["experiment", "plate"]).apply(
        lambda p: tuple(sorted(zip(p["well"], p["sirna"]))), include_groups=False)
    assert per_plate.nunique() == 1
    assert len(per_plate.iloc[0]) == small_synthetic_spec.positive_controls
    controls = {s for _, s in per_plate.iloc[0]}
    assert not controls & set(layout.loc[layout["well_type"] == "treatment", "sirna"])


def test_plate_groups_partition_the_treatment_sirnas(layout, groups, small_synthetic_spec):
    spec = small_synthetic_spec
    flat = [s for g in groups for s in g]
    assert len(groups) == spec.plates and {len(g) for g in groups} == {spec.sirnas_per_group}
    assert len(set(flat)) == len(flat)
    assert set(flat) == set(layout.loc[layout["well_type"] == "treatment", "sirna"])


def test_each_plate_holds_one_group_rotated_per_experiment(layout, groups, small_synthetic_spec):
    spec = small_synthetic_spec
    group_of = {s: g for g, members in enumerate(groups) for s in members}
    treatment = layout[layout["well_type"] == "treatment"]
    rotations = set()
    for experiment, wells in treatment.groupby("experiment"):
        plate_group = {}
        for plate, p in wells.groupby("plate"):
            held = {group_of[s] for s in p["sirna"]}
            assert len(held) == 1, f"{experiment} plate {plate} mixes groups {held}"
            plate_group[plate] = held.pop()
        shifts = {(g - (plate - 1)) % spec.plates for plate, g in plate_group.items()}
        assert len(shifts) == 1, f"{experiment}: plates {plate_group} are not a rotation of the groups"
        rotations |= shifts
    assert len(rotations) > 1          # experiments differ in their rotation, as in RxRx1


def test_each_treatment_sirna_at_most_once_per_experiment(layout, small_synthetic_spec):
    spec = small_synthetic_spec
    treatment = layout[layout["well_type"] == "treatment"]
    assert not treatment.duplicated(["experiment", "sirna"]).any()
    # only removed wells (at most one per plate) are missing
    per_experiment = treatment.groupby("experiment")["sirna"].nunique()
    n_treat = spec.plates * spec.sirnas_per_group
    assert per_experiment.min() >= n_treat - spec.plates and per_experiment.max() == n_treat
    assert (per_experiment < n_treat).any()     # removal happens (rate 0.25 over 20 experiments)


def test_every_site_has_six_channel_pngs_and_nothing_else(layout, small_synthetic, small_synthetic_spec):
    spec = small_synthetic_spec
    expected = {f"{r.dataset}/{r.experiment}/Plate{r.plate}/{r.well}_s{s}_w{c}.png"
                for r in layout.itertuples() for s in range(1, spec.sites + 1) for c in range(1, 7)}
    found = {str(p.relative_to(small_synthetic)) for p in small_synthetic.rglob("*.png")}
    assert found == expected
    some = small_synthetic / sorted(expected)[0]
    img = Image.open(some)
    assert img.mode == "L" and img.size == (spec.image_size, spec.image_size)


def test_test_truth_lies_beside_data_not_inside(small_synthetic):
    assert (small_synthetic.parent / "test_truth.csv").is_file()
    assert not list(small_synthetic.rglob("test_truth*"))
    truth = synthetic.read_test_truth(small_synthetic)
    assert list(truth.columns) == ["id_code", "sirna"]
    assert truth["id_code"].tolist() == read(small_synthetic / "test.csv")["id_code"].tolist()
    assert set(truth["sirna"]) <= set(read(small_synthetic / "train.csv")["sirna"])


def test_test_truth_is_none_for_real_data(real_metadata_dir):
    assert synthetic.read_test_truth(real_metadata_dir) is None


def test_generation_is_deterministic_per_seed(tmp_path):
    # the same files whether two processes render the experiments or this one does
    a = file_bytes(synthetic.generate(tmp_path / "a", TINY, progress=False, workers=2))
    again = file_bytes(synthetic.generate(tmp_path / "again", TINY, progress=False, workers=1))
    other = file_bytes(synthetic.generate(tmp_path / "other", replace(TINY, seed=1), progress=False, workers=1))
    png = "train/HEPG2-01/Plate1/B02_s1_w2.png"
    assert a[png] == again[png] and a == again
    assert a[png] != other[png]
    assert a["train.csv"] != other["train.csv"]


def test_string_vocabulary(tmp_path):
    d = synthetic.generate(tmp_path, replace(TINY, vocabulary="string"), progress=False, workers=1)
    train, controls = read(d / "train.csv"), read(d / "train_controls.csv")
    assert all(re.fullmatch(r"sirna_\d+", s) for s in train["sirna"])
    negative = controls.loc[controls["well_type"] == "negative_control", "sirna"]
    positive = controls.loc[controls["well_type"] == "positive_control", "sirna"]
    assert set(negative) == {"UNTREATED"} and all(re.fullmatch(r"sirna_\d+", s) for s in positive)
    classes = metadata.class_list(metadata.read_wells(d))
    assert metadata.vocabulary_kind(classes) == "string"
    assert len(classes) == TINY.plates * TINY.sirnas_per_group


@pytest.mark.parametrize("change,name", [({"vocabulary": "greek"}, "vocabulary"),
                                          ({"positive_controls": 31}, "positive_controls")])
def test_bad_spec_parameters_are_named(tmp_path, change, name):
    with pytest.raises(ValueError, match=name):
        synthetic.generate(tmp_path, replace(TINY, **change), progress=False)


def test_ensure_reuses_a_complete_dataset_and_regenerates_a_half_written_one(tmp_path):
    d = synthetic.ensure(tmp_path, TINY, progress=False, workers=1)
    png = d / "train" / "RPE-01" / "Plate2" / "B02_s2_w6.png"
    stamp = png.stat().st_mtime_ns
    sentinel = d / "left_by_an_earlier_run.txt"
    sentinel.write_text("x")
    assert synthetic.ensure(tmp_path, TINY, progress=False, workers=1) == d
    assert sentinel.exists() and png.stat().st_mtime_ns == stamp       # not regenerated
    (d.parent / "complete").unlink()
    assert synthetic.ensure(tmp_path, TINY, progress=False, workers=1) == d
    assert not sentinel.exists() and (d.parent / "complete").is_file()  # regenerated
    other = synthetic.ensure(tmp_path, replace(TINY, seed=5), progress=False, workers=1)
    assert other != d and other.is_dir()                                 # another spec, another folder


def site_channel_means(data_dir: Path, sites: pd.DataFrame) -> np.ndarray:
    """(N, 6) mean intensity of each channel of each site."""
    return np.stack([data.read_site(data_dir, r.dataset, r.experiment, r.plate, r.well, r.site)
                     .reshape(6, -1).mean(1) for r in sites.itertuples()])


def nearest_centroid_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                              y_test: np.ndarray) -> float:
    classes = np.unique(y_train)
    centroids = np.stack([x_train[y_train == c].mean(0) for c in classes])
    distance = ((x_test[:, None, :] - centroids[None]) ** 2).sum(-1)
    return float((classes[distance.argmin(1)] == y_test).mean())


@pytest.mark.slow
def test_per_plate_normalisation_from_controls_measurably_matters(tmp_path):
    spec = synthetic.SyntheticSpec(train_experiments=2)     # default sizes, fewer experiments
    d = synthetic.generate(tmp_path, spec, progress=False)
    wells = metadata.read_wells(d)
    truth = synthetic.read_test_truth(d).set_index("id_code")["sirna"]
    sites = metadata.expand_sites(wells)
    stats = data.compute_norm_stats(d, sites, by="plate", source="controls", progress=False)
    treat = sites[sites["well_type"] == "treatment"].reset_index(drop=True)
    label = treat["sirna"].where(treat["dataset"] == "train", treat["id_code"].map(truth)).to_numpy()
    means = site_channel_means(d, treat)
    plate = np.stack([np.concatenate(stats.lookup(e, p)) for e, p in zip(treat["experiment"], treat["plate"])])
    normalised = (means - plate[:, :6]) / plate[:, 6:]
    is_train = (treat["dataset"] == "train").to_numpy()
    acc = {name: nearest_centroid_accuracy(x[is_train], label[is_train], x[~is_train], label[~is_train])
           for name, x in (("raw", np.log(means + 1)), ("plate", normalised))}
    chance = 1 / len(np.unique(label[is_train]))
    assert acc["plate"] > acc["raw"] + 0.15, acc
    assert acc["plate"] > 5 * chance, acc
