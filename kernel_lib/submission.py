"""From per-site logits to a submission: site aggregation, plate groups, assignment, the merge.

The steps, each switchable through ``mode`` (``MODES``):

1. ``argmax``: a well's log-probabilities (``well_log_probs``) come from the mean of its sites'
   logits (both sites; TTA views are already summed in each row), then log-softmax: the same as
   the renormalised mean of the sites' log-softmax (a geometric mean of their probabilities), and
   the 1st place's sum of logits up to scale. Classes in no plate group (controls) are never
   predicted for a treatment well.
2. ``plate_groups``: each experiment's rotation of plate groups over its plates is chosen from the
   predictions (``choose_rotations``: the rotation holding the most probability mass of its wells),
   then every class outside the plate's group is masked.
3. ``assignment``: per plate, ``linear_sum_assignment`` on negative log-probabilities within the
   plate's group, so each siRNA is used at most once per plate (plates with removed wells give a
   rectangular cost matrix).

The merge takes the four per-cell-line stages' test predictions, one cell type each, and falls
back to the one-step model's file for a missing cell type, with a warning.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.optimize import linear_sum_assignment

from kernel_lib.config import POSTPROCESS_MODES
from kernel_lib.metadata import TREATMENT, vocabulary_kind
from kernel_lib.plates import PlateGroups
from kernel_lib.predictions import Predictions, load_predictions
from kernel_lib.outputs import atomic_write

MODES = POSTPROCESS_MODES  # one list, owned by the merge config
SUBMISSION_COLUMNS = ["id_code", "sirna"]
# the merge's per-well labels and their probabilities (label_probability), read by the pseudo-label stage
PSEUDO_LABELS_FILE = "pseudo_labels.csv"
WELL_FRAME_COLUMNS = ["id_code", "experiment", "plate", "well", "cell_type", "sirna", "n_sites"]

Source = Union[str, os.PathLike, Predictions]
Sources = Union[Source, Sequence[Source]]


def _name(pred: Predictions) -> str:
    return pred.path or "<predictions in memory>"


def _check_rows(pred: Predictions) -> None:
    finite = np.isfinite(pred.logits).all(axis=1)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"{_name(pred)}: non-finite logits (NaN/inf) in {int((~finite).sum())} rows, "
                         f"first at id_code {pred.frame['id_code'].iloc[i]!r} site {pred.frame['site'].iloc[i]}")
    per_well = pred.frame.groupby("id_code")[["experiment", "plate", "cell_type"]].nunique()
    bad = per_well[(per_well > 1).any(axis=1)]
    if len(bad):
        raise ValueError(f"{_name(pred)}: the rows of id_code {bad.index[0]!r} disagree on experiment/plate/cell_type")


def check_predictions(pred: Predictions) -> None:
    """Errors naming the file and id_code: non-finite logits, a site twice, a well whose sites
    disagree on experiment/plate/cell type. For one file (pooled files may repeat sites)."""
    _check_rows(pred)
    twice = pred.frame.duplicated(["id_code", "site"])
    if twice.any():
        row = pred.frame[twice].iloc[0]
        raise ValueError(f"{_name(pred)}: id_code {row['id_code']!r} site {row['site']} appears twice")


def pool_predictions(preds: Sequence[Predictions]) -> Predictions:
    """Several files of one stage as one: rows concatenated, columns in the first file's class
    order. Disjoint files are chunks; files repeating sites are an ensemble, which
    ``well_log_probs`` then averages like any rows of a well. Class sets must agree; check each
    file first (``check_predictions``)."""
    if not preds:
        raise ValueError("no prediction files to pool")
    first = preds[0]
    if len(preds) == 1:
        return first
    frames, logits = [], []
    for p in preds:
        _check_same_classes(first, p)
        order = [p.classes.index(c) for c in first.classes]
        frames.append(p.frame)
        logits.append(np.asarray(p.logits)[:, order])
    return Predictions(frame=pd.concat(frames, ignore_index=True), classes=list(first.classes),
                       logits=np.concatenate(logits), split=first.split,
                       path="; ".join(_name(p) for p in preds))


def well_log_probs(pred: Predictions) -> tuple[pd.DataFrame, np.ndarray]:
    """Per-well log-probabilities: log_softmax(mean of the well's site rows' logits).

    Returns (wells, log_probs): wells has ``WELL_FRAME_COLUMNS``, one row per id_code sorted by
    experiment, plate, well; log_probs is (W, C) float64 in ``pred.classes`` order.
    """
    _check_rows(pred)
    codes, ids = pd.factorize(pred.frame["id_code"], sort=True)
    n_rows, n_wells = len(codes), len(ids)
    # a sparse (W, N) averaging matrix: fast, and exact in float64
    counts = np.bincount(codes, minlength=n_wells)
    average = sparse.csr_matrix((1.0 / counts[codes], (codes, np.arange(n_rows))), shape=(n_wells, n_rows))
    well_logits = average @ np.asarray(pred.logits, dtype=np.float64)
    shifted = well_logits - well_logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    first_rows = pred.frame.drop_duplicates("id_code").set_index("id_code").loc[ids]
    wells = first_rows.reset_index()[WELL_FRAME_COLUMNS[:-1]].assign(n_sites=counts)
    wells["plate"] = wells["plate"].astype(np.int64)
    order = np.lexsort((wells["well"].to_numpy(), wells["plate"].to_numpy(), wells["experiment"].to_numpy()))
    return wells.iloc[order].reset_index(drop=True), log_probs[order]


def _treatment_mask(classes: Sequence[str], groups: PlateGroups, source: str) -> np.ndarray:
    """(n_groups, C) mask; error when the class vocabulary shares no label with the groups."""
    mask = groups.mask_for(classes)
    if not mask.any():
        example = groups.groups[0][:2]
        raise ValueError(f"{source}: no class is a siRNA of the plate groups; classes look "
                         f"{vocabulary_kind(list(classes))} (e.g. {list(classes)[:2]}), the groups "
                         f"{vocabulary_kind(example)} (e.g. {example}): different label vocabularies")
    return mask


def choose_rotations(wells: pd.DataFrame, log_probs: np.ndarray, classes: Sequence[str],
                     groups: PlateGroups) -> pd.DataFrame:
    """Per experiment, the rotation of groups over plates that holds most probability mass.

    wells: treatment wells (columns experiment, plate); log_probs: (W, C).
    Returns one row per experiment: rotation, mass (mean per-well probability inside the chosen
    plates' groups; 1.0 = certain) and runner_up (the same for the second-best rotation).
    """
    mask = _treatment_mask(classes, groups, "choose_rotations")
    group_mass = np.exp(log_probs) @ mask.T.astype(np.float64)  # (W, n_groups)
    n = groups.n_groups
    rows = []
    for experiment, idx in wells.groupby("experiment", sort=True).indices.items():
        positions = np.array([groups.plate_position(p) for p in wells["plate"].to_numpy()[idx]])
        candidates = (positions[:, None] + np.arange(n)[None, :]) % n  # (wells, rotations)
        score = np.take_along_axis(group_mass[idx], candidates, axis=1).mean(axis=0)
        best = np.argsort(-score, kind="stable")
        rows.append(dict(experiment=experiment, rotation=int(best[0]), mass=float(score[best[0]]),
                         runner_up=float(score[best[1]]) if n > 1 else float("nan")))
    return pd.DataFrame(rows, columns=["experiment", "rotation", "mass", "runner_up"])


def postprocess(pred_wells: pd.DataFrame, log_probs: np.ndarray, classes: Sequence[str],
                groups: PlateGroups, mode: str = "assignment",
                rotations: Mapping[str, int] | None = None) -> np.ndarray:
    """Labels (W,) for treatment wells (columns experiment, plate) from log_probs (W, C).

    mode: ``argmax`` | ``plate_groups`` | ``assignment`` (see the module docstring). rotations:
    per experiment; inferred from the predictions when None (as for test, always on validation).
    On a plate with more wells than its group has classes, the wells left over by the assignment
    take their best class inside the group.
    """
    if mode not in MODES:
        raise ValueError(f"parameter mode must be one of {MODES}, got {mode!r}")
    if log_probs.shape != (len(pred_wells), len(classes)):
        raise ValueError(f"log_probs shape {log_probs.shape} != ({len(pred_wells)} wells, {len(classes)} classes)")
    mask = _treatment_mask(classes, groups, "postprocess")
    labels = np.asarray(classes, dtype=object)
    if mode == "argmax":
        return labels[np.where(mask.any(axis=0), log_probs, -np.inf).argmax(axis=1)]
    if rotations is None:
        table = choose_rotations(pred_wells, log_probs, classes, groups)
        rotations = dict(zip(table["experiment"], table["rotation"]))
    out = np.empty(len(pred_wells), dtype=object)
    for (experiment, plate), idx in pred_wells.groupby(["experiment", "plate"], sort=True).indices.items():
        if experiment not in rotations:
            raise KeyError(f"no rotation for experiment {experiment!r}")
        group = groups.group_on_plate(rotations[experiment], plate)
        columns = np.flatnonzero(mask[group])
        if not columns.size:
            raise ValueError(f"experiment {experiment} plate {plate}: no siRNA of its plate group {group} "
                             "is among the prediction classes")
        scores = log_probs[np.ix_(idx, columns)]
        best = scores.argmax(axis=1)
        if mode == "assignment":
            rows, cols = linear_sum_assignment(-scores)
            best[rows] = cols
        out[idx] = labels[columns[best]]
    return out


def label_probability(pred_wells: pd.DataFrame, log_probs: np.ndarray, classes: Sequence[str],
                      groups: PlateGroups, labels: np.ndarray, rotations: Mapping[str, int] | None) -> np.ndarray:
    """(W,) each well's probability of its label among the classes it could get: the well's softmax
    renormalised over its plate's group of siRNAs (``rotations`` given: plate_groups / assignment),
    or over every treatment siRNA (``rotations`` None: argmax). The pseudo-label confidence."""
    mask = _treatment_mask(classes, groups, "label_probability")
    column = {c: i for i, c in enumerate(classes)}
    probs = np.exp(log_probs)
    out = np.empty(len(pred_wells))
    picked = probs[np.arange(len(labels)), [column[label] for label in labels]]
    if rotations is None:
        return picked / (probs @ mask.any(axis=0).astype(np.float64))
    for (experiment, plate), idx in pred_wells.groupby(["experiment", "plate"], sort=True).indices.items():
        allowed = mask[groups.group_on_plate(rotations[experiment], plate)].astype(np.float64)
        out[idx] = picked[idx] / (probs[idx] @ allowed)
    return out


def step_accuracy_table(val_pred: Predictions, groups: PlateGroups,
                        modes: Sequence[str] = MODES) -> pd.DataFrame:
    """Well-level accuracy of each step on validation wells whose true label (the file's ``sirna``
    column) is a treatment siRNA; rotations inferred from predictions, as for test.

    Returns rows per cell type plus ``overall``; columns n_wells and one per mode. ``val_pred``
    may pool several models' files (an ensemble: a site in several rows); check each file first.
    """
    _check_rows(val_pred)
    wells, log_probs = well_log_probs(val_pred)
    keep = wells["sirna"].isin(groups.label_to_group).to_numpy()
    if not keep.any():
        raise ValueError(f"{_name(val_pred)}: no well has a treatment siRNA in its 'sirna' column "
                         "(a test file, or labels in another vocabulary)")
    wells, log_probs = wells[keep].reset_index(drop=True), log_probs[keep]
    table = choose_rotations(wells, log_probs, val_pred.classes, groups)
    rotations = dict(zip(table["experiment"], table["rotation"]))
    correct = pd.DataFrame({"cell_type": wells["cell_type"]})
    for mode in modes:
        labels = postprocess(wells, log_probs, val_pred.classes, groups, mode, rotations)
        correct[mode] = labels == wells["sirna"].to_numpy()
    per_cell = correct.groupby("cell_type").mean().astype(float)
    per_cell.insert(0, "n_wells", correct.groupby("cell_type").size())
    overall = correct[list(modes)].mean().to_frame("overall").T
    overall.insert(0, "n_wells", len(correct))
    return pd.concat([per_cell, overall]).rename_axis("cell_type")


# ---------------------------------------------------------------- the merge

@dataclass
class MergeReport:
    """sources: cell type -> stage used; files: stage -> prediction files; rotations: per test
    experiment (``choose_rotations`` columns); warnings: fallbacks taken."""

    mode: str
    sources: dict[str, str] = field(default_factory=dict)
    files: dict[str, list[str]] = field(default_factory=dict)
    rotations: pd.DataFrame = field(default_factory=pd.DataFrame)
    warnings: list[str] = field(default_factory=list)
    averaged: list[str] = field(default_factory=list)  # stages averaged into every cell type
    # per test treatment well: id_code, experiment, plate, well, cell_type, sirna, probability (label_probability)
    labels: pd.DataFrame = field(default_factory=pd.DataFrame)


def _load(source: Source) -> Predictions:
    return source if isinstance(source, Predictions) else load_predictions(source)


def _as_list(sources: Sources) -> list[Source]:
    if isinstance(sources, (str, os.PathLike, Predictions)):
        return [sources]
    return list(sources)


def _check_same_classes(a: Predictions, b: Predictions) -> None:
    if set(a.classes) == set(b.classes):
        return
    only_a = sorted(set(a.classes) - set(b.classes))
    only_b = sorted(set(b.classes) - set(a.classes))
    example = f"{only_a[0]!r} only in the first" if only_a else f"{only_b[0]!r} only in the second"
    raise ValueError(f"class vocabularies differ between {_name(a)} ({len(a.classes)} classes) and "
                     f"{_name(b)} ({len(b.classes)} classes): {example}")


def _check_test_rows(pred: Predictions, test_wells: pd.DataFrame) -> None:
    """Every row a known test well, with the experiment and plate that test.csv gives it."""
    if not pred.split.startswith("test"):
        raise ValueError(f"{_name(pred)}: split is {pred.split!r}, the merge needs test predictions")
    known = test_wells.set_index("id_code")
    ids = pred.frame["id_code"]
    unknown = ~ids.isin(known.index)
    if unknown.any():
        raise ValueError(f"{_name(pred)}: id_code {ids[unknown].iloc[0]!r} ({int(unknown.sum())} rows) "
                         "is not a test well of test.csv / test_controls.csv")
    ref = known.loc[ids, ["experiment", "plate"]]
    differs = (ref["experiment"].to_numpy() != pred.frame["experiment"].to_numpy()) | \
              (ref["plate"].astype(np.int64).to_numpy() != pred.frame["plate"].to_numpy())
    if differs.any():
        i = int(np.flatnonzero(differs)[0])
        raise ValueError(f"{_name(pred)}: id_code {ids.iloc[i]!r} has experiment/plate "
                         f"{pred.frame['experiment'].iloc[i]}/{pred.frame['plate'].iloc[i]}, test.csv "
                         f"says {ref['experiment'].iloc[i]}/{ref['plate'].iloc[i]}")


def _subset(pred: Predictions, ids: set[str]) -> Predictions:
    keep = pred.frame["id_code"].isin(ids).to_numpy()
    return Predictions(frame=pred.frame[keep].reset_index(drop=True), classes=pred.classes,
                       logits=np.asarray(pred.logits)[keep], split=pred.split, path=pred.path)


def _test_targets(test_wells: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(all test wells, test treatment wells) from ``metadata.read_wells`` rows."""
    missing = [c for c in ("id_code", "experiment", "plate", "cell_type", "well_type") if c not in test_wells.columns]
    if missing:
        raise ValueError(f"test_wells lacks column(s) {missing}; pass metadata.read_wells(...)")
    if "dataset" in test_wells.columns:
        test_wells = test_wells[test_wells["dataset"] == "test"]
    targets = test_wells[test_wells["well_type"] == TREATMENT].reset_index(drop=True)
    if targets.empty:
        raise ValueError("test_wells holds no test treatment well")
    return test_wells, targets


def _stage_per_cell_type(loaded: dict[str, list[Predictions]], fallback: list[Predictions],
                         fallback_name: str, targets: pd.DataFrame,
                         report: MergeReport) -> dict[str, tuple[str, list[Predictions]]]:
    """cell type -> (stage name, its files): the one stage predicting it, else the fallback."""
    cell_of = targets.set_index("id_code")["cell_type"]
    covered_by: dict[str, list[str]] = {}
    for name, preds in loaded.items():
        ids = pd.concat([p.frame["id_code"] for p in preds])
        for ct in sorted(set(cell_of.reindex(ids).dropna())):
            covered_by.setdefault(ct, []).append(name)
    chosen = {}
    for ct, n_wells in targets.groupby("cell_type").size().items():
        names = covered_by.get(ct, [])
        if len(names) > 1:
            files = "; ".join(_name(p) for n in names for p in loaded[n])
            raise ValueError(f"cell type {ct} is predicted by stages {names} ({files}); keep one")
        if names:
            chosen[ct] = (names[0], loaded[names[0]])
        elif fallback:
            message = (f"cell type {ct}: no stage predicts its {n_wells} test wells; using "
                       f"{fallback_name} ({'; '.join(_name(p) for p in fallback)})")
            warnings.warn(message, stacklevel=3)
            report.warnings.append(message)
            chosen[ct] = (fallback_name, fallback)
        else:
            raise ValueError(f"cell type {ct}: no stage predicts its {n_wells} test wells and no fallback was given")
    return chosen


def merge_predictions(stages: Mapping[str, Sources] | Sequence[Source], test_wells: pd.DataFrame,
                      groups: PlateGroups, fallback: Sources | None = None,
                      sample_submission: str | os.PathLike | None = None, mode: str = "assignment",
                      fallback_name: str = "fallback",
                      average_with: Mapping[str, Sources] | None = None) -> tuple[pd.DataFrame, MergeReport]:
    """One submission from per-cell-line stages: (frame with columns id_code, sirna; report).

    stages: stage name -> prediction file(s) (several files of one stage are pooled), or a list.
    average_with: stage name -> file(s) of stages predicting every cell type (final fit, folds,
    pseudo-labelled), pooled with each cell type's stage: equal weight per model and site.
    Each cell type of the test treatment wells is taken from the one stage that predicts it, else
    from ``fallback`` (warning), else an error. Two stages predicting one cell type, a stage missing
    some of its cell type's wells, rows for unknown wells, NaN logits, disagreeing class
    vocabularies: errors naming the file and id_code. Rows for test control wells are ignored.
    test_wells: ``metadata.read_wells`` rows (train rows are ignored). sample_submission: its
    id_code order is the submission's order (else test.csv order).
    """
    if mode not in MODES:
        raise ValueError(f"parameter mode must be one of {MODES}, got {mode!r}")
    test_wells, targets = _test_targets(test_wells)
    named = dict(stages) if isinstance(stages, Mapping) else {f"stage{i}": s for i, s in enumerate(stages)}
    if fallback is not None and fallback_name in named:
        raise ValueError(f"fallback_name {fallback_name!r} is also a stage name")
    loaded = {name: [_load(s) for s in _as_list(sources)] for name, sources in named.items()}
    fallback_preds = [] if fallback is None else [_load(s) for s in _as_list(fallback)]
    averaged = {name: [_load(s) for s in _as_list(sources)] for name, sources in (average_with or {}).items()}
    every = [p for preds in [*loaded.values(), *averaged.values()] for p in preds] + fallback_preds
    if not every:
        raise ValueError("no prediction files given (stages and fallback are empty)")
    for pred in every:
        check_predictions(pred)
        _check_test_rows(pred, test_wells)
        _check_same_classes(every[0], pred)
    _treatment_mask(every[0].classes, groups, _name(every[0]))

    report = MergeReport(mode=mode)
    labelled, rotation_tables = [], []
    chosen = _stage_per_cell_type(loaded, fallback_preds, fallback_name, targets, report)
    for ct, (name, preds) in chosen.items():
        ids = set(targets.loc[targets["cell_type"] == ct, "id_code"])
        parts = [(name, _subset(pool_predictions(preds), ids))]
        parts += [(extra, _subset(pool_predictions(files), ids)) for extra, files in averaged.items()]
        for part_name, part in parts:  # each model covers every well, or the average would be uneven
            absent = sorted(ids - set(part.frame["id_code"]))
            if absent:
                raise ValueError(f"{_name(part)} (stage {part_name}) lacks {len(absent)} of the {len(ids)} {ct} "
                                 f"test wells, e.g. id_code {absent[0]!r}")
        pred = pool_predictions([part for _, part in parts])
        wells, log_probs = well_log_probs(pred)
        table = choose_rotations(wells, log_probs, pred.classes, groups)
        rotations = dict(zip(table["experiment"], table["rotation"]))
        labels = postprocess(wells, log_probs, pred.classes, groups, mode, rotations)
        probability = label_probability(wells, log_probs, pred.classes, groups, labels,
                                        None if mode == "argmax" else rotations)
        labelled.append(wells[["id_code", "experiment", "plate", "well", "cell_type"]].assign(
            sirna=labels, probability=probability))
        rotation_tables.append(table)
        report.sources[ct] = name
        report.files[name] = [_name(p) for p in preds]
    report.rotations = pd.concat(rotation_tables, ignore_index=True)
    report.averaged = list(averaged)

    order = targets["id_code"].tolist()
    if sample_submission is not None:
        order = _sample_ids(sample_submission)
        _check_same_ids(order, targets["id_code"], str(sample_submission))
    report.labels = pd.concat(labelled).set_index("id_code").loc[order].reset_index()
    frame = report.labels[SUBMISSION_COLUMNS].copy()
    check_submission(frame, targets["id_code"], [label for g in groups.groups for label in g])
    return frame, report


def _sample_ids(path: str | os.PathLike) -> list[str]:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "id_code" not in frame.columns:
        raise ValueError(f"{path}: no id_code column; found {list(frame.columns)}")
    return frame["id_code"].tolist()


def _check_same_ids(ids: Sequence[str], expected: Sequence[str], source: str) -> None:
    have, want = pd.Series(ids), set(expected)
    twice = have[have.duplicated()]
    if len(twice):
        raise ValueError(f"{source}: id_code {twice.iloc[0]!r} appears twice")
    extra = sorted(set(have) - want)
    if extra:
        raise ValueError(f"{source}: id_code {extra[0]!r} ({len(extra)} ids) is not a test treatment well")
    absent = sorted(want - set(have))
    if absent:
        raise ValueError(f"{source}: lacks {len(absent)} test treatment wells, e.g. id_code {absent[0]!r}")


def check_submission(frame: pd.DataFrame, test_ids: Sequence[str], vocabulary: Sequence[str],
                     source: str = "submission") -> None:
    """Columns exactly id_code,sirna; every test treatment id once; labels from ``vocabulary``."""
    if list(frame.columns) != SUBMISSION_COLUMNS:
        raise ValueError(f"{source}: columns {list(frame.columns)}, expected {SUBMISSION_COLUMNS}")
    _check_same_ids(frame["id_code"].tolist(), test_ids, source)
    labels = frame["sirna"].astype(str)
    bad = frame[~labels.isin(set(vocabulary))]
    if len(bad):
        raise ValueError(f"{source}: label {bad['sirna'].iloc[0]!r} at id_code {bad['id_code'].iloc[0]!r} "
                         f"is not a treatment siRNA of the {vocabulary_kind(list(vocabulary))} vocabulary")


def write_submission(path: str | os.PathLike, frame: pd.DataFrame) -> Path:
    """Write ``id_code,sirna`` CSV atomically (a crash never leaves a half-written file)."""
    path = Path(path)
    if list(frame.columns) != SUBMISSION_COLUMNS:
        raise ValueError(f"{path}: submission columns {list(frame.columns)}, expected {SUBMISSION_COLUMNS}")
    with atomic_write(path, mode="w") as f:
        frame.to_csv(f, index=False)
    return path
