"""Checkpoint cost for the real model: atomic save against a plain torch.save, and time to resume.

ResNet-50 with a 6-channel first conv and 1,108 classes (kernel_lib.models), Adam state filled
by one step: the state `fit` saves. Measured side by side, alternating, in one folder:

- plain: ``torch.save(state, path)`` (no fsync: the data may still sit in the page cache);
- atomic: `save_checkpoint` (temporary file, fsync, keep the previous copy, os.replace, fsync
  of the folder): what survives a session killed at the hard limit;
- header scan: `find_latest_checkpoint` over the folder (memory-mapped, what resume="auto" does);
- resume: `load_checkpoint` (weights_only) + model/optimizer ``load_state_dict`` + RNG restore.

Every measurement starts after ``os.sync()``, so no earlier file's writeback competes for the
disk. Goal: atomic / plain <= 1.3. Prints markdown table lines.

    python benchmarks/bench_checkpoint.py [--repeats 5] [--dir DIR]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_lib import checkpoint as ck  # noqa: E402
from kernel_lib.models import build_model  # noqa: E402

N_CLASSES = 1108


def model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model("resnet50", N_CLASSES, in_chans=6)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    F.cross_entropy(model(torch.randn(2, 6, 64, 64)), torch.tensor([0, 1])).backward()
    optimizer.step()
    return model, optimizer


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {"stage": "resnet50", "arch": "resnet50", "classes": [str(i) for i in range(N_CLASSES)],
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": None, "step": 1, "epoch": 0,
            "batch_in_epoch": 1, "best_metric": -float("inf"), "epochs_without_improvement": 0,
            "config": {"arch": "resnet50", "lr": 3e-4}, "rng": ck.capture_rng_state(),
            "history": [{"epoch": e, "val_acc_well": 0.1 * e} for e in range(1, 11)], "finished": False}


def timed(fn) -> float:
    os.sync()  # start each measurement without another file's writeback competing for the disk
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", default=None, help="folder to write in (default: a temporary folder)")
    args = p.parse_args()
    model, optimizer = model_and_optimizer()
    state = training_state(model, optimizer)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        folder = Path(folder)
        plain_path, atomic_path = folder / "plain" / "checkpoint.pt", folder / "atomic" / "checkpoint.pt"
        plain_path.parent.mkdir()
        plain, atomic, scan, resume = [], [], [], []
        for _ in range(args.repeats):
            plain.append(timed(lambda: torch.save(state, plain_path)))
            atomic.append(timed(lambda: ck.save_checkpoint(atomic_path, state)))
            scan.append(timed(lambda: ck.find_latest_checkpoint("resnet50", [folder / "atomic"])))

            def restore():
                saved = ck.load_checkpoint(atomic_path)
                model.load_state_dict(saved["model"])
                optimizer.load_state_dict(saved["optimizer"])
                ck.restore_rng_state(saved["rng"])

            resume.append(timed(restore))
        size_mb = atomic_path.stat().st_size / 2**20
    med = {k: statistics.median(v) for k, v in
           {"plain": plain, "atomic": atomic, "scan": scan, "resume": resume}.items()}
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}; folder {args.dir or tempfile.gettempdir()}")
    print(f"ResNet-50 (6 channels, {N_CLASSES} classes) + Adam state: {size_mb:.0f} MB; "
          f"median of {args.repeats} alternating repeats")
    print("| operation | seconds | vs plain torch.save |")
    print("|---|---|---|")
    print(f"| plain torch.save | {med['plain']:.2f} | 1.00 |")
    print(f"| atomic save_checkpoint (fsync, keeps prev) | {med['atomic']:.2f} | {med['atomic'] / med['plain']:.2f} |")
    print(f"| find_latest_checkpoint (header scan) | {med['scan']:.3f} | {med['scan'] / med['plain']:.3f} |")
    print(f"| resume (load + restore model, optimizer, RNG) | {med['resume']:.2f} | "
          f"{med['resume'] / med['plain']:.2f} |")
    print(f"all repeats: plain {[round(v, 2) for v in plain]}, atomic {[round(v, 2) for v in atomic]}")


if __name__ == "__main__":
    main()
