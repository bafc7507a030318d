"""Site loading speed on the real 512x512 PNGs: the seed's rxrx.io path against ours, side by side.

Three readers, one process, the same sites (site 1 of well B02, plate 1, of the four train
fixture experiments, read ``--rounds`` times, interleaved so that every reader sees the same
machine state):

- reference: what the seed did: each channel PNG read with PIL (rxrx.io used imread),
  ``np.stack`` to (H, W, 6), then torchvision ``transforms.ToTensor()`` (float32 in 0..1);
- dataset: our ``SiteDataset`` item (cv2 decode into one (6, H, W) uint8 buffer; normalisation
  happens later, on the device, in ``normalize_batch``);
- cache: the same ``SiteDataset`` reading from its ``PackedCache`` (decoded once).

Every reader decodes (or copies) all six channels of every site on every read.
Goals: dataset >= 1.5x reference, cache >= 30x reference.

    python benchmarks/bench_loader.py [--rounds 25]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pandas as pd
import torch
import torchvision
from PIL import Image
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_lib import data, metadata  # noqa: E402
from kernel_lib import rxrx_io as rio  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "rxrx1"
EXPERIMENTS = ("HEPG2-01", "HUVEC-01", "RPE-01", "U2OS-01")


def bench_sites(wells: pd.DataFrame) -> pd.DataFrame:
    """The four train fixture sites as a site frame (one row per site, metadata columns)."""
    ids = [f"{e}_1_B02" for e in EXPERIMENTS]
    return metadata.expand_sites(wells[wells["id_code"].isin(ids)], sites=(1,))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def reference_reader(images: Path) -> Callable[[tuple], torch.Tensor]:
    to_tensor = transforms.ToTensor()

    def read(site: tuple) -> torch.Tensor:
        dataset, experiment, plate, well, s = site
        paths = [rio.image_path(dataset, experiment, plate, well, s, c, str(images)) for c in rio.DEFAULT_CHANNELS]
        x = np.stack([np.array(Image.open(p)) for p in paths], axis=-1)   # (H, W, 6) uint8
        return to_tensor(x)                                                # (6, H, W) float32
    return read


def time_rounds(readers: dict[str, Callable[[], object]], n_items: int, rounds: int) -> dict[str, float]:
    """Sites per second of each reader; rounds are interleaved across readers."""
    spent = {name: 0.0 for name in readers}
    for _ in range(rounds):
        for name, read_all in readers.items():
            t = time.perf_counter()
            read_all()
            spent[name] += time.perf_counter() - t
    return {name: n_items * rounds / s for name, s in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25, help="passes over the four sites per reader")
    args = parser.parse_args()

    images = FIXTURES / "images"
    wells = metadata.read_wells(FIXTURES / "metadata")
    frame = bench_sites(wells)
    stats = data.compute_norm_stats(images, frame, by="plate", progress=False)
    dataset = data.SiteDataset(images, frame, metadata.class_list(wells, include_controls=True),
                               metadata.cell_types(wells), normalization="plate", stats=stats)
    with tempfile.TemporaryDirectory() as tmp:
        cached = data.SiteDataset(images, frame, dataset.classes, dataset.cell_types,
                                  normalization="plate", stats=stats).use_cache(tmp, progress=False)
        reference = reference_reader(images)
        keys = [(r.dataset, r.experiment, r.plate, r.well, r.site) for r in frame.itertuples()]
        # the readers must agree before their speeds mean anything
        for i, k in enumerate(keys):
            ref = reference(k)
            assert torch.equal((ref * 255).round().to(torch.uint8), dataset[i]["image"]), k
            assert torch.equal(dataset[i]["image"], cached[i]["image"]), k
        readers = {
            "reference (PIL + np.stack + ToTensor)": lambda: [reference(k) for k in keys],
            "SiteDataset (cv2, uint8)": lambda: [dataset[i] for i in range(len(dataset))],
            "SiteDataset + PackedCache": lambda: [cached[i] for i in range(len(cached))],
        }
        for read_all in readers.values():   # warm the page cache and the allocators
            read_all()
        speed = time_rounds(readers, len(keys), args.rounds)

    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs ({cpu_name()}); "
          f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"cv2 {cv2.__version__}, numpy {np.__version__}; torch threads {torch.get_num_threads()}, "
          f"cv2 threads {cv2.getNumThreads()}; load average at the end {os.getloadavg()[0]:.1f} "
          f"(above the CPU count, other work shared the cores: compare the ratios, not the rates)")
    print(f"{len(keys)} real 512x512x6 sites x {args.rounds} rounds, one process\n")
    base = next(iter(speed.values()))
    print("| reader | sites/s | ms/site | x reference |\n|---|---:|---:|---:|")
    for name, v in speed.items():
        print(f"| {name} | {v:.1f} | {1000 / v:.2f} | {v / base:.2f} |")
    names = list(speed)
    print(f"\ndataset / reference = {speed[names[1]] / base:.2f} (goal >= 1.5); "
          f"cache / reference = {speed[names[2]] / base:.1f} (goal >= 30)")


if __name__ == "__main__":
    main()
