"""metadata on the real RxRx1 CSVs: counts checked against an independent csv-module count,
errors that name file/column/id_code, opaque string labels, and the validation splits."""
from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from kernel_lib import metadata

METADATA = Path(__file__).parent / "fixtures" / "rxrx1" / "metadata"
FILES = ("train.csv", "test.csv", "train_controls.csv", "test_controls.csv")


@pytest.fixture(scope="module")
def wells(real_wells) -> pd.DataFrame:
    return real_wells


@pytest.fixture(scope="module")
def raw_rows() -> dict[str, list[dict]]:
    """The four CSVs read with the csv module: the independent view of the same files."""
    out = {}
    for name in FILES:
        with open(METADATA / name, newline="") as f:
            out[name] = list(csv.DictReader(f))
    return out


@pytest.fixture(scope="module")
def string_metadata(string_vocabulary) -> Path:
    return string_vocabulary[0]


def tiny_copy(folder: Path, rows: int = 12) -> Path:
    """The first ``rows`` rows of each real CSV, for the error tests."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        with open(METADATA / name) as src:
            lines = [next(src) for _ in range(rows + 1)]
        (folder / name).write_text("".join(lines))
    return folder


def rewrite(path: Path, edit) -> None:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    edit(df).to_csv(path, index=False)


def test_read_wells_counts_match_the_raw_csvs(wells, raw_rows):
    n = {name: len(rows) for name, rows in raw_rows.items()}
    assert n == {"train.csv": 36515, "test.csv": 19897, "train_controls.csv": 4097, "test_controls.csv": 2246}
    assert len(wells) == sum(n.values()) == 62755
    assert list(wells.columns) == metadata.WELL_COLUMNS
    controls = Counter(r["well_type"] for name in ("train_controls.csv", "test_controls.csv")
                       for r in raw_rows[name])
    assert wells["well_type"].value_counts().to_dict() == {
        "treatment": n["train.csv"] + n["test.csv"], **controls}
    assert set(controls) == {"negative_control", "positive_control"}
    assert wells["id_code"].is_unique


def test_read_wells_cell_types_and_experiments(wells):
    assert metadata.cell_types(wells) == ["HEPG2", "HUVEC", "RPE", "U2OS"]
    per = wells.groupby(["dataset", "cell_type"])["experiment"].nunique().to_dict()
    assert per == {("train", "HEPG2"): 7, ("train", "HUVEC"): 16, ("train", "RPE"): 7, ("train", "U2OS"): 3,
                   ("test", "HEPG2"): 4, ("test", "HUVEC"): 8, ("test", "RPE"): 4, ("test", "U2OS"): 2}
    train, test = (set(wells.loc[wells["dataset"] == d, "experiment"]) for d in ("train", "test"))
    assert len(train) == 33 and len(test) == 18 and not train & test


def test_read_wells_keeps_labels_as_text(wells, raw_rows):
    first = raw_rows["train.csv"][0]
    row = wells.set_index("id_code").loc[first["id_code"]]
    assert row["sirna"] == first["sirna"] and isinstance(row["sirna"], str)
    assert row["plate"] == int(first["plate"]) and row["well_type"] == "treatment"
    test_treat = wells[(wells["dataset"] == "test") & (wells["well_type"] == "treatment")]
    assert (test_treat["sirna"] == "").all() and len(test_treat) == 19897


def test_numeric_class_list_is_the_treatment_sirnas_in_numeric_order(wells, raw_rows):
    classes = metadata.class_list(wells)
    assert classes == sorted({r["sirna"] for r in raw_rows["train.csv"]}, key=int)
    assert classes[:3] == ["0", "1", "2"] and len(classes) == 1108   # numeric, not "0", "1", "10"
    with_controls = metadata.class_list(wells, include_controls=True)
    assert len(with_controls) == 1108 + 30 + 1 and with_controls[-1] == "1138"
    assert metadata.vocabulary_kind(classes) == "numeric"


def test_string_vocabulary(string_metadata):
    wells = metadata.read_wells(string_metadata)
    classes = metadata.class_list(wells)
    assert len(classes) == 1108 and all(re.fullmatch(r"sirna_\d+", c) for c in classes)
    assert metadata.vocabulary_kind(classes) == "string"
    assert [int(c[6:]) for c in classes] == sorted(int(c[6:]) for c in classes)   # by number, not as text
    with_controls = metadata.class_list(wells, include_controls=True)
    assert "UNTREATED" in with_controls and len(with_controls) == 1139
    metadata.check_labels(wells, with_controls)    # its own vocabulary passes


def test_check_labels_names_the_id_code_of_a_wrong_vocabulary(wells, string_metadata):
    numeric = metadata.class_list(wells, include_controls=True)
    strings = metadata.read_wells(string_metadata)
    with pytest.raises(ValueError, match=r"at id_code '[A-Z0-9]+-\d\d_\d_[A-P]\d\d'"):
        metadata.check_labels(strings, numeric)
    one_bad = wells.copy()
    i = one_bad.index[one_bad["id_code"] == "RPE-03_2_K07"][0]
    one_bad.loc[i, "sirna"] = "sirna_5"
    with pytest.raises(ValueError, match=r"'sirna_5' at id_code 'RPE-03_2_K07' \(1 rows\)"):
        metadata.check_labels(one_bad, numeric)


def test_a_missing_column_names_file_and_column(tmp_path):
    folder = tiny_copy(tmp_path / "m")
    rewrite(folder / "train_controls.csv", lambda df: df.drop(columns=["well_type"]))
    with pytest.raises(ValueError, match=r"train_controls\.csv: missing column\(s\) \['well_type'\]"):
        metadata.read_wells(folder)


def test_a_duplicated_id_code_is_named(tmp_path):
    folder = tiny_copy(tmp_path / "m")
    rewrite(folder / "test.csv", lambda df: pd.concat([df, df.iloc[[4]]]))
    dup = pd.read_csv(folder / "test.csv")["id_code"].iloc[4]
    with pytest.raises(ValueError, match=rf"test\.csv: duplicated id_code '{dup}'"):
        metadata.read_wells(folder)


def test_an_id_code_in_two_files_is_named(tmp_path):
    folder = tiny_copy(tmp_path / "m")
    row = pd.read_csv(folder / "train.csv", dtype=str).iloc[[0]].assign(well_type="positive_control")
    rewrite(folder / "train_controls.csv", lambda df: pd.concat([df, row]))
    with pytest.raises(ValueError, match=rf"id_code '{row['id_code'].iloc[0]}' appears in more than one"):
        metadata.read_wells(folder)


def set_cell(path: Path, row: int, column: str, value: str) -> None:
    def edit(df):
        df.loc[row, column] = value
        return df
    rewrite(path, edit)


def test_an_id_code_inconsistent_with_experiment_plate_well_is_named(tmp_path):
    folder = tiny_copy(tmp_path / "m")
    set_cell(folder / "train.csv", 3, "well", "P24")
    bad = pd.read_csv(folder / "train.csv")["id_code"].iloc[3]
    with pytest.raises(ValueError, match=rf"train\.csv: id_code '{bad}' does not match"):
        metadata.read_wells(folder)


def test_an_empty_required_cell_names_file_column_and_line(tmp_path):
    folder = tiny_copy(tmp_path / "m")
    set_cell(folder / "test.csv", 5, "experiment", "")
    with pytest.raises(ValueError, match=r"test\.csv: column 'experiment' is empty on line 7"):
        metadata.read_wells(folder)


def test_a_missing_metadata_file_is_named(tmp_path):
    folder = tiny_copy(tmp_path / "m")
    (folder / "test.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"test\.csv"):
        metadata.read_wells(folder)


def test_expand_sites_gives_every_well_each_site(wells):
    sample = wells.iloc[::500]
    sites = metadata.expand_sites(sample, (1, 2))
    assert len(sites) == 2 * len(sample)
    assert list(sites.columns) == metadata.SITE_COLUMNS
    assert sites.groupby("id_code")["site"].apply(list).to_dict() == {i: [1, 2] for i in sample["id_code"]}


def held_out(val: pd.DataFrame) -> set[str]:
    return set(val["experiment"])


def test_experiment_split_holds_out_whole_experiments_per_cell_type(wells):
    train, val, name = metadata.split_train_val(wells, "experiment", val_experiments=1, seed=42)
    assert not set(train["experiment"]) & set(val["experiment"])
    assert set(train["dataset"]) == set(val["dataset"]) == {"train"}
    assert len(train) + len(val) == (wells["dataset"] == "train").sum()
    assert sorted(val.groupby("cell_type")["experiment"].nunique().to_dict().items()) == \
        [("HEPG2", 1), ("HUVEC", 1), ("RPE", 1), ("U2OS", 1)]
    assert name == "experiment:" + ",".join(sorted(held_out(val)))
    _, val2, _ = metadata.split_train_val(wells, "experiment", val_experiments=2, seed=42)
    assert set(val2.groupby("cell_type")["experiment"].nunique()) == {2}


def test_experiment_split_is_seeded(wells):
    _, a, name_a = metadata.split_train_val(wells, "experiment", seed=7)
    _, b, name_b = metadata.split_train_val(wells, "experiment", seed=7)
    assert name_a == name_b and a["id_code"].tolist() == b["id_code"].tolist()
    names = {metadata.split_train_val(wells, "experiment", seed=s)[2] for s in range(6)}
    assert len(names) > 1


@pytest.mark.parametrize("seed", [0, 42])
def test_a_cell_type_stage_holds_out_the_experiments_of_the_full_split(wells, seed):
    _, val, _ = metadata.split_train_val(wells, "experiment", seed=seed)
    for ct in metadata.cell_types(wells):
        one = wells[wells["cell_type"] == ct]
        train_ct, val_ct, _ = metadata.split_train_val(one, "experiment", seed=seed)
        assert held_out(val_ct) == held_out(val[val["cell_type"] == ct])
        assert not set(train_ct["id_code"]) & set(val["id_code"])   # upstream validation never trained on


def test_a_cell_type_with_one_train_experiment_keeps_it_for_training(wells):
    one_u2os = wells[(wells["cell_type"] != "U2OS") | (wells["experiment"] == "U2OS-01")]
    train, val, _ = metadata.split_train_val(one_u2os, "experiment")
    assert "U2OS-01" in set(train["experiment"]) and "U2OS" not in set(val["cell_type"])


def test_random_split_is_the_seed_leak(wells):
    train, val, name = metadata.split_train_val(wells, "random", val_fraction=0.025, seed=42)
    n = (wells["dataset"] == "train").sum()
    assert len(val) == round(0.025 * n) and len(train) + len(val) == n
    assert not set(train["id_code"]) & set(val["id_code"])
    shared = set(train["experiment"]) & set(val["experiment"])
    assert len(shared) >= 30       # ~1,000 random wells land in (nearly) every one of the 33 experiments
    assert name == "random:0.025:seed42"
    _, again, _ = metadata.split_train_val(wells, "random", val_fraction=0.025, seed=42)
    _, other, _ = metadata.split_train_val(wells, "random", val_fraction=0.025, seed=43)
    assert again["id_code"].tolist() == val["id_code"].tolist()
    assert set(other["id_code"]) != set(val["id_code"])


def test_folds_hold_out_every_experiment_exactly_once_grouped_by_experiment(wells):
    train_experiments = set(wells.loc[wells["dataset"] == "train", "experiment"])
    held = []
    for k in range(3):
        train, val, name = metadata.split_train_val(wells, "fold", seed=42, folds=3, fold=k)
        assert not set(train["experiment"]) & set(val["experiment"])
        assert len(train) + len(val) == (wells["dataset"] == "train").sum()
        assert set(val["cell_type"]) == {"HEPG2", "HUVEC", "RPE", "U2OS"}  # U2OS has 3 train experiments
        assert name == f"fold{k}of3:" + ",".join(sorted(held_out(val)))
        held += sorted(held_out(val))
    assert sorted(held) == sorted(train_experiments)  # a partition: each experiment validated once
    sizes = [len(held_out(metadata.split_train_val(wells, "fold", folds=3, fold=k)[1])) for k in range(3)]
    assert max(sizes) - min(sizes) <= 4  # round-robin per cell type: at most one more per cell type


def test_split_all_trains_on_every_train_well(wells):
    train, val, name = metadata.split_train_val(wells, "all")
    assert len(val) == 0 and len(train) == (wells["dataset"] == "train").sum() and name == "all:no validation"


@pytest.mark.parametrize("kwargs,message", [
    (dict(split="plates"), "parameter split"),
    (dict(split="fold", folds=3, fold=3), "parameter fold must be in 0 .. 2"),
    (dict(split="random", val_fraction=1.5), "parameter val_fraction"),
])
def test_split_parameter_errors_name_the_parameter(wells, kwargs, message):
    with pytest.raises(ValueError, match=message):
        metadata.split_train_val(wells, **kwargs)


def test_float_written_labels_are_normalised():
    assert [metadata.normalise_label(x) for x in ("513.0", "513", " 7 ", "sirna_1.0", "UNTREATED")] == \
        ["513", "513", "7", "sirna_1.0", "UNTREATED"]
