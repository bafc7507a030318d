"""Plate groups: the siRNA layout of RxRx1 plates, inferred from the train metadata alone.

The treatment siRNAs fall into disjoint *plate groups*; each plate of an experiment holds one
group, and experiments differ only by a rotation of the groups over their plates: the group on the
plate at position ``i`` (0-based, in sorted plate order) of experiment ``e`` is
``(i + rotation[e]) % n_groups``. On the real data: 4 groups of 277 siRNAs over plates 1..4.

Group ids are canonical: the first train experiment in sorted order has rotation 0, so group ``k``
is the group on its ``k``-th plate. Nothing here assumes 4 groups, 277 siRNAs or plates 1..4:
``n_groups`` is the number of distinct plates in the train treatment wells. The rotation of a test
(or held-out) experiment is not in the metadata; ``kernel_lib.submission`` infers it from
predictions.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from kernel_lib.metadata import TREATMENT, sort_labels


@dataclass(frozen=True)
class PlateGroups:
    """groups[k]: sorted siRNA labels of group k; rotation: per train experiment; plates: the
    plate numbers in position order (group on plate ``plates[i]`` = ``(i + rotation) % n_groups``)."""

    groups: list[list[str]]
    label_to_group: dict[str, int]
    rotation: dict[str, int]
    plates: tuple[int, ...]

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    def plate_position(self, plate: int) -> int:
        try:
            return self.plates.index(int(plate))
        except ValueError:
            raise ValueError(f"plate {plate} is not one of the train plates {list(self.plates)}") from None

    def group_on_plate(self, rotation: int, plate: int) -> int:
        """The group that an experiment with ``rotation`` holds on ``plate``."""
        return (self.plate_position(plate) + rotation) % self.n_groups

    def plate_group(self, experiment: str, plate: int) -> int:
        """The group on a plate of a *train* experiment (others: infer the rotation first)."""
        if experiment not in self.rotation:
            raise KeyError(f"experiment {experiment!r} is not a train experiment of these plate groups; "
                           "infer its rotation from predictions (submission.choose_rotations)")
        return self.group_on_plate(self.rotation[experiment], plate)

    def mask_for(self, classes: Sequence[str]) -> np.ndarray:
        """(n_groups, C) bool: ``mask[g, j]`` iff ``classes[j]`` is in group g (controls: never)."""
        mask = np.zeros((self.n_groups, len(classes)), dtype=bool)
        for j, label in enumerate(classes):
            g = self.label_to_group.get(str(label))
            if g is not None:
                mask[g, j] = True
        return mask


def _train_treatments(wells: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in ("id_code", "experiment", "plate", "well", "sirna", "well_type", "dataset")
               if c not in wells.columns]
    if missing:
        raise ValueError(f"wells frame lacks column(s) {missing}; pass metadata.read_wells(...)")
    train = wells[(wells["dataset"] == "train") & (wells["well_type"] == TREATMENT)]
    if train.empty:
        raise ValueError("no train treatment wells: plate groups are inferred from train.csv")
    unlabelled = train[train["sirna"].astype(str).str.strip() == ""]
    if len(unlabelled):
        raise ValueError(f"train well {unlabelled['id_code'].iloc[0]!r} has no sirna label")
    twice = train[train.duplicated(["experiment", "sirna"], keep=False)]
    if len(twice):
        row = twice.iloc[0]
        ids = twice[(twice["experiment"] == row["experiment"]) & (twice["sirna"] == row["sirna"])]["id_code"]
        raise ValueError(f"experiment {row['experiment']}: siRNA {row['sirna']!r} appears more than once "
                         f"({', '.join(ids)}); each treatment siRNA is expected once per experiment")
    return train


def infer_plate_groups(wells: pd.DataFrame) -> PlateGroups:
    """Infer the plate groups and each train experiment's rotation from the train treatment wells.

    Experiments are placed one at a time: the first (sorted) gets rotation 0 and defines the groups
    of its plates; every other experiment takes the rotation most of its already-placed siRNAs vote
    for, and then places its own siRNAs. A siRNA whose group disagrees with its plate's is an error
    naming the experiment, plate and well (a plate mixing two groups, or a mislabelled well).
    """
    train = _train_treatments(wells)
    plates = tuple(sorted(int(p) for p in train["plate"].unique()))
    n_groups = len(plates)
    position = {p: i for i, p in enumerate(plates)}
    by_experiment: dict[str, list[tuple[int, list[str], list[str]]]] = {}  # experiment -> its plates, in order
    for (e, p), w in train.groupby(["experiment", "plate"], sort=True):
        by_experiment.setdefault(e, []).append((int(p), w["well"].tolist(), w["sirna"].astype(str).tolist()))
    label_to_group: dict[str, int] = {}
    placed_on: dict[str, str] = {}  # where each siRNA's group was fixed, for error messages
    rotation: dict[str, int] = {}

    def place(experiment: str, r: int) -> None:
        rotation[experiment] = r
        for plate, well_names, labels in by_experiment[experiment]:
            g = (position[plate] + r) % n_groups
            for well, label in zip(well_names, labels):
                known = label_to_group.setdefault(label, g)
                if known == g:
                    placed_on.setdefault(label, f"{experiment} plate {plate}")
                    continue
                raise ValueError(
                    f"train metadata: experiment {experiment} plate {plate} well {well} holds siRNA "
                    f"{label!r} of plate group {known} (as on {placed_on[label]}), but the rest of "
                    f"{experiment} puts plate {plate} in group {g}: a plate mixes two plate groups "
                    "(or a well is mislabelled)")

    experiments = sorted(by_experiment)
    place(experiments[0], 0)
    pending = experiments[1:]
    while pending:
        unplaced = []
        for e in pending:
            votes = Counter((label_to_group[label] - position[plate]) % n_groups
                            for plate, _, labels in by_experiment[e]
                            for label in labels if label in label_to_group)
            if votes:
                # ties (only possible on corrupt data) go to the smaller rotation, for determinism
                place(e, max(votes, key=lambda r: (votes[r], -r)))
            else:
                unplaced.append(e)
        if len(unplaced) == len(pending):
            raise ValueError(f"train experiments {unplaced} share no siRNA with {sorted(rotation)}: "
                             "their plates cannot be placed in plate groups")
        pending = unplaced

    groups = [sort_labels([l for l, g in label_to_group.items() if g == k]) for k in range(n_groups)]
    empty = [k for k, members in enumerate(groups) if not members]
    if empty:
        raise ValueError(f"plate group(s) {empty} hold no siRNA: the train plates {list(plates)} "
                         "are not all reached by the experiments' rotations")
    return PlateGroups(groups=groups, label_to_group=dict(label_to_group), rotation=rotation, plates=plates)
