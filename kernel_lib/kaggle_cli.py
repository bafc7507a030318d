"""The kaggle CLI side of the chain: push, status, download, and waiting on Kaggle.

Owns running the ``kaggle`` executable (never importing the kaggle package: importing it
authenticates), reading what it prints (kernel and dataset status, the GPU quota, a chunk's
metrics.json, a failed kernel's log), waiting for kernels and datasets, uploading the datasets, and
`push`/`status`/`download` of a build written by kaggle_build.py. `push` is adaptive: after each
chunk of a training stage it reads that chunk's metrics.json and pushes the next chunk only while
training is unfinished; the stage's readers then name the chunk that finished. Before each GPU
kernel it reads `kaggle quota` and stops cleanly when the week's GPU hours cannot hold it.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .kaggle_build import (COMPETITION, DEFAULT_BUILD, MARGIN_S, BuiltKernel, KaggleError, read_build,
                           resolve_source)
from .outputs import METRICS_FILE, read_metrics, write_json

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess]
Sleep = Callable[[float], None]
Clock = Callable[[], float]
METRICS_PATTERN = r"^metrics\.json$"  # `kernels output --file-pattern` is a regex searched in each file name
LOG_TAIL_LINES = 40
DATASET_NOT_FOUND_S = 30 * 60  # a dataset not found this long after its create has gone wrong
NO_WAIT_WARNING = ("warning: --no-wait pushes every kernel at once. Kaggle runs only a few GPU sessions at a "
                   "time per account and queues or refuses the rest, and chunk i+1 must start from chunk "
                   "i's finished output: chunks cannot overlap. Use --no-wait only to re-run kernels whose "
                   "kernel sources already have complete versions.")


class QuotaStop(KaggleError):
    """The week's GPU quota cannot hold the next GPU kernel: the push stopped cleanly before it."""


def run_kaggle(args: Sequence[str]) -> subprocess.CompletedProcess:
    exe = shutil.which("kaggle")
    if exe is None:
        raise KaggleError("the kaggle CLI is not on PATH: pip install -r requirements.txt (kaggle 2.x), "
                          "then `kaggle auth login` or put your API token in ~/.kaggle")
    return subprocess.run([exe, *args], capture_output=True, text=True)


def _show(args: Sequence[str]) -> str:
    return "kaggle " + " ".join(shlex.quote(str(a)) for a in args)


def _checked(run: Runner, args: Sequence[str], what: str) -> str:
    """Run, echo, and fail on a non-zero exit or the error lines the CLI prints with exit status 0."""
    print(_show(args), flush=True)
    proc = run(args)
    text = (proc.stdout or "") + (proc.stderr or "")
    if text.strip():
        print("  " + text.strip().replace("\n", "\n  "), flush=True)
    bad = re.search(r"(push error|creation error)", text)
    if proc.returncode != 0 or bad:
        raise KaggleError(f"{what} failed ({_show(args)}): {text.strip() or f'exit status {proc.returncode}'}")
    return text


def kernel_status(run: Runner, ref: str) -> tuple[str, str]:
    """(status, failure message) of a kernel's latest version, or of ``user/slug/version``."""
    proc = run(["kernels", "status", ref])
    text = (proc.stdout or "") + (proc.stderr or "")
    match = re.search(r'has status "(?:KernelWorkerStatus\.)?([A-Za-z_]+)"', text)
    if proc.returncode != 0 or not match:
        return "unknown", text.strip()
    failure = re.search(r'Failure message: "(.*)"', text)
    return match.group(1).lower(), failure.group(1) if failure else ""


def dataset_state(run: Runner, ref: str) -> tuple[str, int] | None:
    """(status, current version) of a dataset; None when it does not exist (or is unreachable)."""
    proc = run(["datasets", "status", ref, "--format", "json"])
    if proc.returncode != 0:
        return None
    for line in reversed((proc.stdout or "").strip().splitlines()):
        if line.startswith("{"):
            data = json.loads(line)
            return str(data.get("status", "")).lower(), int(data.get("current_version_number") or 0)
    raise KaggleError(f"`{_show(['datasets', 'status', ref, '--format', 'json'])}` printed no JSON: {proc.stdout}")


# ---------------------------------------------------------------- what the CLI reports: quota, logs, metrics

@dataclass(frozen=True)
class Quota:
    """The week's GPU quota as `kaggle quota` prints it."""

    left_h: float
    total_h: float
    resets: str  # ISO time, as the client prints it


def gpu_quota(run: Runner) -> Quota | None:
    """`kaggle quota --format json` (kaggle >= 2.2): the GPU row; None when it cannot be read."""
    proc = run(["quota", "--format", "json"])
    text = (proc.stdout or "").strip()
    if proc.returncode != 0 or not text.startswith("["):
        return None
    try:
        rows = json.loads(text)
        gpu = next(r for r in rows if str(r.get("resource", "")).upper() == "GPU")
        hours = lambda v: float(str(v).rstrip("h"))  # the client prints "26.80h"
        return Quota(hours(gpu["remaining"]), hours(gpu["total"]), str(gpu.get("refreshAt") or "unknown"))
    except (ValueError, KeyError, StopIteration, AttributeError):
        return None


