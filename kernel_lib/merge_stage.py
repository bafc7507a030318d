"""The merge stage (05_merge.ipynb): one submission from the per-cell-line stages' prediction
files, falling back to the one-step model for a missing cell type, with the accuracy after each
post-processing step on validation (and, on the synthetic data, against the test truth).

Reads only files (``predictions_*.npz``, ``metrics.json`` of each stage); writes into its
``output_dir`` ``submission.csv``, ``validation_steps.csv``, ``metrics.json``, ``config.json``,
``test_rotations.csv`` (each test experiment's inferred rotation and margin),
``test_plate_map_<experiment>.png`` (its plates coloured by the inferred plate groups) and
``pseudo_labels.csv``: per test treatment well its submitted siRNA and ``probability``, the well's
softmax renormalised over the siRNAs its plate's inferred group allows
(submission.label_probability): what the pseudo-label stage thresholds.

``average_with`` stages (final fit, folds, pseudo-labelled: they predict every cell type) are
averaged with each cell type's stage. The validation table averages those whose validation split
is the per-cell-line stages' own; the others (a final fit validates nothing, each fold another
split) are named in metrics.json ``validation_note``.

A per-cell-line stage whose folder is missing, or exists without its prediction files (training
unfinished, or finished without predicting), is a fallback with a warning, not an error: its cell
type comes from ``fallback_stage``; the warning names the command that repairs it.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from . import metadata, paths, plate_maps, plates, submission
from .environment import record_environment
from .index_page import write_merge_index
from .outputs import read_metrics, update_metrics, write_json
from .config import MergeConfig
from .parameters import with_stage_defaults
from .predictions import TEST_FILE, VAL_FILE, load_predictions
from .registry import CELL_LINE, group_members
from .synthetic import read_test_truth

SUBMISSION_FILE = "submission.csv"
ROTATIONS_FILE = "test_rotations.csv"


@dataclass
class MergeResult:
    submission: pd.DataFrame
    report: pd.DataFrame           # cell type -> stage used, test wells
    validation_table: pd.DataFrame  # well accuracy per post-processing step, per cell type
    test_table: pd.DataFrame        # the same against the synthetic truth (empty on real data)
    rotations: pd.DataFrame = None  # per test experiment: inferred rotation and its margin (rotation_table)


def _test_step_table(frames: dict[str, pd.DataFrame], wells: pd.DataFrame, data_dir: Path) -> pd.DataFrame:
    truth = read_test_truth(data_dir)
    if truth is None:
        return pd.DataFrame()
    cell = wells.set_index("id_code")["cell_type"]
    table = {}
    for mode, frame in frames.items():
        merged = frame.merge(truth, on="id_code", suffixes=("", "_true"))
        correct = (merged["sirna"] == merged["sirna_true"]).groupby(merged["id_code"].map(cell)).mean()
        table[mode] = {**correct.to_dict(), "overall": float((merged["sirna"] == merged["sirna_true"]).mean())}
    return pd.DataFrame(table).rename_axis("cell_type")


def merge_stage(params: Mapping[str, Any]) -> MergeResult:
    """The merge notebook: one submission from the per-cell-line stages (fallback for a missing
    cell type), accuracy per post-processing step on validation (and on synthetic test truth)."""
    cfg = MergeConfig.from_params(with_stage_defaults("merge", params))
    p = {**cfg.to_dict(), "stages": list(cfg.stages) or group_members(CELL_LINE)}
    out = Path(p["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    data_dir = paths.resolve_data_dir(p["data_dir"])
    wells = metadata.read_wells(data_dir)
    groups = plates.infer_plate_groups(wells)
    write_json(out / "config.json", cfg.to_dict())
    folders, warned = {}, []   # stage name -> its output folder

    def warn(message: str) -> None:
        warnings.warn(message)
        warned.append(message)

    fallback_text = f"the fallback stage {p['fallback_stage']}" if p["fallback_stage"] else "no fallback (an error)"
    for name in p["stages"]:
        try:
            folder = paths.find_stage_dir(name, p["input_dirs"])
        except FileNotFoundError as e:
            warn(f"{e}; its cell type falls back to {fallback_text}")
            continue
        lacking = [f for f in (TEST_FILE, VAL_FILE) if not (folder / f).is_file()]
        if lacking:
            warn(f"stage {name}: {folder} has no {' or '.join(lacking)} (its training did not finish, or finished "
                 f"without predicting): its cell type falls back to {fallback_text}. To use {name}, rerun it "
                 f"(python run_all.py --only {name}: a finished stage only predicts), then the merge")
            continue
        folders[name] = folder
    fallback_name = p["fallback_stage"] or "fallback"
    fallback_folder = None
    if p["fallback_stage"]:
        try:
            fallback_folder = paths.find_stage_dir(p["fallback_stage"], p["input_dirs"])
        except FileNotFoundError:
            if not folders:
                raise
        if fallback_folder is not None and not (fallback_folder / TEST_FILE).is_file():
            if not folders:
                raise FileNotFoundError(f"no stage to merge: the fallback stage {p['fallback_stage']} in "
                                        f"{fallback_folder} has no {TEST_FILE} either; rerun it "
                                        f"(python run_all.py --only {p['fallback_stage']}) and the merge")
            warn(f"fallback stage {p['fallback_stage']}: {fallback_folder} has no {TEST_FILE}: no fallback")
            fallback_folder = None
    if not folders and fallback_folder is None:
        raise FileNotFoundError(f"no stage to merge: none of {p['stages']} has {TEST_FILE} under {p['input_dirs']}")
    averaged = {}  # stage name -> its folder: each must be there, predicted
    for name in p["average_with"]:
        folder = paths.find_stage_dir(name, p["input_dirs"])
        if not (folder / TEST_FILE).is_file():
            raise FileNotFoundError(f"stage {name} (average_with): {folder} has no {TEST_FILE}; rerun it "
                                    f"(python run_all.py --only {name}) and then this merge")
        averaged[name] = folder
    # read each prediction file once: the merge runs once per post-processing mode
    test_preds = {name: load_predictions(folder / TEST_FILE) for name, folder in folders.items()}
    averaged_preds = {name: load_predictions(folder / TEST_FILE) for name, folder in averaged.items()}
    fallback = load_predictions(fallback_folder / TEST_FILE) if fallback_folder else None
    sample = data_dir / "sample_submission.csv"
    sample = sample if sample.is_file() else None

    def merged(mode: str):
        return submission.merge_predictions(test_preds, wells, groups, fallback=fallback, sample_submission=sample,
                                            mode=mode, fallback_name=fallback_name, average_with=averaged_preds)

    frames = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for mode in submission.MODES:
            frames[mode], report = merged(mode)
            if mode == p["postprocess"]:
                chosen_report = report
    for w in caught:
        if str(w.message) not in warned:
            warned.append(str(w.message))
            warnings.warn(str(w.message))
    frame = frames[p["postprocess"]]
    submission.write_submission(out / SUBMISSION_FILE, frame)

    # validation: each cell type's validation wells from the stage that predicted its test wells,
    # with the averaged stages validated on the same split
    val_preds, notes = [], []
    own_split = None
    for ct, name in chosen_report.sources.items():
        pred = load_predictions((fallback_folder if name == fallback_name else folders[name]) / VAL_FILE)
        own_split = own_split or pred.split
        val_preds.append(_cell_type_rows(pred, ct))
    for name, folder in averaged.items():
        pred = load_predictions(folder / VAL_FILE) if (folder / VAL_FILE).is_file() else None
        if pred is None or pred.split != own_split or not len(pred.frame):
            notes.append(f"{name} is averaged into the test predictions but not into validation: its validation "
                         f"split is {pred.split if pred is not None and len(pred.frame) else 'empty'}, not {own_split}")
            continue
        val_preds += [_cell_type_rows(pred, ct) for ct in chosen_report.sources]
    validation_table = submission.step_accuracy_table(submission.pool_predictions(val_preds), groups)
    test_table = _test_step_table(frames, wells, data_dir)
    counts = wells[(wells["dataset"] == "test") & (wells["well_type"] == metadata.TREATMENT)]
    report_frame = pd.DataFrame({"stage": chosen_report.sources}).rename_axis("cell_type")
    report_frame["test_wells"] = counts.groupby("cell_type").size()
    test_acc = float(test_table.loc["overall", p["postprocess"]]) if len(test_table) else None
    split = read_metrics(next(iter(folders.values()))).get("split") if folders else None
    labels = chosen_report.labels
    labels.to_csv(out / submission.PSEUDO_LABELS_FILE, index=False)
    update_metrics(out, stage=p["stage"], finished=True, postprocess=p["postprocess"], split=split,
                   sources=chosen_report.sources, averaged=list(averaged), validation_note="; ".join(notes) or None,
                   confident_wells={str(t): int((labels["probability"] >= t).sum()) for t in (0.5, 0.9, 0.99)},
                   warnings=warned, test_accuracy=test_acc,
                   val_acc_well=float(validation_table.loc["overall", p["postprocess"]]),
                   validation_table=validation_table.reset_index().to_dict(orient="records"),
                   test_table=test_table.reset_index().to_dict(orient="records"))
    validation_table.to_csv(out / "validation_steps.csv")
    record_environment(out)  # after the metrics above: it appends to their warnings
    rotations = rotation_table(chosen_report.rotations)
    rotations.to_csv(out / ROTATIONS_FILE, index=False)
    test_wells = wells[wells["experiment"].isin(rotations["experiment"])]
    for experiment in rotations["experiment"]:
        fig = plate_maps.plot_inferred_plate_groups(test_wells, groups, rotations, experiment)
        fig.savefig(out / f"test_plate_map_{experiment}.png", dpi=plate_maps.FIGURE_DPI)
    # the whole chain's index page (every stage in input_dirs, figures copied in): on Kaggle the
    # merge kernel's output is the one download that holds the result
    print(f"index page: {write_merge_index(out, p['input_dirs'], data_dir, p['stage'])}")
    return MergeResult(frame, report_frame, validation_table, test_table, rotations)


def _cell_type_rows(pred, cell_type: str):
    """A prediction file's rows of one cell type (the file checked first, so a bad one is named)."""
    submission.check_predictions(pred)
    keep = (pred.frame["cell_type"] == cell_type).to_numpy()
    return dataclasses.replace(pred, frame=pred.frame[keep].reset_index(drop=True), logits=pred.logits[keep])


def rotation_table(rotations: pd.DataFrame) -> pd.DataFrame:
    """Per test experiment: cell type, inferred rotation, its probability mass, the runner-up's,
    and ``margin`` = mass / (mass + runner-up): the winner's share (0.5: a tie; 1: certain)."""
    t = rotations[["experiment", "rotation", "mass", "runner_up"]].copy()
    t.insert(1, "cell_type", t["experiment"].str.split("-").str[0])
    total = t["mass"] + t["runner_up"].fillna(0.0)
    t["margin"] = (t["mass"] / total).where(total > 0)
    return t.sort_values("experiment", ignore_index=True)
