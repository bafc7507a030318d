"""The adaptive push of a built chain (`python run_all.py kaggle push`): the datasets, then the
kernels in chain order.

After each chunk of a training stage `push` reads that chunk's metrics.json and pushes the next
chunk only while training is unfinished; the stage's readers then name the chunk that finished
(kaggle_build.resolve_source). Before each GPU kernel it reads `kaggle quota` and stops cleanly
(QuotaStop, with the command that resumes) when the week's GPU hours cannot hold it. Running the
client, reading what it prints and waiting: kaggle_cli.py.
"""
from __future__ import annotations

import re
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from .kaggle_build import DEFAULT_BUILD, MARGIN_S, BuiltKernel, KaggleError, read_build, resolve_source
from .kaggle_cli import (METRICS_PATTERN, Clock, QuotaStop, Runner, Sleep, run_checked, show_command, chunk_metrics,
                         dataset_state, gpu_quota, kernel_status, log_report, refused_sources, run_kaggle,
                         wait_for_dataset, wait_for_kernel)
from .outputs import write_json

NO_WAIT_WARNING = ("warning: --no-wait pushes every kernel at once. Kaggle runs only a few GPU sessions at a "
                   "time per account and queues or refuses the rest, and chunk i+1 must start from chunk "
                   "i's finished output: chunks cannot overlap. Use --no-wait only to re-run kernels whose "
                   "kernel sources already have complete versions.")


def push_datasets(run: Runner, build_dir: Path, manifest: dict, poll_s: float, dry_run: bool,
                  sleep: Sleep = time.sleep, clock: Clock = time.monotonic) -> None:
    """kernel_lib: created the first time, a new version every push (once the previous version is
    ready: Kaggle refuses a version while one is processing); weights: created once."""
    for ds in manifest["datasets"]:
        folder = Path(build_dir) / ds["dir"]
        ref = f"{manifest['user']}/{ds['dir']}"
        create = ["datasets", "create", "-p", str(folder), "--dir-mode", "zip"]
        version = ["datasets", "version", "-p", str(folder), "-m", "kernel_lib from run_all.py kaggle push",
                   "--dir-mode", "zip"]
        if dry_run:
            print(f"# dataset {ref}: created if `kaggle datasets status` finds none"
                  + (", else a new version once the current one is ready" if ds["kind"] == "kernel_lib"
                     else ", else left as it is"))
            print(show_command(["datasets", "status", ref, "--format", "json"]))
            print(show_command(create))
            if ds["kind"] == "kernel_lib":
                print(show_command(version))
            print(f"# wait until `kaggle datasets status {ref}` says ready")
            continue
        state = dataset_state(run, ref)
        if state is None:
            run_checked(run, create, f"creating dataset {ref}")
            before = 0
        elif ds["kind"] == "kernel_lib":
            before = state[1]
            if state[0] != "ready":
                print(f"  {ref}: version {before} is {state[0]}; waiting for it before a new version", flush=True)
                wait_for_dataset(run, ref, before - 1, poll_s, sleep, clock=clock)
            run_checked(run, version, f"new version of dataset {ref}")
        else:
            print(f"dataset {ref} exists (version {state[1]}): not uploaded again", flush=True)
            continue
        wait_for_dataset(run, ref, before, poll_s, sleep, clock=clock)


# ---------------------------------------------------------------- push

def _start_index(kernels: Sequence[BuiltKernel], start: str | None) -> int:
    """Index of the kernel ``start`` names: its slug or id, or a stage (its first kernel)."""
    if not start:
        return 0
    for i, k in enumerate(kernels):
        if start in (k.id, k.dir.name, k.stage):
            return i
    raise ValueError(f"--from {start!r}: no such kernel or stage in the build; kernels are "
                     f"{', '.join(k.dir.name for k in kernels)}")


def _gpu(kernel: BuiltKernel) -> bool:
    return bool(kernel.meta.get("enable_gpu") or kernel.meta.get("machine_shape"))


def resume_command(build_dir: Path, slug: str) -> str:
    extra = "" if Path(build_dir).resolve() == DEFAULT_BUILD.resolve() else f" --build-dir {shlex.quote(str(build_dir))}"
    return f"python run_all.py kaggle push --from {slug}{extra}"


