"""RxRx1 metadata: reading the Kaggle CSVs, label vocabularies, class lists and validation splits.

A *well* row is one well of one plate (``id_code = {experiment}_{plate}_{well}``); a *site* row is
one of the (usually two) imaged fields of a well. Labels (``sirna``) are kept as opaque strings
exactly as written in the CSVs: ``"513"`` in the original Kaggle release, ``"sirna_250"`` /
``"UNTREATED"`` in the re-release. Nothing here assumes 1,108 classes or 308 wells.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

WELL_COLUMNS = ["id_code", "experiment", "plate", "well", "sirna", "well_type", "cell_type", "dataset"]
SITE_COLUMNS = WELL_COLUMNS[:4] + ["site"] + WELL_COLUMNS[4:]
TREATMENT = "treatment"
_REQUIRED = {
    "train.csv": ["id_code", "experiment", "plate", "well", "sirna"],
    "test.csv": ["id_code", "experiment", "plate", "well"],
    "train_controls.csv": ["id_code", "experiment", "plate", "well", "sirna", "well_type"],
    "test_controls.csv": ["id_code", "experiment", "plate", "well", "sirna", "well_type"],
}


def read_csv_checked(path: str | os.PathLike, required: Sequence[str], need_rows: bool = False) -> pd.DataFrame:
    """Read a metadata CSV with every column as text; error naming the file when it is empty
    (0 bytes, or header only with ``need_rows``), on missing columns, empty cells in required
    columns or duplicated id_codes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metadata file not found: {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: the file is empty (0 bytes or blank); expected a header "
                         f"{','.join(required)} and one row per well") from None
    except pd.errors.ParserError as err:
        raise ValueError(f"{path}: not a readable CSV: {err}") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    for col in required:
        blank = (not v.strip() for v in df[col].to_numpy(dtype=object))  # faster than .str.strip() here
        empty = np.flatnonzero(np.fromiter(blank, bool, len(df)))
        if len(empty):
            raise ValueError(f"{path}: column {col!r} is empty on line {int(empty[0]) + 2}")
    if "id_code" in df.columns:
        dup = df["id_code"][df["id_code"].duplicated()]
        if len(dup):
            raise ValueError(f"{path}: duplicated id_code {dup.iloc[0]!r} ({len(dup)} duplicates)")
    if need_rows and df.empty:
        raise ValueError(f"{path}: has a header but no rows; a dataset needs at least one well here")
    return df


def normalise_label(label: str) -> str:
    """'513.0' -> '513' (a float-written numeric label); other labels unchanged."""
    s = str(label).strip()
    if s.endswith(".0") and s[:-2].isdigit():
        return s[:-2]
    return s


def vocabulary_kind(labels: Sequence[str]) -> str:
    """'numeric' when every label is an integer string (the original release), else 'string'."""
    return "numeric" if all(str(x).isdigit() for x in labels) else "string"


def sort_labels(labels: Sequence[str]) -> list[str]:
    """Numeric labels sort as numbers, string labels by (text prefix, trailing number)."""
    def key(x: str):
        head = x.rstrip("0123456789")
        tail = x[len(head):]
        return (head, int(tail) if tail else -1, x)
    unique = pd.unique(labels) if isinstance(labels, pd.Series) else set(labels)  # a Series: ~40k rows
    return sorted(unique, key=key)


def _prepare(df: pd.DataFrame, path: Path, dataset: str, well_type: str | None) -> pd.DataFrame:
    df = df.copy()
    try:
        df["plate"] = df["plate"].astype(int)
    except ValueError as e:
        raise ValueError(f"{path}: column 'plate' must hold integers ({e})") from e
    expected = df["experiment"] + "_" + df["plate"].astype(str) + "_" + df["well"]
    bad = df.index[expected != df["id_code"]]
    if len(bad):
        i = bad[0]
        raise ValueError(f"{path}: id_code {df.at[i, 'id_code']!r} does not match "
                         f"experiment/plate/well {expected[i]!r}")
    if "sirna" not in df.columns:
        df["sirna"] = ""
    # mapped once per distinct value: a CSV holds ~50 experiments and ~1,100 labels in 40,000 rows
    df["sirna"] = df["sirna"].map({label: normalise_label(label) for label in df["sirna"].unique()})
    if well_type is not None:
        df["well_type"] = well_type
    df["cell_type"] = df["experiment"].map({e: e.split("-")[0] for e in df["experiment"].unique()})
    df["dataset"] = dataset
    return df[WELL_COLUMNS]


def read_wells(data_dir: str | os.PathLike, include_controls: bool = True) -> pd.DataFrame:
    """All wells of a Kaggle-layout dataset: train.csv + test.csv (+ the *_controls.csv files).

    Returns one row per well, columns ``WELL_COLUMNS``; ``sirna`` is ``""`` for test treatments.
    """
    data_dir = Path(data_dir)
    parts = []
    for dataset in ("train", "test"):
        name = f"{dataset}.csv"
        parts.append(_prepare(read_csv_checked(data_dir / name, _REQUIRED[name], need_rows=True), data_dir / name,
                              dataset, TREATMENT))
        if include_controls:
            name = f"{dataset}_controls.csv"
            path = data_dir / name
            if path.is_file():
                parts.append(_prepare(read_csv_checked(path, _REQUIRED[name]), path, dataset, None))
    wells = pd.concat(parts, ignore_index=True)
    dup = wells["id_code"][wells["id_code"].duplicated()]
    if len(dup):
        raise ValueError(f"{data_dir}: id_code {dup.iloc[0]!r} appears in more than one metadata file")
    return wells.sort_values(["dataset", "experiment", "plate", "well"], ignore_index=True)


