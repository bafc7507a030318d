"""The offline rehearsal: a built chain run on this machine in Kaggle-like sandboxes.

Owns the sandbox: each kernel gets a fresh root laid out like Kaggle's (input/ with the competition
data, its datasets and its kernel sources' outputs mounted by slug in either mount layout, checked
unchanged afterwards; working/ as the cwd and the output), no network, the repository not on
PYTHONPATH. Runs the notebooks of a build written by kaggle_build.py with papermill.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import papermill
from papermill.exceptions import PapermillExecutionError

from .kaggle_build import COMPETITION, BuiltKernel, KaggleError, _link_or_copy, read_build, resolve_source
from .outputs import read_metrics
from .registry import get_stage

LAYOUTS = ("modern", "historic")


def mount_point(input_dir: Path, kind: str, ref: str, layout: str) -> Path:
    """Where Kaggle mounts a source. kind: competitions (ref: the competition), datasets or
    notebooks (ref: owner/slug). historic: /kaggle/input/<slug>/ for all of them."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {LAYOUTS}")
    return input_dir / ref.rsplit("/", 1)[-1] if layout == "historic" else input_dir / kind / ref


def _mount(src: Path, dst: Path) -> None:
    # Hard links: real folders (pathlib's rglob does not enter symlinked ones), no copying.
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst, copy_function=_link_or_copy,
                    ignore=shutil.ignore_patterns("dataset-metadata.json", "kernel-metadata.json"))


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


@contextlib.contextmanager
def _sandbox_env(root: Path) -> Iterator[None]:
    """The kernel's environment, restored afterwards: KAGGLE_ROOT, no repository on PYTHONPATH,
    no network (a dead proxy), no bytecode written beside the read-only inputs."""
    dead = "http://127.0.0.1:9"
    values = {"KAGGLE_ROOT": str(root), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": None, "no_proxy": None,
              "NO_PROXY": None, **{k: dead for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}}
    saved = {k: os.environ.get(k) for k in values}

    def apply(env: Mapping[str, str | None]) -> None:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    apply(values)
    try:
        yield
    finally:
        apply(saved)


def _needed(kernels: Sequence[BuiltKernel], stages: Sequence[str] | None) -> list[BuiltKernel]:
    """The kernels of ``stages`` and every kernel they read from, in chain order (all: None)."""
    if not stages:
        return list(kernels)
    for name in stages:
        get_stage(name)
    wanted = {k.id for k in kernels if k.stage in stages}
    for k in reversed(kernels):  # sources come before their readers
        if k.id in wanted:
            wanted.update(k.meta["kernel_sources"])
    return [k for k in kernels if k.id in wanted]


def rehearse(build_dir: Path, data_dir: Path, work: Path, layout: str = "modern", stages: Sequence[str] | None = None,
             log_output: bool = False) -> dict[str, Path]:
    """Run the built kernels in chain order (those of ``stages`` and their sources; all by default),
    each in a fresh Kaggle-like root under ``work``: input/ holds the competition data, its
    datasets and its kernel sources' outputs (checked unchanged afterwards), working/ is the cwd
    and becomes the kernel's output. As `push` does, a stage's chunks stop at the one whose
    metrics.json says finished, and its readers mount that chunk. Returns {kernel id: its output
    folder}."""
    manifest, kernels = read_build(build_dir)
    by_id = {k.id: k for k in kernels}
    finished: dict[str, str] = {}  # stage -> the chunk kernel that finished its training
    outputs: dict[str, Path] = {}
    for kernel in _needed(kernels, stages):
        if kernel.chunk and kernel.stage in finished:
            print(f"[rehearse] {kernel.id}: skipped, {kernel.stage} finished in {finished[kernel.stage]}", flush=True)
            continue
        slug = kernel.id.split("/", 1)[1]
        root = Path(work) / slug / "kaggle"
        if root.exists():
            shutil.rmtree(root)
        input_dir = root / "input"
        _mount(Path(data_dir), mount_point(input_dir, "competitions", COMPETITION, layout))
        for ref in kernel.meta["dataset_sources"]:
            _mount(Path(build_dir) / ref.split("/")[1], mount_point(input_dir, "datasets", ref, layout))
        for ref in (resolve_source(r, by_id, finished) for r in kernel.meta["kernel_sources"]):
            if ref not in outputs:
                raise ValueError(f"{kernel.id} reads {ref}, which has not run before it")
            _mount(outputs[ref], mount_point(input_dir, "notebooks", ref, layout))
        working = root / "working"
        working.mkdir()
        before = _snapshot(input_dir)
        executed = Path(work) / slug / kernel.meta["code_file"]
        print(f"[rehearse] {kernel.id}", flush=True)
        with _sandbox_env(root):
            try:
                papermill.execute_notebook(str(kernel.dir / kernel.meta["code_file"]), str(executed),
                                           kernel_name="python3", cwd=str(working), log_output=log_output,
                                           progress_bar=False)
            except PapermillExecutionError as e:
                raise KaggleError(f"{kernel.id} failed in {executed} (cell {e.exec_count}): {e.ename}: {e.evalue}") from None
        if _snapshot(input_dir) != before:
            raise KaggleError(f"{kernel.id} wrote under {input_dir}, which is read-only on Kaggle")
        outputs[kernel.id] = working
        if kernel.chunk and read_metrics(working).get("finished"):
            finished[kernel.stage] = kernel.id
    return outputs


def folder_size(folder: Path) -> int:
    """Bytes of the files under ``folder`` (a kernel's output counts against Kaggle's 20 GB)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())

