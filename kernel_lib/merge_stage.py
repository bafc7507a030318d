"""The merge stage (05_merge.ipynb): one submission from the per-cell-line stages' prediction
files, falling back to the one-step model for a missing cell type, with the accuracy after each
post-processing step on validation (and, on the synthetic data, against the test truth).

Reads only files (``predictions_*.npz``, ``metrics.json`` of each stage); writes into its
``output_dir`` ``submission.csv``, ``validation_steps.csv`` and ``metrics.json``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from . import metadata, paths, plates, submission
from .environment import record_environment
from .outputs import read_metrics, update_metrics
from .config import MergeConfig
from .parameters import with_stage_defaults
from .predictions import TEST_FILE, VAL_FILE, load_predictions
from .registry import CELL_LINE, group_members
from .synthetic import read_test_truth

SUBMISSION_FILE = "submission.csv"


@dataclass
class MergeResult:
    submission: pd.DataFrame
    report: pd.DataFrame           # cell type -> stage used, test wells
    validation_table: pd.DataFrame  # well accuracy per post-processing step, per cell type
    test_table: pd.DataFrame        # the same against the synthetic truth (empty on real data)


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
    folders, warned = {}, []   # stage name -> its output folder
    for name in p["stages"]:
        try:
            folders[name] = paths.find_stage_dir(name, p["input_dirs"])
        except FileNotFoundError as e:
            warnings.warn(str(e))
            warned.append(str(e))
    fallback_name = p["fallback_stage"] or "fallback"
    fallback_folder = None
    if p["fallback_stage"]:
        try:
            fallback_folder = paths.find_stage_dir(p["fallback_stage"], p["input_dirs"])
        except FileNotFoundError:
            if not folders:
                raise
    # read each prediction file once: the merge runs once per post-processing mode
    test_preds = {name: load_predictions(folder / TEST_FILE) for name, folder in folders.items()}
    fallback = load_predictions(fallback_folder / TEST_FILE) if fallback_folder else None
    sample = data_dir / "sample_submission.csv"
    sample = sample if sample.is_file() else None

    def merged(mode: str):
        return submission.merge_predictions(test_preds, wells, groups, fallback=fallback, sample_submission=sample,
                                            mode=mode, fallback_name=fallback_name)

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

    # validation: each cell type's validation wells from the stage that predicted its test wells
    val_preds = []
    for ct, name in chosen_report.sources.items():
        pred = load_predictions((fallback_folder if name == fallback_name else folders[name]) / VAL_FILE)
        keep = (pred.frame["cell_type"] == ct).to_numpy()
        pred.frame, pred.logits = pred.frame[keep].reset_index(drop=True), pred.logits[keep]
        val_preds.append(pred)
    validation_table = submission.step_accuracy_table(submission.pool_predictions(val_preds), groups)
    test_table = _test_step_table(frames, wells, data_dir)
    counts = wells[(wells["dataset"] == "test") & (wells["well_type"] == metadata.TREATMENT)]
    report_frame = pd.DataFrame({"stage": chosen_report.sources}).rename_axis("cell_type")
    report_frame["test_wells"] = counts.groupby("cell_type").size()
    test_acc = float(test_table.loc["overall", p["postprocess"]]) if len(test_table) else None
    split = read_metrics(next(iter(folders.values()))).get("split") if folders else None
    update_metrics(out, stage=p["stage"], finished=True, postprocess=p["postprocess"], split=split,
                   sources=chosen_report.sources, warnings=warned, test_accuracy=test_acc,
                   val_acc_well=float(validation_table.loc["overall", p["postprocess"]]),
                   validation_table=validation_table.reset_index().to_dict(orient="records"),
                   test_table=test_table.reset_index().to_dict(orient="records"))
    validation_table.to_csv(out / "validation_steps.csv")
    record_environment(out)  # after the metrics above: it appends to their warnings
    return MergeResult(frame, report_frame, validation_table, test_table)
