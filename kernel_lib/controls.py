"""Control wells as extra training classes (TrainConfig.controls), the 2019 1st place's way.

Every plate holds a negative control (B02) and positive controls at fixed positions, labelled in
train_controls.csv *and* test_controls.csv: those labels are public, so a model may train on the
control wells of the test experiments too and see their batch effects. Modes:

* ``none``: treatment wells only (the seed);
* ``train``: plus the control wells of the training experiments;
* ``train+test``: plus the control wells of every other experiment: the validation experiments
  (they stand in for test experiments, so validation measures what test gets) and the test ones.

The head then has the treatment classes first and the control classes after them; the datasets'
``target_classes`` are the treatment classes, so inference (inference.target_classes) keeps only
their logits: validation, metrics, prediction files and submissions count treatment wells only and
never predict a control. Only control rows are taken from test experiments: a test treatment
well's label is unknown (empty) and `training_controls` refuses any row that is not a control.
"""
from __future__ import annotations

import pandas as pd

from . import metadata

MODES = ("none", "train", "train+test")


def class_lists(wells: pd.DataFrame, mode: str) -> tuple[list[str], list[str]]:
    """(head classes, treatment classes): the treatments of train.csv, then (mode != none) the
    control labels of every control well, in `metadata.sort_labels` order after the treatments."""
    if mode not in MODES:
        raise ValueError(f"parameter controls must be one of {MODES}, got {mode!r}")
    treatments = metadata.class_list(wells)
    if mode == "none":
        return treatments, treatments
    known = set(treatments)
    control_labels = wells.loc[(wells["well_type"] != metadata.TREATMENT) & (wells["sirna"] != ""), "sirna"]
    extra = [c for c in metadata.sort_labels(control_labels) if c not in known]
    return treatments + extra, treatments


def training_controls(wells: pd.DataFrame, train_wells: pd.DataFrame, mode: str, cell_type: str = "") -> pd.DataFrame:
    """The control wells a training split adds (well rows); ``train_wells``: the split's train part."""
    if mode == "none":
        return wells.iloc[:0]
    controls = wells[(wells["well_type"] != metadata.TREATMENT) & (wells["sirna"] != "")]
    if mode == "train":
        controls = controls[controls["experiment"].isin(set(train_wells["experiment"]))]
    if cell_type:
        controls = controls[controls["cell_type"] == cell_type]
    leaked = controls[controls["well_type"] == metadata.TREATMENT]
    if len(leaked):  # never reached: the filter above; kept as the guarantee the docstring states
        raise AssertionError(f"treatment well {leaked['id_code'].iloc[0]} among the training controls")
    return controls
