"""`python run_all.py kaggle ...`: the command line of the Kaggle chain (argparse and `main`).

The work is done elsewhere: kaggle_build.py (plan, parameters, build, templates), kaggle_cli.py
(push, status, download through the kaggle CLI), kaggle_rehearse.py (the offline sandbox).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .kaggle_build import (DEFAULT_BUILD, DEFAULT_MAX_CHUNKS, MARGIN_S, REPO_ROOT, SESSION_S, BuildOptions, KaggleError,
                           build, parse_chunks, resolve_user, write_templates)
from .kaggle_cli import QuotaStop, download, status
from .kaggle_push import push
from .kaggle_rehearse import LAYOUTS, folder_size, rehearse
from . import gpu_plan, synthetic
from .gpu_plan import WEEKLY_QUOTA_H
from .kaggle_build import chunk_budget_s
from .parameters import parse_overrides
from .real_layout import REAL_METADATA_DIR
from .registry import PROFILES, split_names

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_all.py kaggle", description="Build and push the chain as Kaggle kernels.")
    sub = p.add_subparsers(dest="command", required=True)
    default_build = str(DEFAULT_BUILD)
    b = sub.add_parser("build", help="write push-ready kernel and dataset folders")
    b.add_argument("--user", help="Kaggle user name (default: KAGGLE_USERNAME, then ~/.kaggle/kaggle.json)")
    b.add_argument("--out", default=default_build, help="build folder (default: build/kaggle)")
    b.add_argument("--chunks", action="append", default=[], metavar="STAGE=K",
                   help="chunk kernels for one training stage, e.g. resnet50=8 or cell_line=2 (default: --max-chunks)")
    b.add_argument("--max-chunks", type=int, default=DEFAULT_MAX_CHUNKS, metavar="N",
                   help=f"chunk kernels built per training stage (default {DEFAULT_MAX_CHUNKS}); push stops at the "
                        "chunk whose metrics.json says training finished")
    b.add_argument("--profile", default="full", choices=sorted(PROFILES), help="parameter profile (default: full)")
    b.add_argument("--with", dest="extra", default="", metavar="STAGES",
                   help="optional stages or groups to build too: final_fit, fold, pseudo_label (on in winners)")
    b.add_argument("-p", "--param", action="append", default=[], metavar="STAGE.NAME=VALUE",
                   help="override a parameter, e.g. -p resnet50.pretrained=hub (all.NAME for every stage)")
    b.add_argument("--params", metavar="FILE.yaml", help="overrides as YAML: {stage: {name: value}}")
    b.add_argument("--session-hours", type=float, default=SESSION_S / 3600,
                   help="the Kaggle session a chunk plans for, in hours (default 9, what GPU quota messages state; "
                        "Kaggle's docs say 12: --session-hours 12)")
    b.add_argument("--margin-minutes", type=float, default=MARGIN_S / 60,
                   help="kept free of training in each session (30)")
    b.add_argument("--time-budget", type=float, default=0.0, metavar="SECONDS",
                   help="a chunk's time_budget_s, overriding session minus margin")
    for name, help_ in (("push", "push the datasets, then the kernels in chain order"),
                        ("status", "status of every kernel of the chain"),
                        ("download", "pull the final kernel's output (submission.csv)")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--build-dir", default=default_build, help="the build folder (default: build/kaggle)")
        if name == "push":
            s.add_argument("--dry-run", action="store_true", help="print the kaggle commands, run nothing")
            s.add_argument("--no-wait", action="store_true",
                           help="push every kernel at once, all chunks included (only when their sources already "
                                "have complete versions: Kaggle limits concurrent GPU sessions, chunks cannot overlap)")
            s.add_argument("--yes", action="store_true",
                           help="push even when the planned GPU hours exceed the quota left this week")
            s.add_argument("--from", dest="start", metavar="KERNEL", help="resume the chain at this kernel slug or stage")
            s.add_argument("--skip-datasets", action="store_true", help="do not upload kernel_lib and weights")
            s.add_argument("--poll", type=float, default=60.0, metavar="SECONDS", help="status polling interval")
        if name == "download":
            s.add_argument("--stage", default="", help="whose last kernel to pull (default: the final merge, "
                                                       "merge_pseudo when the build pseudo-labels)")
            s.add_argument("--out", default="kaggle_output", help="where to put it (default: kaggle_output)")
    r = sub.add_parser("rehearse", help="run the built chain offline in Kaggle-like sandboxes")
    r.add_argument("--build-dir", default=default_build, help="the build folder (default: build/kaggle)")
    source = r.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a Kaggle-layout RxRx1 folder, mounted as the competition data")
    source.add_argument("--synthetic", metavar="NAME", help="a synthetic dataset (embedded, real-layout, "
                                                            "real-layout-subset), generated and cached in .cache/")
    r.add_argument("--work", default=str(REPO_ROOT / "build" / "rehearsal"), help="sandboxes (default: build/rehearsal)")
    r.add_argument("--layout", default="modern", choices=LAYOUTS, help="how inputs are mounted (default: modern)")
    r.add_argument("--only", metavar="STAGES", help="comma-separated stages to rehearse (with the kernels they read)")
    r.add_argument("--log-output", action="store_true", help="stream the notebooks' output")
    g = sub.add_parser("plan", help="estimated GPU hours and chunks of every training stage on the real data")
    g.add_argument("--profile", default="full", choices=sorted(PROFILES), help="parameter profile (default: full)")
    g.add_argument("--with", dest="extra", default="", metavar="STAGES",
                   help="optional stages or groups to count too: final_fit, fold, pseudo_label (on in winners)")
    g.add_argument("-p", "--param", action="append", default=[], metavar="STAGE.NAME=VALUE")
    g.add_argument("--params", metavar="FILE.yaml")
    g.add_argument("--metadata", default=str(REAL_METADATA_DIR),
                   help="a folder with the competition's CSVs (default: the copy shipped in tests/fixtures)")
    g.add_argument("--images-per-second", type=float, default=0.0, metavar="N",
                   help="training images per second on your GPU (default: measured, else the published T4 figure)")
    g.add_argument("--measured", action="append", default=[], metavar="DIR",
                   help="folders whose metrics.json hold a chunk's measured train_images_per_s (e.g. kaggle_output)")
    g.add_argument("--session-hours", type=float, default=SESSION_S / 3600, help="session length (default 9)")
    g.add_argument("--margin-minutes", type=float, default=MARGIN_S / 60)
    g.add_argument("--quota-hours", type=float, default=WEEKLY_QUOTA_H, help="weekly GPU quota (default 30)")
    t = sub.add_parser("metadata", help="rewrite the kernel-metadata/ templates (user USERNAME)")
    t.add_argument("--out", default=str(REPO_ROOT / "kernel-metadata"))
    t.add_argument("--chunks", action="append", default=[], metavar="STAGE=K")
    t.add_argument("--max-chunks", type=int, default=DEFAULT_MAX_CHUNKS, metavar="N")
    return p


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    try:
        if args.command == "build":
            opts = BuildOptions(user=resolve_user(args.user), out=Path(args.out), chunks=parse_chunks(args.chunks),
                                profile=args.profile, overrides=parse_overrides(args.param, args.params),
                                time_budget_s=args.time_budget, session_s=args.session_hours * 3600,
                                margin_s=args.margin_minutes * 60, max_chunks=args.max_chunks,
                                extra=tuple(split_names(args.extra)))
            manifest = build(opts)
            print(f"built {len(manifest['kernels'])} kernels and {len(manifest['datasets'])} dataset(s) in "
                  f"{opts.out} (time_budget_s {manifest['time_budget_s']:.0f} per chunk)\n"
                  f"next: python run_all.py kaggle push" +
                  ("" if Path(args.out) == DEFAULT_BUILD else f" --build-dir {args.out}"))
        elif args.command == "push":
            push(Path(args.build_dir), dry_run=args.dry_run, wait=not args.no_wait, start=args.start,
                 datasets=not args.skip_datasets, poll_s=args.poll, yes=args.yes)
        elif args.command == "status":
            status(Path(args.build_dir))
        elif args.command == "download":
            download(Path(args.build_dir), Path(args.out), stage=args.stage)
        elif args.command == "rehearse":
            only = split_names(args.only) or None
            data = Path(args.data) if args.data else synthetic.ensure(REPO_ROOT / ".cache",
                                                                      synthetic.dataset_spec(args.synthetic))
            outputs = rehearse(Path(args.build_dir), data, Path(args.work), args.layout, only, args.log_output)
            for ref, folder in outputs.items():
                print(f"{ref:<55} {folder_size(folder) / 1e6:9.1f} MB  {folder}")
        elif args.command == "plan":
            plans = gpu_plan.plan(args.profile, chunk_budget_s(args.session_hours * 3600, args.margin_minutes * 60),
                                  parse_overrides(args.param, args.params), args.metadata, args.images_per_second,
                                  args.measured, split_names(args.extra))
            extra = f" with {args.extra}" if args.extra else ""
            print(f"profile {args.profile}{extra}, {args.session_hours:g}-hour sessions, one T4\n")
            print(gpu_plan.plan_table(plans, args.quota_hours))
        elif args.command == "metadata":
            for path in write_templates(Path(args.out), parse_chunks(args.chunks), max_chunks=args.max_chunks):
                print(path)
    except QuotaStop as e:  # a clean stop: nothing failed, the quota ran out
        print(str(e), flush=True)
        return 3
    except (KaggleError, ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
