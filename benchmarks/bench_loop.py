"""The training loop's overhead: `fit`'s images/s against a bare forward/backward/step, side by side.

Same architecture (a 6-channel resnet18 from kernel_lib.models, same initial weights), same
optimiser (Adam), same in-memory sites (6x128x128 uint8), same batch size, on the CPU. The bare
step gets its batch already collated and normalised; `fit` does everything it does in a real
run: ordering by (seed, epoch), collation, augmentation, normalisation, the loss sync, the
time-budget check and the progress bar.

The two are interleaved step by step: after each of `fit`'s steps a callback runs one bare step
on its own model, so both see the same machine state even on a shared, busy machine. A loop
step is timed from the end of one callback to the start of the next. The first ``--warmup``
steps are excluded; the ratio is of median step times. Goal: loop / bare >= 0.95.

    python benchmarks/bench_loop.py [--steps 16] [--warmup 2] [--batch 16] [--size 128] [--threads 0]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_lib import train as loop  # noqa: E402
from kernel_lib.config import TrainConfig  # noqa: E402
from kernel_lib.models import build_model  # noqa: E402

N_CLASSES = 32


class MemorySites(Dataset):
    """Random uint8 sites held in memory, following the loop's dataset contract."""

    def __init__(self, n: int, size: int):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 6, size, size), generator=g, dtype=torch.uint8)
        self.labels = torch.randint(0, N_CLASSES, (n,), generator=g)
        self.mean, self.std = torch.full((6,), 100.0), torch.full((6,), 50.0)
        self.classes, self.cell_types = [f"sirna_{i}" for i in range(N_CLASSES)], ["HUVEC"]
        self.frame = pd.DataFrame({"id_code": [f"HUVEC-01_1_{i}" for i in range(n)], "cell_type": "HUVEC",
                                   "sirna": [self.classes[int(label)] for label in self.labels]})

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        # a copy, as a decoded site is: stacking views of one big tensor is much slower
        return {"image": self.images[i].clone(), "mean": self.mean, "std": self.std, "label": self.labels[i],
                "cell_type": torch.tensor(0), "index": torch.tensor(i)}


def fresh_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", N_CLASSES, in_chans=6)


class BareStepAfterEach(loop.Callback):
    """Runs one bare forward/backward/step after each of fit's steps and times both."""

    def __init__(self, dataset: MemorySites, batch: int):
        self.model = fresh_model()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=3e-4)
        n = len(dataset) // batch * batch
        images = (dataset.images[:n].float() - 100.0) / 50.0
        self.batches = list(zip(images.split(batch), dataset.labels[:n].split(batch)))
        self.loop_s: list[float] = []
        self.bare_s: list[float] = []
        self.callback_end: float | None = None

    def on_step_end(self, progress):
        start = time.perf_counter()
        if self.callback_end is not None:
            self.loop_s.append(start - self.callback_end)
        x, y = self.batches[(progress.step - 1) % len(self.batches)]
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(x), y).backward()
        self.optimizer.step()
        self.callback_end = time.perf_counter()
        self.bare_s.append(self.callback_end - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    total = args.steps + args.warmup + 1  # the first loop step has no previous callback to time from
    dataset = MemorySites(args.batch * total, args.size)
    bare = BareStepAfterEach(dataset, args.batch)
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the empty validation split
        cfg = TrainConfig(stage="bench", arch="resnet18", output_dir=out, device="cpu", epochs=1, batch_size=args.batch,
                          optimizer="adam", lr=3e-4, freeze_epochs=0, patience=0, augment=True, resume="never")
        loop.fit(cfg, fresh_model(), dataset, MemorySites(0, 8), callbacks=[bare], progress_interval_s=3600)
    loop_s, bare_s = bare.loop_s[args.warmup:], bare.bare_s[args.warmup + 1:]
    loop_med, bare_med = statistics.median(loop_s), statistics.median(bare_s)
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"resnet18, 6x{args.size}x{args.size}, batch {args.batch}, {len(loop_s)} interleaved step pairs after "
          f"{args.warmup} warm-up")
    print("| what | median s/step | images/s | ratio |")
    print("|---|---|---|---|")
    print(f"| bare forward/backward/step | {bare_med:.3f} | {args.batch / bare_med:.2f} | 1.00 |")
    print(f"| fit (loop) | {loop_med:.3f} | {args.batch / loop_med:.2f} | {bare_med / loop_med:.3f} |")
    print(f"ratio of total times over the same steps: {sum(bare_s) / sum(loop_s):.3f}")


if __name__ == "__main__":
    main()
