"""The real RxRx1 layout as a synthetic dataset's wells: every real experiment, plate and well.

`real_layout_wells` reads the competition's metadata CSVs (the project ships them in
tests/fixtures/rxrx1/metadata) and returns the wells frame that `synthetic.generate` renders: the
51 real experiments (33 train, 18 test), their real plates, treatment wells (removed wells stay
removed), control positions and labels, the 1,108 treatment siRNAs in their real plate groups with
each train experiment's real rotation.

The test experiments' labels are not in the metadata (that is the competition), so they are made
up consistently with the real structure: each test experiment gets a rotation of the groups over
its plates such that all four rotations occur (the real test set holds the one that no train
experiment has), and each plate's treatment wells get distinct siRNAs of the plate's group, so
every siRNA appears at most once per experiment.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .metadata import TREATMENT, read_wells
from .plates import PlateGroups, infer_plate_groups

REAL_METADATA_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "rxrx1" / "metadata"
WELL_COLUMNS = ["id_code", "experiment", "plate", "well", "sirna", "well_type", "dataset"]


def assign_test_rotations(experiments: Sequence[str], n_groups: int, rng: np.random.Generator) -> dict[str, int]:
    """A rotation per test experiment; every rotation occurs once ``len(experiments) >= n_groups``."""
    base = np.arange(len(experiments)) % n_groups
    return {e: int(r) for e, r in zip(experiments, rng.permutation(base))}


def _label_test_plates(test: pd.DataFrame, groups: PlateGroups, rotation: dict[str, int],
                       rng: np.random.Generator) -> pd.Series:
    """sirna for every test treatment well: distinct members of its plate's group, shuffled."""
    labels = pd.Series("", index=test.index, dtype=object)
    for (experiment, plate), wells in test.groupby(["experiment", "plate"], sort=True):
        members = groups.groups[groups.group_on_plate(rotation[experiment], int(plate))]
        if len(wells) > len(members):
            raise ValueError(f"test plate {experiment} plate {plate} has {len(wells)} treatment wells, more than "
                             f"the {len(members)} siRNAs of a plate group")
        labels.loc[wells.index] = rng.choice(members, size=len(wells), replace=False)
    return labels


def real_layout_wells(metadata_dir: str | os.PathLike = REAL_METADATA_DIR, experiments: Sequence[str] = (),
                      plates_per_experiment: int = 0, seed: int = 0) -> tuple[pd.DataFrame, PlateGroups, dict[str, int]]:
    """(wells, plate groups, test rotations) of the real layout.

    wells: one row per well with ``WELL_COLUMNS`` (test treatment labels made up, see the module
    docstring); ``experiments`` keeps a subset (empty: all), ``plates_per_experiment`` the first
    plates of each (0: all). Groups and rotations are inferred on the whole train metadata first,
    so a subset keeps the real groups.
    """
    metadata_dir = Path(metadata_dir)
    if not (metadata_dir / "train.csv").is_file():
        raise FileNotFoundError(f"{metadata_dir}: no train.csv; the real layout needs the competition's metadata CSVs")
    wells = read_wells(metadata_dir)
    groups = infer_plate_groups(wells)
    rng = np.random.default_rng(seed)
    test_experiments = sorted(wells.loc[wells["dataset"] == "test", "experiment"].unique())
    rotation = assign_test_rotations(test_experiments, groups.n_groups, rng)
    is_test_treatment = (wells["dataset"] == "test") & (wells["well_type"] == TREATMENT)
    wells.loc[is_test_treatment, "sirna"] = _label_test_plates(wells[is_test_treatment], groups, rotation, rng)
    if experiments:
        unknown = sorted(set(experiments) - set(wells["experiment"]))
        if unknown:
            raise ValueError(f"experiments {unknown} are not in {metadata_dir}; "
                             f"experiments are {sorted(wells['experiment'].unique())}")
        wells = wells[wells["experiment"].isin(experiments)]
    if plates_per_experiment:
        keep = wells.groupby("experiment")["plate"].transform(lambda p: p.isin(sorted(p.unique())[:plates_per_experiment]))
        wells = wells[keep]
    wells = wells[WELL_COLUMNS].sort_values(["experiment", "plate", "well"]).reset_index(drop=True)
    return wells, groups, {e: r for e, r in rotation.items() if e in set(wells["experiment"])}
