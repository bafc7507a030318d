#!/usr/bin/env python
"""Run the RxRx1 notebook chain locally with papermill, or build and push it as Kaggle kernels.

    python run_all.py                       # the whole chain on the embedded synthetic dataset
    python run_all.py --data DIR --profile smoke
    python run_all.py --time-budget 60      # training stages in 60-second chunks, like Kaggle sessions
    python run_all.py --list                # stages and their parameters
    python run_all.py --synthetic real-layout   # the real RxRx1 layout, rendered small
    python run_all.py verify --data DIR     # check a dataset before spending GPU hours
    python run_all.py kaggle build --user NAME
    python run_all.py kaggle push [--dry-run]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO_ROOT))


def parse_args(argv: list[str]) -> argparse.Namespace:
    from kernel_lib.registry import PROFILES, STAGE_NAMES

    p = argparse.ArgumentParser(prog="run_all.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="stages: " + ", ".join(STAGE_NAMES) + "\n'python run_all.py kaggle --help' "
                                       "for the Kaggle commands")
    p.add_argument("--data", help="a Kaggle-layout RxRx1 folder (train.csv, test.csv, train/, test/); "
                                  "default: the embedded synthetic dataset, generated on first use")
    p.add_argument("--out", default="out", help="output folder (default: out)")
    p.add_argument("--profile", choices=sorted(PROFILES),
                   help="parameter set: synthetic (default without --data), full (the seed's real-scale "
                        "settings; default with --data), smoke (tiny sizes and epochs, CPU minutes on any data)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="STAGE.NAME=VALUE",
                   help="override a parameter, e.g. -p resnet50.epochs=3 (all.NAME for every stage)")
    p.add_argument("--params", metavar="FILE.yaml", help="overrides as YAML: {stage: {name: value}}")
    p.add_argument("--only", metavar="STAGES", help="comma-separated stages to run")
    p.add_argument("--with", dest="extra", default="", metavar="STAGES",
                   help="optional stages or groups to run too: final_fit, fold (K folds), pseudo_label (with "
                        "merge_pseudo; on in --profile winners)")
    p.add_argument("--from", dest="start", metavar="STAGE", help="run from this stage on")
    p.add_argument("--time-budget", type=float, default=0.0, metavar="SECONDS",
                   help="run each training stage as chunks of at most SECONDS, resuming from checkpoints")
    p.add_argument("--force", action="store_true", help="rerun selected stages even when finished")
    p.add_argument("--list", action="store_true", help="list the stages and their parameters, then exit")
    p.add_argument("--log-output", action="store_true", help="stream the notebooks' output (papermill --log-output)")
    p.add_argument("--synthetic", default="embedded", metavar="NAME",
                   help="without --data: the synthetic dataset to generate and run on: embedded (default, "
                        "20 experiments of 40 siRNAs), real-layout (the real 51 experiments, 1,108 siRNAs, "
                        "125,510 sites at 16 px; profile smoke by default), real-layout-subset (12 real experiments)")
    p.add_argument("--synthetic-size", type=int, default=0, metavar="PX",
                   help="render the synthetic dataset at PX x PX (4..512) instead of its default size")
    p.add_argument("--cache", default=str(REPO_ROOT / ".cache"), help="where the synthetic dataset is cached")
    return p.parse_args(argv)


def list_stages(profile: str, extra: tuple[str, ...] = (), overrides: dict | None = None) -> None:
    """Each stage, its notebook and upstream stages, and its parameters in ``profile`` (registry.py)
    with the ``-p``/``--params`` overrides applied, as the chain would run them."""
    from kernel_lib.parameters import stage_params
    from kernel_lib.registry import STAGES, enabled_stages

    enabled = enabled_stages(profile, extra)
    print(f"profile {profile} (folders are set by the chain or the Kaggle build)")
    for stage in STAGES:
        upstream = f" <- {', '.join(stage.upstream)}" if stage.upstream else ""
        state = "" if stage.name in enabled else "  [optional, not enabled: --with " + (stage.group or stage.name) + "]"
        print(f"{stage.name}  ({stage.notebook}, {stage.kind}{upstream}){'  [chunked]' if stage.trains else ''}{state}")
        for name, value in stage_params(stage, profile, overrides, extra=extra).items():
            print(f"    {name} = {value!r}")


def verify_main(argv: list[str]) -> int:
    """``python run_all.py verify --data DIR [--full]``: exit 0 when nothing is wrong, 1 otherwise."""
    from kernel_lib.verify import verify_dataset

    p = argparse.ArgumentParser(prog="run_all.py verify",
                                description="check a Kaggle-layout RxRx1 folder as the chain will read it: the CSVs, "
                                            "then every site's six PNGs (every problem listed)")
    p.add_argument("--data", required=True, help="the Kaggle-layout folder")
    p.add_argument("--full", action="store_true", help="decode every PNG (default: quick: presence, PNG "
                                                       "signature, header size, 8-bit grayscale)")
    p.add_argument("--workers", type=int, default=0, help="processes (default: one per core)")
    p.add_argument("--report", metavar="FILE.csv", help="write every problem as CSV (path, problem, detail)")
    args = p.parse_args(argv)
    try:
        report = verify_dataset(args.data, "full" if args.full else "quick", args.workers)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    if args.report:
        report.problems().to_csv(args.report, index=False)
        print(f"problems written to {args.report}")
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "kaggle":
        from kernel_lib import kaggle
        return kaggle.main(argv[1:])
    if argv and argv[0] == "verify":
        return verify_main(argv[1:])
    args = parse_args(argv)
    from kernel_lib.parameters import parse_overrides
    from kernel_lib.registry import split_names

    extra = tuple(split_names(args.extra))
    if args.list:
        try:
            list_stages(args.profile or ("full" if args.data else "synthetic"), extra,
                        parse_overrides(args.param, args.params))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0

    from kernel_lib import synthetic
    from kernel_lib.chain import Chain, ChainError, StaleResultsError, select_stages, summary_table, write_index
    from kernel_lib.registry import STAGE_NAMES

    t0 = time.time()
    if args.data:
        data_dir, profile = Path(args.data), args.profile or "full"
    else:
        try:
            spec = synthetic.dataset_spec(args.synthetic, args.synthetic_size)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"synthetic dataset {args.synthetic} (generated once, then cached in {args.cache})", flush=True)
        default = "synthetic" if spec.layout == "embedded" else "smoke"
        data_dir, profile = synthetic.ensure(args.cache, spec), args.profile or default
    try:
        chain = Chain(data_dir=data_dir, out=Path(args.out), profile=profile,
                      overrides=parse_overrides(args.param, args.params), time_budget_s=args.time_budget,
                      log_output=args.log_output, extra=extra)
        stages = select_stages(args.only, args.start, chain.stages)
        runs = []
        for name in stages:
            runs += chain.run([name], force=args.force)
    except StaleResultsError as e:
        print(f"\nSTOPPED: {e}", file=sys.stderr)
        return 1
    except ChainError as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
        print("Fix it and rerun: done stages are skipped, a training stage resumes from its checkpoint "
              "(or only predicts, when its training finished).", file=sys.stderr)
        return 1
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = summary_table(chain, runs)
    index = write_index(chain, table)
    print("\n" + table.to_string())
    if table.attrs.get("warnings"):
        print("\nwarnings:")
        for stage, message in table.attrs["warnings"]:
            print(f"  [{stage}] {message}")
    stale = [n for n in STAGE_NAMES if chain.state(n) == "stale"]
    if stale:
        print(f"\nstale (an upstream stage was rerun; they rerun when selected): {', '.join(stale)}")
    sub = chain.out / "submission.csv"
    print(f"\nsubmission: {sub if sub.is_file() else '(no merge ran)'}\nindex page: {index}\n"
          f"total wall time: {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
