"""Where a stage's output folder stands: done, trained but not predicted, partial, stale or absent.

A stage is *done* only when everything downstream stages read from it exists: for a training stage
``metrics.json`` says ``finished`` and ``predicted`` and ``predictions_val.npz``,
``predictions_test.npz`` and ``submission.csv`` are there; for the merge, ``submission.csv``; for
the EDA, a finished ``metrics.json``. A training stage whose training finished but whose prediction
step did not (a missing test image, an out-of-memory kill, a session ending during inference) is
``trained``: a rerun loads the finished checkpoint and only predicts. ``stale`` marks a stage
whose upstream stage was rerun from scratch (``--force``): its results were built from the old
upstream outputs, so the chain reruns it from scratch too.

Light on purpose (no torch): the chain, the notebooks' steps and the merge all read it.
"""
from __future__ import annotations

import os
from pathlib import Path

from .outputs import read_metrics, update_metrics
from .predictions import TEST_FILE, VAL_FILE

SUBMISSION_FILE = "submission.csv"
CONFIG_FILE = "config.json"
# what each kind of stage must have written before it counts as done
DONE_FILES = {"eda": (), "train": (VAL_FILE, TEST_FILE, SUBMISSION_FILE), "merge": (SUBMISSION_FILE,)}
STATES = ("done", "trained", "partial", "stale", "absent")


def stage_state(folder: str | os.PathLike, kind: str) -> str:
    """``done``, ``trained`` (training stage: finished, predictions missing), ``partial`` (started,
    not finished: a rerun resumes), ``stale`` (built from an upstream stage's old outputs) or
    ``absent`` (nothing there)."""
    folder = Path(folder)
    metrics = read_metrics(folder)
    if not metrics:
        return "partial" if folder.is_dir() and any(folder.iterdir()) else "absent"
    if metrics.get("stale"):
        return "stale"
    if not metrics.get("finished"):
        return "partial"
    complete = all((folder / name).is_file() for name in DONE_FILES[kind])
    if kind == "train":
        return "done" if metrics.get("predicted") and complete else "trained"
    return "done" if complete else "partial"


def is_done(folder: str | os.PathLike, kind: str) -> bool:
    return stage_state(folder, kind) == "done"


def mark_stale(folder: str | os.PathLike, reason: str) -> bool:
    """Record in the folder's metrics.json why its results are out of date; False if no folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    update_metrics(folder, stale=reason)
    return True