class _Push:
    """One adaptive push of a build: what completed, which chunk finished each stage, the quota."""

    def __init__(self, build_dir: Path, manifest: dict, kernels: list[BuiltKernel], run: Runner, poll_s: float,
                 sleep: Sleep, work: Path):
        self.build_dir, self.kernels, self.run, self.poll_s, self.sleep, self.work = (
            Path(build_dir), kernels, run, poll_s, sleep, work)
        self.by_id = {k.id: k for k in kernels}
        self.need_s = float(manifest["time_budget_s"]) + float(manifest.get("margin_s", MARGIN_S))
        self.complete: set[str] = set()     # kernel ids seen complete in this push
        self.finished: dict[str, str] = {}  # stage -> the chunk kernel that finished its training
        self.steps: dict[str, int] = {}     # stage -> steps_done of its last chunk
        self.done: list[str] = []           # kernels pushed and completed in this push
        self.quota_unknown_said = False

    def chunks(self, stage: str) -> list[BuiltKernel]:
        return [k for k in self.kernels if k.stage == stage and k.chunk]

    def settle(self, ref: str, kernel_id: str | None = None) -> None:
        if (kernel_id or ref) not in self.complete:
            wait_for_kernel(self.run, ref, self.poll_s, self.sleep)
            self.complete.add(kernel_id or ref)

    def metrics(self, ref: str) -> dict:
        return chunk_metrics(self.run, ref, Path(tempfile.mkdtemp(prefix="metrics-", dir=self.work)))

    def probe(self, stage: str) -> str:
        """The chunk that finished ``stage`` in an earlier push: each chunk's metrics.json in turn."""
        for k in self.chunks(stage):
            state, _ = kernel_status(self.run, k.id)
            if state != "complete":
                break
            self.complete.add(k.id)
            if self.metrics(k.id).get("finished"):
                return k.id
        first = self.chunks(stage)[0].dir.name
        raise KaggleError(f"stage {stage} has no finished chunk on Kaggle; push it first: "
                          f"`{resume_command(self.build_dir, first)}`")

    def sources(self, kernel: BuiltKernel, first: int) -> list[str]:
        """Its kernel sources, chunks replaced by the chunk that finished their stage."""
        for ref in kernel.meta["kernel_sources"]:
            source = self.by_id.get(ref)
            if (source is not None and source.chunk and source.stage not in self.finished
                    and all(self.kernels.index(c) < first for c in self.chunks(source.stage))):
                self.finished[source.stage] = self.probe(source.stage)
        return [resolve_source(ref, self.by_id, self.finished) for ref in kernel.meta["kernel_sources"]]

    def summary(self) -> str:
        lines = [f"done in this push: {', '.join(self.done) or 'nothing'}"]
        lines += [f"  {stage} finished in {ref}" for stage, ref in self.finished.items()]
        lines += [f"  {stage} unfinished at steps_done {n}" for stage, n in self.steps.items()
                  if stage not in self.finished]
        return "\n".join(lines)

    def check_quota(self, kernel: BuiltKernel) -> None:
        quota = gpu_quota(self.run)
        if quota is None:
            if not self.quota_unknown_said:
                print("warning: `kaggle quota` gave no GPU quota (kaggle >= 2.2 prints it); not checked", flush=True)
                self.quota_unknown_said = True
            return
        if quota.left_h * 3600 < self.need_s:
            raise QuotaStop(f"stopped before {kernel.id}: it may use {self.need_s / 3600:.1f} GPU hours and "
                            f"{quota.left_h:.1f} of {quota.total_h:.1f} are left this week; the quota resets "
                            f"{quota.resets}.\n{self.summary()}\nresume after the reset with:\n  "
                            f"{resume_command(self.build_dir, kernel.dir.name)}")

    def plan_quota(self, todo: Sequence[BuiltKernel], yes: bool) -> None:
        """Before anything is pushed: at least one GPU session per training stage still to run."""
        stages = list(dict.fromkeys(k.stage for k in todo if _gpu(k)))
        if not stages:
            return
        quota = gpu_quota(self.run)
        planned = len(stages) * self.need_s / 3600
        if quota is None:
            return
        print(f"GPU quota: {quota.left_h:.1f} of {quota.total_h:.1f} h left (resets {quota.resets}); this push "
              f"runs {len(stages)} training stage(s), at least one GPU session of up to {self.need_s / 3600:.1f} h "
              f"each: {planned:.1f} h", flush=True)
        if planned > quota.left_h and not yes:
            raise KaggleError(f"the push plans at least {planned:.1f} GPU hours and {quota.left_h:.1f} are left "
                              f"(the quota resets {quota.resets}); pass --yes to push anyway: it stops cleanly "
                              "before the first GPU kernel the quota cannot hold and prints the command that "
                              "resumes it")

    def push_one(self, kernel: BuiltKernel) -> str:
        """`kaggle kernels push`; returns the id/version pushed."""
        text = run_checked(self.run, ["kernels", "push", "-p", str(kernel.dir)], f"pushing kernel {kernel.id}")
        refused_sources(text, kernel.id, resume_command(self.build_dir, kernel.dir.name))
        version = re.search(r"Kernel version (\d+) successfully", text)
        return f"{kernel.id}/{version.group(1)}" if version else kernel.id

    def after_chunk(self, kernel: BuiltKernel, ref: str) -> None:
        """Read what the chunk measured: finished, progress, or a stop."""
        metrics = self.metrics(ref)
        steps = int(metrics.get("steps_done") or 0)
        if metrics.get("finished"):
            self.finished[kernel.stage] = kernel.id
            print(f"{kernel.stage}: training finished in chunk {kernel.chunk} (steps_done {steps}); its readers "
                  f"read {kernel.id}", flush=True)
            return
        previous = self.steps.get(kernel.stage)
        if previous is None:
            before = [c for c in self.chunks(kernel.stage) if c.chunk == kernel.chunk - 1]
            previous = int(self.metrics(before[0].id).get("steps_done") or 0) if before else 0
        if steps <= previous:
            raise KaggleError(f"{ref} made no progress: steps_done {steps}, the previous chunk {previous}; "
                              f"the push stops here.\n{log_report(self.run, ref)}")
        self.steps[kernel.stage] = steps
        later = [c for c in self.chunks(kernel.stage) if c.chunk > kernel.chunk]
        if not later:
            raise KaggleError(f"{kernel.stage} is not finished after its last built chunk ({kernel.id}, steps_done "
                              f"{steps}): rebuild with a larger --max-chunks (or --chunks {kernel.stage}=K) and "
                              f"resume with `python run_all.py kaggle push --from "
                              f"{kernel.dir.name.rsplit('-', 1)[0]}-{kernel.chunk + 1}`")
        print(f"{kernel.stage}: chunk {kernel.chunk} reached steps_done {steps}, training unfinished: "
              f"pushing chunk {kernel.chunk + 1}", flush=True)

    def kernel(self, kernel: BuiltKernel, first: int) -> None:
        if kernel.chunk and kernel.stage in self.finished:
            print(f"skip {kernel.id}: {kernel.stage} finished in {self.finished[kernel.stage]}", flush=True)
            return
        sources = self.sources(kernel, first)
        for source in sources:
            self.settle(source)
        if sources != kernel.meta["kernel_sources"]:
            print(f"{kernel.id}: kernel sources {', '.join(sources)} (was {', '.join(kernel.meta['kernel_sources'])})",
                  flush=True)
            kernel.meta["kernel_sources"] = sources
            write_json(kernel.dir / "kernel-metadata.json", kernel.meta, indent=2)
        if _gpu(kernel):
            self.check_quota(kernel)
        ref = self.push_one(kernel)
        self.settle(ref, kernel.id)
        self.done.append(kernel.id)
        if kernel.chunk:
            self.after_chunk(kernel, ref)


