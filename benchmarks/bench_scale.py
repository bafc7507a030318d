"""The whole chain at the real RxRx1 shape: time, peak memory and output sizes per stage.

The dataset is the real layout (kernel_lib.real_layout: all 51 experiments, both sites, 125,510
sites, 1,108 siRNAs in the real plate groups) rendered at ``--image-size`` px, generated and cached
like the default dataset. Every stage runs as its own ``run_all.py --only STAGE`` process, so its
peak resident memory (the papermill process and the notebook's kernel, from ``os.wait4``) and wall
time are its own. Training is small (profile smoke: a small backbone, a subsample of sites) and
cut into chunks by ``chunk_steps``; inference and the merge cover every validation and test site.
EDA draws the plate maps of all 51 experiments. For the resumed chunk of the chunked stage, the
time from the kernel's start to its first optimizer step comes from its metrics.json.

    python benchmarks/bench_scale.py [--image-size 16] [--out build/bench_scale] [--json FILE]

Budgets (issue 10): any stage <= 12 GB peak; a resumed chunk's first step <= 60 s plus one batch's
decoding; the merge of 18 test experiments with assignment <= 60 s; EDA on the full layout <= 3 min.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from kernel_lib import metadata, synthetic  # noqa: E402
from kernel_lib.outputs import read_metrics  # noqa: E402
from kernel_lib.registry import enabled_stages  # noqa: E402


def run_stage(stage: str, data: Path, out: Path, params: list[str]) -> dict:
    """Run one stage in its own process; wall seconds and peak RSS (MB) of it and its kernel."""
    cmd = [sys.executable, str(REPO / "run_all.py"), "--data", str(data), "--out", str(out), "--profile", "smoke",
           "--only", stage, *params]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"stage {stage} failed ({proc.returncode}):\n{log[-4000:]}")
    # ru_maxrss of a reaped child covers its own descendants (the kernel), in KiB on Linux
    return {"stage": stage, "wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def output_sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--out", default=str(REPO / "build" / "bench_scale"))
    p.add_argument("--cache", default=str(REPO / ".cache"))
    p.add_argument("--json", help="also write the results as JSON")
    p.add_argument("--only", help="comma-separated stages to run (default: every stage)")
    p.add_argument("--keep", action="store_true",
                   help="keep the output folder: finished stages are skipped, a trained one only predicts")
    args = p.parse_args()

    t0 = time.perf_counter()
    data = synthetic.ensure(args.cache, synthetic.real_layout_spec(args.image_size))
    generate_s = time.perf_counter() - t0
    wells = metadata.read_wells(data)
    experiments = sorted(wells["experiment"].unique())
    out = Path(args.out)
    if out.exists() and not args.keep:
        shutil.rmtree(out)
    stages = [s.strip() for s in args.only.split(",")] if args.only else enabled_stages("smoke")
    size = args.image_size
    params = ["-p", f"all.image_size={size}", "-p", "all.num_workers=0",
              "-p", f"eda.experiments={json.dumps(experiments)}",
              # the chunked stage: 2 epochs of 256 sites, cut every 4 steps (several kernels, one resumed)
              "-p", "resnet50.max_train_sites=256", "-p", "resnet50.epochs=2", "-p", "resnet50.chunk_steps=4",
              "-p", "resnet50.batch_size=32"]
    rows = []
    for stage in stages:
        row = run_stage(stage, data, out, params)
        m = read_metrics(out / stage)
        row["chunks"] = len(list((out / stage).glob(f"{stage}_chunk*.ipynb")))
        row["first_step_s_last_chunk"] = m.get("first_step_s")
        row["outputs"] = output_sizes(out / stage)
        rows.append(row)
        print(f"{stage:18s} {row['wall_s']:8.1f} s  peak {row['peak_rss_mb']:8.1f} MB  chunks {row['chunks']}  "
              f"first step {row['first_step_s_last_chunk']}", flush=True)
    sub = (out / "submission.csv").read_text().splitlines() if (out / "submission.csv").is_file() else ["-"]
    result = {"machine": f"{platform.node()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
              "dataset": {"sites": int(len(wells) * 2), "experiments": len(experiments), "image_size": size,
                          "generate_s (0 when cached)": round(generate_s, 1),
                          "pngs": int(len(wells) * 12)},
              "submission_rows": len(sub) - 1, "stages": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print("\n| stage | wall s | peak RSS MB | chunks | first step s (last chunk) | largest outputs |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        big = sorted(r["outputs"].items(), key=lambda kv: -kv[1])[:3]
        print(f"| {r['stage']} | {r['wall_s']} | {r['peak_rss_mb']} | {r['chunks']} | "
              f"{r['first_step_s_last_chunk'] if r['first_step_s_last_chunk'] is not None else '-'} | "
              + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in big) + " |")
    print(f"\nsubmission rows: {len(sub) - 1}; {result['machine']}")


if __name__ == "__main__":
    main()
