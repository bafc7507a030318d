"""The kaggle CLI side of the chain: push, status, download, and waiting on Kaggle.

Owns running the ``kaggle`` executable (never importing the kaggle package: importing it
authenticates), reading what it prints (kernel and dataset status), waiting for kernels and
datasets, uploading the datasets, and `push`/`status`/`download` of a build written by
kaggle_build.py.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

from .kaggle_build import COMPETITION, BuiltKernel, KaggleError, read_build

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess]


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
    bad = re.search(r"(push error|creation error|not valid kernel sources|not valid dataset sources)", text)
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


_BAD_END = ("error", "cancel_requested", "cancel_acknowledged")


def wait_for_kernel(run: Runner, ref: str, poll_s: float, sleep: Callable[[float], None] = time.sleep,
                    max_unknown: int = 10) -> None:
    """Poll until the kernel (version) is complete; raise if it ends otherwise."""
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
                              + "; see its log on kaggle.com, fix, rebuild, and resume with "
                                "`python run_all.py kaggle push --from <its slug>`")
        unknown = unknown + 1 if status == "unknown" else 0
        if unknown >= max_unknown:
            raise KaggleError(f"`kaggle kernels status {ref}` failed {unknown} times in a row: {message}")
        sleep(poll_s)


def wait_for_dataset(run: Runner, ref: str, after_version: int, poll_s: float,
                     sleep: Callable[[float], None] = time.sleep, max_polls: int = 720) -> None:
    """Poll until the dataset has a version newer than ``after_version`` and it is ready."""
    for _ in range(max_polls):
        state = dataset_state(run, ref)
        if state is not None:
            status, version = state
            if status in ("failed", "deleted"):
                raise KaggleError(f"dataset {ref} version {version} {status} on Kaggle; push it again")
            if status == "ready" and version > after_version:
                print(f"  {ref}: version {version} ready", flush=True)
                return
        sleep(poll_s)
    raise KaggleError(f"dataset {ref} was not ready after {max_polls} polls")


def push_datasets(run: Runner, build_dir: Path, manifest: dict, poll_s: float, dry_run: bool,
                  sleep: Callable[[float], None] = time.sleep) -> None:
    """kernel_lib: created the first time, a new version every push; weights: created once."""
    for ds in manifest["datasets"]:
        folder = Path(build_dir) / ds["dir"]
        ref = f"{manifest['user']}/{ds['dir']}"
        create = ["datasets", "create", "-p", str(folder), "--dir-mode", "zip"]
        version = ["datasets", "version", "-p", str(folder), "-m", "kernel_lib from run_all.py kaggle push",
                   "--dir-mode", "zip"]
        if dry_run:
            print(f"# dataset {ref}: created if `kaggle datasets status` finds none"
                  + (", else a new version" if ds["kind"] == "kernel_lib" else ", else left as it is"))
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
            _checked(run, version, f"new version of dataset {ref}")
        else:
            print(f"dataset {ref} exists (version {state[1]}): not uploaded again", flush=True)
            continue
        wait_for_dataset(run, ref, before, poll_s, sleep)


def _start_index(kernels: Sequence[BuiltKernel], start: str | None) -> int:
    """Index of the kernel ``start`` names: its slug or id, or a stage (its first kernel)."""
    if not start:
        return 0
    for i, k in enumerate(kernels):
        if start in (k.id, k.dir.name, k.stage):
            return i
    raise ValueError(f"--from {start!r}: no such kernel or stage in the build; kernels are "
                     f"{', '.join(k.dir.name for k in kernels)}")


def push(build_dir: Path, *, dry_run: bool = False, wait: bool = True, start: str | None = None,
         datasets: bool = True, poll_s: float = 60.0, run: Runner = run_kaggle,
         sleep: Callable[[float], None] = time.sleep) -> None:
    """Datasets first, then each kernel in chain order. With ``wait``, a kernel is pushed only once
    the kernel pushed before it and all its kernel sources are complete: one kernel runs at a time
    (GPU quota), and a chunk must find the previous chunk's finished output."""
    manifest, kernels = read_build(build_dir)
    first = _start_index(kernels, start)
    if datasets:
        push_datasets(run, build_dir, manifest, poll_s, dry_run, sleep)
    complete: set[str] = set()  # kernel ids seen complete in this run
    pending: tuple[str, str] | None = None  # (id, id/version) pushed last, not yet seen complete

    def settle(kernel_id: str, ref: str) -> None:
        if dry_run:
            print(f"# wait until `kaggle kernels status {ref}` says complete")
        else:
            wait_for_kernel(run, ref, poll_s, sleep)
        complete.add(kernel_id)

    for kernel in kernels[first:]:
        if wait:
            if pending:
                settle(*pending)
            for source in kernel.meta["kernel_sources"]:
                if source not in complete:
                    settle(source, source)
        args = ["kernels", "push", "-p", str(kernel.dir)]
        if dry_run:
            print(_show(args))
            pending = (kernel.id, kernel.id)
            continue
        text = _checked(run, args, f"pushing kernel {kernel.id}")
        version = re.search(r"Kernel version (\d+) successfully", text)
        pending = (kernel.id, f"{kernel.id}/{version.group(1)}" if version else kernel.id)
    if wait and pending:
        settle(*pending)


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
    """Pull the output of ``stage``'s last kernel into ``out``; returns its submission.csv."""
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
    print(f"\n{submission}\nsubmit it with:\n  " + _show(
        ["competitions", "submit", COMPETITION, "-f", str(submission), "-m", f"RxRx1 suite: {mine[-1].id}"]))
    return submission