def _log_text(raw: str) -> str:
    """A kernel's log as text: Kaggle stores it as a JSON list of {stream_name, time, data}."""
    try:
        events = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(events, list) and all(isinstance(e, dict) for e in events):
        return "".join(str(e.get("data", "")) for e in events)
    return raw


def failing_cell(log: str) -> str | None:
    """The cell a notebook failed in, from papermill's or nbclient's error report in its log."""
    cell = re.search(r"An error occurred while executing the following cell:\n-+\n(.*?)\n-+\n", log, re.S)
    count = re.search(r'Exception encountered at "In \[(\d+)\]"', log)
    if not (cell or count):
        return None
    return (f"In [{count.group(1)}]" if count else "") + (f"\n{cell.group(1)}" if cell else "")


def log_report(run: Runner, ref: str, lines: int = LOG_TAIL_LINES) -> str:
    """The tail of a kernel's log (`kaggle kernels logs`) and its failing cell, for an error message."""
    proc = run(["kernels", "logs", ref])
    if proc.returncode != 0:
        return f"(its log could not be read: {((proc.stdout or '') + (proc.stderr or '')).strip()})"
    log = _log_text(proc.stdout or "")
    tail = "\n".join("    " + line for line in log.rstrip().splitlines()[-lines:])
    cell = failing_cell(log)
    return (f"failing cell: {cell}\n" if cell else "") + f"last {lines} lines of its log:\n{tail}"


def chunk_metrics(run: Runner, ref: str, folder: Path) -> dict:
    """Download only a kernel's metrics.json (the client also writes its log beside it)."""
    _checked(run, ["kernels", "output", ref, "-p", str(folder), "--file-pattern", METRICS_PATTERN, "--force"],
             f"fetching {ref}'s {METRICS_FILE}")
    metrics = read_metrics(folder)
    if not metrics:
        raise KaggleError(f"{ref}'s output holds no readable {METRICS_FILE} (see {folder}): "
                          "the notebook did not reach its training cell")
    return metrics


_REFUSED = re.compile(r"The following are not valid (competition|dataset|kernel) sources and could not be added "
                      r"to the kernel: ?(.*)")
_REFUSED_HELP = {
    "competition": f"accept the competition's rules on kaggle.com with this account "
                   f"(https://www.kaggle.com/competitions/{COMPETITION}/rules)",
    "dataset": "the dataset does not exist for this account or is not ready yet (push uploads it; wait for it)",
    "kernel": "those kernels have no version this account can read (push them first)",
}


def refused_sources(text: str, kernel_id: str, resume: str) -> None:
    """Raise when the client printed "not valid ... sources" lines: it still exits 0 and queues the
    kernel, which then runs without those inputs."""
    refused = _REFUSED.findall(text)
    if refused:
        raise KaggleError(
            f"pushing kernel {kernel_id}: Kaggle refused some of its sources and queued the kernel without them:\n"
            + "".join(f"  {kind} sources {names}: {_REFUSED_HELP[kind]}\n" for kind, names in refused)
            + f"Cancel the version already queued at https://www.kaggle.com/code/{kernel_id} (it would run "
              f"without those inputs), then resume with `{resume}`")


# ---------------------------------------------------------------- waiting

_BAD_END = ("error", "cancel_requested", "cancel_acknowledged")


def wait_for_kernel(run: Runner, ref: str, poll_s: float, sleep: Sleep = time.sleep, max_unknown: int = 10) -> None:
    """Poll until the kernel (version) is complete; raise with its log's tail if it ends otherwise."""
    last, unknown = "", 0
    while True:
        status, message = kernel_status(run, ref)
        if status != last:
            print(f"  {ref}: {status}", flush=True)
            last = status
        if status == "complete":
            return
        if status in _BAD_END:
            raise KaggleError(f"kernel {ref} ended with status {status}" + (f": {message}" if message else "")
                              + f"\n{log_report(run, ref)}\nfix, rebuild, and resume with "
                                "`python run_all.py kaggle push --from <its slug>`")
        unknown = unknown + 1 if status == "unknown" else 0
        if unknown >= max_unknown:
            raise KaggleError(f"`kaggle kernels status {ref}` failed {unknown} times in a row: {message}")
        sleep(poll_s)


