"""Prediction files: the one contract between a model stage and the merge stage.

A prediction file is an ``.npz`` archive (read with ``allow_pickle=False``: it may come from
another kernel's output and is untrusted) holding one row per *site*:

================  ============  ==========================================================
key               shape/dtype   meaning
================  ============  ==========================================================
format_version    () int64      ``FORMAT_VERSION`` (1)
split             () str        what the rows are: ``"test"`` or ``"val:<split name>"``
classes           (C,) str      class vocabulary, the column order of ``logits``; labels
                                exactly as in the input CSVs (``"513"`` or ``"sirna_250"``)
logits            (N, C) f16/32 raw logits (before softmax) of one site, TTA views summed
id_code           (N,) str      well id ``{experiment}_{plate}_{well}``
site              (N,) int64    1 or 2
experiment        (N,) str
plate             (N,) int64
well              (N,) str      e.g. ``B02``
cell_type         (N,) str      HEPG2 / HUVEC / RPE / U2OS
sirna             (N,) str      true label where known (validation), ``""`` otherwise
================  ============  ==========================================================

Stages write ``predictions_test.npz`` and ``predictions_val.npz`` into their output folder.
Anyone can drop in files of this format from another model and merge them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .outputs import atomic_write

FORMAT_VERSION = 1
ROW_COLUMNS = ("id_code", "site", "experiment", "plate", "well", "cell_type", "sirna")
TEST_FILE = "predictions_test.npz"
VAL_FILE = "predictions_val.npz"


@dataclass
class Predictions:
    """Per-site logits with their row metadata.

    frame: one row per site, columns ``ROW_COLUMNS``; logits: (N, C); classes: C labels.
    """

    frame: pd.DataFrame
    classes: list[str]
    logits: np.ndarray
    split: str
    path: str = ""


def save_predictions(path: str | os.PathLike, frame: pd.DataFrame, classes: Sequence[str],
                     logits: np.ndarray, split: str, dtype: str = "float32") -> Path:
    """Write a prediction file atomically. ``frame`` needs ``ROW_COLUMNS`` but ``sirna``."""
    path = Path(path)
    missing = [c for c in ROW_COLUMNS if c != "sirna" and c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: prediction rows lack columns {missing}")
    logits = np.asarray(logits)
    if logits.shape != (len(frame), len(classes)):
        raise ValueError(f"{path}: logits shape {logits.shape} != ({len(frame)} rows, {len(classes)} classes)")
    sirna = frame["sirna"] if "sirna" in frame.columns else pd.Series([""] * len(frame))
    arrays = dict(
        format_version=np.int64(FORMAT_VERSION),
        split=np.str_(split),
        classes=np.asarray([str(c) for c in classes], dtype=str),
        logits=logits.astype(dtype),
        id_code=frame["id_code"].astype(str).to_numpy(dtype=str),
        site=frame["site"].astype(np.int64).to_numpy(),
        experiment=frame["experiment"].astype(str).to_numpy(dtype=str),
        plate=frame["plate"].astype(np.int64).to_numpy(),
        well=frame["well"].astype(str).to_numpy(dtype=str),
        cell_type=frame["cell_type"].astype(str).to_numpy(dtype=str),
        sirna=sirna.fillna("").astype(str).to_numpy(dtype=str),
    )
    with atomic_write(path) as f:
        np.savez(f, **arrays)
    return path


def load_predictions(path: str | os.PathLike) -> Predictions:
    """Read and check a prediction file; every error names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prediction file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError (pickled object), OSError
        raise ValueError(f"{path}: not a readable prediction file ({e})") from e
    need = {"format_version", "split", "classes", "logits", *ROW_COLUMNS}
    missing = sorted(need - set(data))
    if missing:
        raise ValueError(f"{path}: prediction file lacks keys {missing}")
    version = int(data["format_version"])
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: prediction format version {version}, this code reads {FORMAT_VERSION}")
    logits = data["logits"]
    n = len(data["id_code"])
    if logits.ndim != 2 or logits.shape != (n, len(data["classes"])):
        raise ValueError(f"{path}: logits shape {logits.shape} does not match {n} rows x {len(data['classes'])} classes")
    frame = pd.DataFrame({c: data[c] for c in ROW_COLUMNS})
    frame["plate"] = frame["plate"].astype(np.int64)
    frame["site"] = frame["site"].astype(np.int64)
    return Predictions(frame=frame, classes=[str(c) for c in data["classes"]], logits=logits,
                       split=str(data["split"]), path=str(path))