def _dry_run(build_dir: Path, todo: Sequence[BuiltKernel], wait: bool) -> None:
    waited: set[str] = set()
    for kernel in todo:
        if wait:
            for source in kernel.meta["kernel_sources"]:
                if source not in waited:
                    print(f"# wait until `kaggle kernels status {source}` says complete")
                    waited.add(source)
            if _gpu(kernel):
                print(show_command(["quota", "--format", "json"]))
                print("# stop here, printing the command that resumes, if the GPU hours left cannot hold this kernel")
        print(show_command(["kernels", "push", "-p", str(kernel.dir)]))
        if wait:
            print(f"# wait until `kaggle kernels status {kernel.id}` says complete")
            waited.add(kernel.id)
        if wait and kernel.chunk:
            print(show_command(["kernels", "output", kernel.id, "-p", str(Path(build_dir) / "metrics" / kernel.dir.name),
                         "--file-pattern", METRICS_PATTERN, "--force"]))
            print(f"# {kernel.stage}: the next chunk only while metrics.json says finished false and steps_done "
                  "grew; once finished, the later chunks are skipped and readers name this chunk")


def push(build_dir: Path, *, dry_run: bool = False, wait: bool = True, start: str | None = None,
         datasets: bool = True, poll_s: float = 60.0, yes: bool = False, run: Runner = run_kaggle,
         sleep: Sleep = time.sleep, clock: Clock = time.monotonic) -> list[str]:
    """Datasets first, then each kernel in chain order; returns the kernels completed. With
    ``wait``, a kernel is pushed only once its kernel sources are complete, one at a time (GPU
    quota; a chunk needs the previous chunk's output), a training stage's chunks stop at the one
    that finished, and each GPU kernel is pushed only if the week's quota can hold it."""
    manifest, kernels = read_build(build_dir)
    first = _start_index(kernels, start)
    todo = kernels[first:]
    if not wait:
        print(NO_WAIT_WARNING, file=sys.stderr, flush=True)
    if datasets:
        push_datasets(run, build_dir, manifest, poll_s, dry_run, sleep, clock)
    if dry_run:
        _dry_run(build_dir, todo, wait)
        return []
    if not wait:
        for kernel in todo:
            text = run_checked(run, ["kernels", "push", "-p", str(kernel.dir)], f"pushing kernel {kernel.id}")
            refused_sources(text, kernel.id, resume_command(build_dir, kernel.dir.name))
        return []
    with tempfile.TemporaryDirectory(prefix="kaggle-push-") as work:
        state = _Push(build_dir, manifest, kernels, run, poll_s, sleep, Path(work))
        state.plan_quota(todo, yes)
        for kernel in todo:
            state.kernel(kernel, first)
    return state.done