def wait_for_dataset(run: Runner, ref: str, after_version: int, poll_s: float, sleep: Sleep = time.sleep,
                     max_polls: int = 720, clock: Clock = time.monotonic,
                     not_found_s: float = DATASET_NOT_FOUND_S) -> None:
    """Poll until the dataset has a version newer than ``after_version`` and it is ready; give up
    when it has not been found for ``not_found_s`` (after a create, Kaggle may take a while)."""
    missing_since: float | None = None
    for _ in range(max_polls):
        state = dataset_state(run, ref)
        if state is None:
            missing_since = clock() if missing_since is None else missing_since
            if clock() - missing_since >= not_found_s:
                raise KaggleError(f"dataset {ref} was still not found {not_found_s / 60:.0f} minutes after it was "
                                  f"created: see https://www.kaggle.com/datasets/{ref} (a private dataset over the "
                                  "storage quota can stay 'being created' for ever), then push again")
        else:
            missing_since = None
            status, version = state
            if status in ("failed", "deleted"):
                raise KaggleError(f"dataset {ref} version {version} {status} on Kaggle; push it again")
            if status == "ready" and version > after_version:
                print(f"  {ref}: version {version} ready", flush=True)
                return
        sleep(poll_s)
    raise KaggleError(f"dataset {ref} was not ready after {max_polls} polls")


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
            print(_show(["datasets", "status", ref, "--format", "json"]))
            print(_show(create))
            if ds["kind"] == "kernel_lib":
                print(_show(version))
            print(f"# wait until `kaggle datasets status {ref}` says ready")
            continue
        state = dataset_state(run, ref)
        if state is None:
            _checked(run, create, f"creating dataset {ref}")
            before = 0
        elif ds["kind"] == "kernel_lib":
            before = state[1]
            if state[0] != "ready":
                print(f"  {ref}: version {before} is {state[0]}; waiting for it before a new version", flush=True)
                wait_for_dataset(run, ref, before - 1, poll_s, sleep, clock=clock)
            _checked(run, version, f"new version of dataset {ref}")
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
        text = _checked(self.run, ["kernels", "push", "-p", str(kernel.dir)], f"pushing kernel {kernel.id}")
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
                print(_show(["quota", "--format", "json"]))
                print("# stop here, printing the command that resumes, if the GPU hours left cannot hold this kernel")
        print(_show(["kernels", "push", "-p", str(kernel.dir)]))
        if wait:
            print(f"# wait until `kaggle kernels status {kernel.id}` says complete")
            waited.add(kernel.id)
        if wait and kernel.chunk:
            print(_show(["kernels", "output", kernel.id, "-p", str(Path(build_dir) / "metrics" / kernel.dir.name),
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
            text = _checked(run, ["kernels", "push", "-p", str(kernel.dir)], f"pushing kernel {kernel.id}")
            refused_sources(text, kernel.id, resume_command(build_dir, kernel.dir.name))
        return []
    with tempfile.TemporaryDirectory(prefix="kaggle-push-") as work:
        state = _Push(build_dir, manifest, kernels, run, poll_s, sleep, Path(work))
        state.plan_quota(todo, yes)
        for kernel in todo:
            state.kernel(kernel, first)
    return state.done


def status(build_dir: Path, run: Runner = run_kaggle) -> list[tuple[str, str]]:
    """(kernel id, status) for every kernel of the built chain, printed as a table."""
    _, kernels = read_build(build_dir)
    rows = []
    for k in kernels:
        state, message = kernel_status(run, k.id)
        rows.append((k.id, state))
        print(f"{k.id:<55} {state}" + (f"  ({message})" if message and state != "unknown" else ""), flush=True)
    return rows


def download(build_dir: Path, out: Path, stage: str = "merge", run: Runner = run_kaggle) -> Path:
    """Pull the output of ``stage``'s last kernel into ``out`` (the merge's: submission.csv, and
    index.html with every stage's summary and figures); returns its submission.csv."""
    _, kernels = read_build(build_dir)
    mine = [k for k in kernels if k.stage == stage]
    if not mine:
        raise ValueError(f"stage {stage!r} has no kernel in {build_dir}; stages are "
                         f"{', '.join(dict.fromkeys(k.stage for k in kernels))}")
    Path(out).mkdir(parents=True, exist_ok=True)
    _checked(run, ["kernels", "output", mine[-1].id, "-p", str(out), "--force"], f"downloading {mine[-1].id}")
    submission = Path(out) / "submission.csv"
    if not submission.is_file():
        raise KaggleError(f"{mine[-1].id}'s output holds no submission.csv (see {out}); is the kernel complete?")
    index = Path(out) / "index.html"  # the merge kernel's report of the whole chain (index_page.py)
    if index.is_file():
        print(f"\nthe whole chain's index page (every stage's summary, figures, notebooks): {index}")
    print(f"\n{submission}\nsubmit it with:\n  " + _show(
        ["competitions", "submit", COMPETITION, "-f", str(submission), "-m", f"RxRx1 suite: {mine[-1].id}"]))
    return submission
