"""The kaggle CLI side of the chain: running the client, reading what it prints, waiting on Kaggle.

Owns running the ``kaggle`` executable (never importing the kaggle package: importing it
authenticates), reading what it prints (kernel and dataset status, the GPU quota, a chunk's
metrics.json, a failed kernel's log), waiting for kernels and datasets, and `status`/`download` of a
build written by kaggle_build.py. The adaptive push that uses them: kaggle_push.py.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .kaggle_build import COMPETITION, KaggleError, read_build
from .outputs import METRICS_FILE, read_metrics

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess]
Sleep = Callable[[float], None]
Clock = Callable[[], float]
METRICS_PATTERN = r"^metrics\.json$"  # `kernels output --file-pattern` is a regex searched in each file name
LOG_TAIL_LINES = 40
DATASET_NOT_FOUND_S = 30 * 60  # a dataset not found this long after its create has gone wrong


class QuotaStop(KaggleError):
    """The week's GPU quota cannot hold the next GPU kernel: the push stopped cleanly before it."""


def run_kaggle(args: Sequence[str]) -> subprocess.CompletedProcess:
    exe = shutil.which("kaggle")
    if exe is None:
        raise KaggleError("the kaggle CLI is not on PATH: pip install -r requirements.txt (kaggle 2.x), "
                          "then `kaggle auth login` or put your API token in ~/.kaggle")
    return subprocess.run([exe, *args], capture_output=True, text=True)


def show_command(args: Sequence[str]) -> str:
    """The ``kaggle ...`` command line as a user would type it (echoed before every call)."""
    return "kaggle " + " ".join(shlex.quote(str(a)) for a in args)


def run_checked(run: Runner, args: Sequence[str], what: str) -> str:
    """Run, echo, and fail on a non-zero exit or the error lines the CLI prints with exit status 0."""
    print(show_command(args), flush=True)
    proc = run(args)
    text = (proc.stdout or "") + (proc.stderr or "")
    if text.strip():
        print("  " + text.strip().replace("\n", "\n  "), flush=True)
    bad = re.search(r"(push error|creation error)", text)
    if proc.returncode != 0 or bad:
        raise KaggleError(f"{what} failed ({show_command(args)}): {text.strip() or f'exit status {proc.returncode}'}")
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
    raise KaggleError(f"`{show_command(['datasets', 'status', ref, '--format', 'json'])}` printed no JSON: {proc.stdout}")


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
    run_checked(run, ["kernels", "output", ref, "-p", str(folder), "--file-pattern", METRICS_PATTERN, "--force"],
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


def status(build_dir: Path, run: Runner = run_kaggle) -> list[tuple[str, str]]:
    """(kernel id, status) for every kernel of the built chain, printed as a table."""
    _, kernels = read_build(build_dir)
    rows = []
    for k in kernels:
        state, message = kernel_status(run, k.id)
        rows.append((k.id, state))
        print(f"{k.id:<55} {state}" + (f"  ({message})" if message and state != "unknown" else ""), flush=True)
    return rows


def download(build_dir: Path, out: Path, stage: str = "", run: Runner = run_kaggle) -> Path:
    """Pull the output of ``stage``'s last kernel into ``out`` (default: the build's final merge,
    merge_pseudo when pseudo-labelling: submission.csv, and index.html with every stage's summary
    and figures); returns its submission.csv."""
    manifest, kernels = read_build(build_dir)
    stage = stage or manifest.get("final_merge", "merge")
    mine = [k for k in kernels if k.stage == stage]
    if not mine:
        raise ValueError(f"stage {stage!r} has no kernel in {build_dir}; stages are "
                         f"{', '.join(dict.fromkeys(k.stage for k in kernels))}")
    Path(out).mkdir(parents=True, exist_ok=True)
    run_checked(run, ["kernels", "output", mine[-1].id, "-p", str(out), "--force"], f"downloading {mine[-1].id}")
    submission = Path(out) / "submission.csv"
    if not submission.is_file():
        raise KaggleError(f"{mine[-1].id}'s output holds no submission.csv (see {out}); is the kernel complete?")
    index = Path(out) / "index.html"  # the merge kernel's report of the whole chain (index_page.py)
    if index.is_file():
        print(f"\nthe whole chain's index page (every stage's summary, figures, notebooks): {index}")
    print(f"\n{submission}\nsubmit it with:\n  " + show_command(
        ["competitions", "submit", COMPETITION, "-f", str(submission), "-m", f"RxRx1 suite: {mine[-1].id}"]))
    return submission
