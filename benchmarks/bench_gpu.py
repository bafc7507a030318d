"""ResNet-50 on 6 x 512 x 512 sites on a CUDA GPU: training and inference images/s, peak memory.

Side by side, in alternating rounds on the same card (so a busy or throttling card cannot fake a
ratio):

- training, model-bound (batches already on the GPU): fp32 (contiguous) against AMP (bf16 where the
  card supports it, else fp16 with a GradScaler) with channels_last, Adam, 1,108 classes;
- training fed by the real loader: `SiteDataset` over synthetic 512-px PNGs in the Kaggle layout,
  a DataLoader with ``--workers`` workers (4: a Kaggle session), pinned memory, device
  normalisation, AMP + channels_last;
- inference (AMP + channels_last, no grad): one view, and TTA (the 8 flip/rot90 views);
- peak GPU memory of each (``torch.cuda.max_memory_allocated``).

    python benchmarks/bench_gpu.py [--batch 32] [--steps 10] [--rounds 3] [--workers 4] [--json FILE]

Prints a markdown table for benchmarks/RESULTS.md, with the card's name. Exits with a message
where no GPU is present.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_lib import metadata, synthetic  # noqa: E402
from kernel_lib.augment import dihedral  # noqa: E402
from kernel_lib.data import SiteDataset, normalize_batch  # noqa: E402
from kernel_lib.models import build_model  # noqa: E402

N_CLASSES, SIZE = 1108, 512


def amp_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_model(channels_last: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("resnet50", N_CLASSES, in_chans=6, image_size=SIZE).cuda()
    return model.to(memory_format=torch.channels_last) if channels_last else model


class Trainer:
    """One training configuration: model, Adam, optional autocast dtype and GradScaler."""

    def __init__(self, dtype: torch.dtype | None, channels_last: bool):
        self.dtype, self.channels_last = dtype, channels_last
        self.model = make_model(channels_last).train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=self.dtype, enabled=self.dtype is not None):
            loss = F.cross_entropy(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()


def timed(fn, steps: int, images_per_step: int) -> float:
    """Images per second over ``steps`` calls of fn (after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return steps * images_per_step / (time.perf_counter() - t)


def peak_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 20


def loader_batches(folder: Path, batch: int, workers: int, sites: int):
    """An endless iterator of (image, mean, std, label) device batches from 512-px PNGs."""
    spec = synthetic.SyntheticSpec(image_size=SIZE, cell_types=("HUVEC",), train_experiments=1, test_experiments=1,
                                   sirnas_per_group=max(4, sites // 8), positive_controls=2)
    data = synthetic.ensure(folder, spec, progress=True)
    wells = metadata.read_wells(data)
    train = metadata.expand_sites(wells[(wells["dataset"] == "train") & (wells["well_type"] == "treatment")])
    ds = SiteDataset(data, train, metadata.class_list(wells), ["HUVEC"], normalization="image")
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=True,
                        drop_last=True, persistent_workers=workers > 0)
    while True:
        for b in loader:
            x = normalize_batch(b["image"].cuda(non_blocking=True), b["mean"].cuda(non_blocking=True),
                                b["std"].cuda(non_blocking=True))
            yield x, b["label"].cuda(non_blocking=True) % N_CLASSES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--sites", type=int, default=256, help="synthetic 512-px training sites for the loader run")
    p.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "bench_gpu_data"))
    p.add_argument("--json", help="also write the results as JSON")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")
    torch.backends.cudnn.benchmark = True
    card = torch.cuda.get_device_name(0)
    dtype = amp_dtype()
    amp_name = "bf16" if dtype == torch.bfloat16 else "fp16 + GradScaler"
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(args.batch, 6, SIZE, SIZE, device="cuda", generator=g)
    y = torch.randint(0, N_CLASSES, (args.batch,), device="cuda", generator=g)
    fp32, amp = Trainer(None, False), Trainer(dtype, True)
    batches = loader_batches(Path(args.data), args.batch, args.workers, args.sites)
    fed = Trainer(dtype, True)
    infer_model = make_model(True).eval()

    def infer(tta: bool) -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
            xc = x.contiguous(memory_format=torch.channels_last)
            if tta:
                sum(infer_model(dihedral(xc, v)) for v in range(8))
            else:
                infer_model(xc)

    runs = {
        "train fp32 (model-bound)": (lambda: fp32.step(x, y), args.batch),
        f"train AMP {amp_name} + channels_last (model-bound)": (lambda: amp.step(x, y), args.batch),
        f"train AMP + channels_last fed by the loader ({args.workers} workers, PNGs)":
            (lambda: fed.step(*next(batches)), args.batch),
        "inference AMP + channels_last, 1 view": (lambda: infer(False), args.batch),
        "inference AMP + channels_last, TTA 8 views": (lambda: infer(True), args.batch),
    }
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, (fn, n) in runs.items():
            rates[name].append(timed(fn, args.steps, n))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    peaks = {name: peak_mb(fn) for name, (fn, _) in runs.items()}
    base = statistics.median(rates["train fp32 (model-bound)"])
    result = {"card": card, "torch": torch.__version__, "cuda": torch.version.cuda, "batch": args.batch,
              "rows": [{"what": name, "images_per_s": round(statistics.median(v), 1),
                        "x_fp32": round(statistics.median(v) / base, 2), "peak_mb": round(peaks[name])}
                       for name, v in rates.items()]}
    print(f"\n{card}, torch {torch.__version__}, CUDA {torch.version.cuda}, batch {args.batch}, "
          f"median of {args.rounds} rounds x {args.steps} steps\n")
    print("| what | images/s | x train fp32 | peak GPU MB |\n|---|---:|---:|---:|")
    for row in result["rows"]:
        print(f"| {row['what']} | {row['images_per_s']} | {row['x_fp32']} | {row['peak_mb']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
