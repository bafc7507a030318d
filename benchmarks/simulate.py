"""Simulated classifiers of known accuracy, to measure what post-processing adds.

Site logits ``a * onehot(true) + N(0, 1)`` with the signal ``a`` calibrated to a well-level top-1
accuracy, and a plausible hidden truth for unlabelled test wells. Used by bench_postprocess.py
and by the tests of the merge (tests/ import it as ``benchmarks.simulate``); nothing in kernel_lib
depends on it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.optimize import brentq
from scipy.special import log_ndtr

from kernel_lib import metadata, synthetic
from kernel_lib.outputs import write_json
from kernel_lib.plates import PlateGroups
from kernel_lib.predictions import Predictions, save_predictions


def calibrate_signal(n_classes: int, top1: float, n_sites: int = 2) -> float:
    """The signal ``a`` for which site logits ``a * onehot(true) + N(0, 1)`` averaged over
    ``n_sites`` give well-level top-1 accuracy ``top1`` over ``n_classes`` (exact quadrature)."""
    if not 1.0 / n_classes < top1 < 1.0:
        raise ValueError(f"parameter top1 must be in (1/{n_classes}, 1), got {top1}")
    sd = 1.0 / np.sqrt(n_sites)
    u = np.linspace(-9.0, 9.0, 6001)
    density = np.exp(-0.5 * u ** 2) / np.sqrt(2 * np.pi) * (u[1] - u[0])

    def accuracy(a: float) -> float:
        # the true class beats all n_classes - 1 others: P = E_u[Phi(u + a / sd) ^ (C - 1)]
        return float(density @ np.exp((n_classes - 1) * log_ndtr(u + a / sd)))

    return float(brentq(lambda a: accuracy(a) - top1, 0.0, 50.0, xtol=1e-6))


def simulated_predictions(wells: pd.DataFrame, classes: Sequence[str], signal: float, seed: int,
                          sites: Sequence[int] = (1, 2), split: str = "val:simulated") -> Predictions:
    """Per-site logits ``signal * onehot(wells.sirna) + N(0, 1)`` over ``classes`` for ``wells``
    (a classifier of known accuracy, to measure what post-processing adds). (N, C) float32."""
    column = {c: j for j, c in enumerate(classes)}
    unknown = sorted(set(wells["sirna"]) - set(column))
    if unknown:
        raise ValueError(f"simulated_predictions: label {unknown[0]!r} is not in classes")
    frame = pd.concat([wells.assign(site=int(s)) for s in sites], ignore_index=True)
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((len(frame), len(classes)), dtype=np.float32)
    logits[np.arange(len(frame)), frame["sirna"].map(column).to_numpy()] += signal
    cols = ["id_code", "site", "experiment", "plate", "well", "cell_type", "sirna"]
    return Predictions(frame=frame[cols].reset_index(drop=True), classes=list(classes), logits=logits, split=split)


def simulated_labels(wells: pd.DataFrame, groups: PlateGroups, seed: int) -> tuple[pd.Series, dict[str, int]]:
    """A plausible hidden truth for unlabelled (test) treatment wells: each experiment a random
    rotation, each plate its group's siRNAs in random order (fewer wells: a random subset).
    Returns (labels indexed like ``wells``, rotation per experiment)."""
    rng = np.random.default_rng(seed)
    labels = pd.Series("", index=wells.index, dtype=object)
    rotations: dict[str, int] = {}
    for experiment, frame in wells.groupby("experiment", sort=True):
        rotations[experiment] = int(rng.integers(groups.n_groups))
        for plate, plate_wells in frame.groupby("plate", sort=True):
            members = groups.groups[groups.group_on_plate(rotations[experiment], plate)]
            if len(plate_wells) > len(members):
                raise ValueError(f"experiment {experiment} plate {plate}: {len(plate_wells)} wells, "
                                 f"more than its group's {len(members)} siRNAs")
            labels[plate_wells.index] = rng.permutation(members)[:len(plate_wells)]
    return labels, rotations


def write_simulated_stages(data_dir, root, stages: Sequence[tuple[str, Sequence[str]]], top1: float) -> pd.DataFrame:
    """Stage folders as the chain leaves them, from simulated classifiers of a synthetic dataset.

    ``stages``: (stage name, cell types it predicts). Each folder gets test logits of the synthetic
    truth and validation logits of the ``-01`` train experiments (well accuracy ``top1``), and a
    finished, predicted metrics.json. Returns the dataset's wells.
    """
    wells = metadata.read_wells(data_dir)
    classes = metadata.class_list(wells)
    truth = synthetic.read_test_truth(data_dir).set_index("id_code")["sirna"]
    treat = wells[wells["well_type"] == "treatment"]
    test = treat[treat["dataset"] == "test"].assign(sirna=lambda w: w["id_code"].map(truth))
    val = treat[(treat["dataset"] == "train") & treat["experiment"].str.endswith("-01")]
    signal = calibrate_signal(len(classes), top1)
    for i, (name, cts) in enumerate(stages):
        folder = Path(root) / name
        for split, part in (("test", test), ("val", val)):
            pred = simulated_predictions(part[part["cell_type"].isin(cts)], classes, signal, seed=i,
                                         split="test" if split == "test" else "val:x")
            frame = pred.frame.assign(sirna="") if split == "test" else pred.frame
            save_predictions(folder / f"predictions_{split}.npz", frame, classes, pred.logits, pred.split)
        write_json(folder / "metrics.json", {"stage": name, "finished": True, "predicted": True, "split": "x"})
    return wells