def expand_sites(wells: pd.DataFrame, sites: Sequence[int] = (1, 2)) -> pd.DataFrame:
    """One row per (well, site), ordered by well then site; columns ``SITE_COLUMNS``."""
    frames = [wells.assign(site=int(s)) for s in sites]
    out = pd.concat(frames, ignore_index=True)
    out = out.sort_values(["dataset", "experiment", "plate", "well", "site"], ignore_index=True)
    return out[SITE_COLUMNS]


def class_list(wells: pd.DataFrame, include_controls: bool = False) -> list[str]:
    """The label vocabulary learned from the train wells: treatment siRNAs (and controls if asked)."""
    train = wells[wells["dataset"] == "train"]
    if not include_controls:
        train = train[train["well_type"] == TREATMENT]
    return sort_labels(train["sirna"])


def check_labels(wells: pd.DataFrame, classes: Sequence[str], source: str = "labels") -> None:
    """Error naming the id_code of the first label outside ``classes`` (a wrong vocabulary)."""
    known = set(classes)
    labelled = wells[wells["sirna"] != ""]
    bad = labelled[~labelled["sirna"].isin(known)]
    if len(bad):
        row = bad.iloc[0]
        kind = vocabulary_kind(list(classes)[:50])
        raise ValueError(f"{source}: unknown label {row['sirna']!r} at id_code {row['id_code']!r} "
                         f"({len(bad)} rows); the class list is {kind}, e.g. {list(classes)[:3]}")


def cell_types(wells: pd.DataFrame) -> list[str]:
    return sorted(wells["cell_type"].unique())


def split_train_val(wells: pd.DataFrame, split: str = "experiment", val_experiments: int = 1,
                    val_fraction: float = 0.025, seed: int = 42, folds: int = 3,
                    fold: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Split the *train* wells into (train, validation, split_name).

    ``experiment``: hold out ``val_experiments`` whole experiments per cell type (chosen by a
    generator seeded with (seed, cell type), so the choice is the same whether or not the caller
    later keeps one cell type: a per-cell-line stage can never see a validation well of the
    stage it starts from). Cell types with fewer than two train experiments keep all for training.
    ``fold``: each cell type's experiments, in the same seeded order, dealt round-robin into
    ``folds`` folds; fold ``fold`` is held out (K folds grouped by experiment, the 2019 1st place's
    way: every experiment is validated by exactly one fold; a cell type with fewer experiments than
    folds has no held-out experiment in the folds past its count).
    ``all``: every train well trains, nothing is held out (a final fit).
    ``random``: the seed's split, a random ``val_fraction`` of wells, which leaks experiments.
    ``split_name`` says which split produced any metric, e.g. ``experiment:HEPG2-02,HUVEC-03``.
    """
    train = wells[wells["dataset"] == "train"]
    if split == "experiment":
        held: list[str] = []
        for ct, exps in train.groupby("cell_type")["experiment"]:
            names = sorted(exps.unique())
            k = min(val_experiments, len(names) - 1)
            if k <= 0:
                continue
            rng = np.random.default_rng([seed, zlib.crc32(ct.encode())])
            held += sorted(rng.choice(names, size=k, replace=False).tolist())
        is_val = train["experiment"].isin(held)
        name = "experiment:" + ",".join(sorted(held))
    elif split == "fold":
        if not 0 <= fold < folds:
            raise ValueError(f"parameter fold must be in 0 .. {folds - 1} (folds={folds}), got {fold}")
        held = []
        for ct, exps in train.groupby("cell_type")["experiment"]:
            names = sorted(exps.unique())
            if len(names) < 2:
                continue
            order = np.random.default_rng([seed, zlib.crc32(ct.encode())]).permutation(names)
            held += [str(e) for i, e in enumerate(order) if i % folds == fold]
        is_val = train["experiment"].isin(held)
        name = f"fold{fold}of{folds}:" + ",".join(sorted(held))
    elif split == "all":
        is_val = pd.Series(False, index=train.index)
        name = "all:no validation"
    elif split == "random":
        if not 0 < val_fraction < 1:
            raise ValueError(f"parameter val_fraction must be in (0, 1), got {val_fraction}")
        rng = np.random.default_rng(seed)
        ids = np.sort(train["id_code"].to_numpy())
        n_val = max(1, int(round(val_fraction * len(ids))))
        val_ids = set(rng.choice(ids, size=n_val, replace=False).tolist())
        is_val = train["id_code"].isin(val_ids)
        name = f"random:{val_fraction}:seed{seed}"
    else:
        raise ValueError(f"parameter split must be 'experiment', 'fold', 'all' or 'random', got {split!r}")
    return train[~is_val].reset_index(drop=True), train[is_val].reset_index(drop=True), name
