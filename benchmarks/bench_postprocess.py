"""What post-processing adds to classifiers of known accuracy, on the real RxRx1 layout.

Holds out one train experiment per cell type (metadata.split_train_val), infers the plate groups
from the remaining train wells, simulates per-site logits ``a * onehot(true) + N(0, 1)`` with ``a``
calibrated to a raw well-level top-1, and prints well-level accuracy after each step (rotations
inferred from the predictions). Then times a merge of all test wells (a simulated hidden truth).

    python benchmarks/bench_postprocess.py [--metadata DIR] [--seeds 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kernel_lib import metadata  # noqa: E402
from kernel_lib.plates import infer_plate_groups  # noqa: E402
from benchmarks.simulate import calibrate_signal, simulated_labels, simulated_predictions  # noqa: E402
from kernel_lib.submission import choose_rotations, merge_predictions, step_accuracy_table, well_log_probs  # noqa: E402

TARGETS = (0.12, 0.40, 0.76)


def accuracy_table(wells, seeds: int) -> None:
    train, val, split = metadata.split_train_val(wells, "experiment", val_experiments=1)
    val = val[val["well_type"] == metadata.TREATMENT].reset_index(drop=True)
    groups = infer_plate_groups(train)
    truth = infer_plate_groups(wells).rotation  # only to check the inferred rotations
    classes = metadata.class_list(wells)
    print(f"held out {split} ({len(val)} treatment wells); {groups.n_groups} plate groups of "
          f"{[len(g) for g in groups.groups]} siRNAs from the other {len(groups.rotation)} train experiments; "
          f"{len(classes)} classes; mean of {seeds} seeds\n")
    print("| raw target | signal a | raw measured | plate groups | assignment | rotations right |")
    print("|---|---|---|---|---|---|")
    for target in TARGETS:
        signal = calibrate_signal(len(classes), target)
        rows, right = [], 0
        for seed in range(seeds):
            pred = simulated_predictions(val, classes, signal, seed=seed)
            rows.append(step_accuracy_table(pred, groups).loc["overall", ["argmax", "plate_groups", "assignment"]])
            chosen = choose_rotations(*well_log_probs(pred), classes, groups)
            right += sum(truth[e] == r for e, r in zip(chosen["experiment"], chosen["rotation"]))
        mean = np.mean(np.array(rows, dtype=float), axis=0)
        print(f"| {target:.2f} | {signal:.3f} | {mean[0]:.3f} | {mean[1]:.3f} | {mean[2]:.3f} | "
              f"{right}/{seeds * val['experiment'].nunique()} |")


def merge_timing(wells) -> None:
    groups = infer_plate_groups(wells)
    classes = metadata.class_list(wells)
    test = wells[wells["dataset"] == "test"]
    treatment = test[test["well_type"] == metadata.TREATMENT]
    labels, _ = simulated_labels(treatment, groups, seed=0)
    truth = treatment.assign(sirna=labels)
    signal = calibrate_signal(len(classes), 0.76)
    stages = {}
    for ct in sorted(truth["cell_type"].unique()):
        pred = simulated_predictions(truth[truth["cell_type"] == ct], classes, signal, seed=1, split="test")
        pred.frame["sirna"] = ""
        stages[ct] = [pred]
    print(f"\nmerge of all {len(truth)} test treatment wells ({test['experiment'].nunique()} experiments, "
          f"2 sites, {len(classes)} classes, raw 0.76), this machine:\n")
    print("| mode | seconds | accuracy vs simulated truth |")
    print("|---|---|---|")
    for mode in ("argmax", "plate_groups", "assignment"):
        start = time.perf_counter()
        frame, _ = merge_predictions(stages, test, groups, mode=mode)
        seconds = time.perf_counter() - start
        accuracy = (frame["sirna"].to_numpy() == truth["sirna"].to_numpy()).mean()
        print(f"| {mode} | {seconds:.2f} | {accuracy:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metadata", default=str(REPO / "tests" / "fixtures" / "rxrx1" / "metadata"))
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    wells = metadata.read_wells(args.metadata)
    accuracy_table(wells, args.seeds)
    merge_timing(wells)


if __name__ == "__main__":
    main()
