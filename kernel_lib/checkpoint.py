"""Training checkpoints: atomic writes, safe loads, and finding the newest one to resume from.

A stage's output folder holds ``checkpoint.pt`` (the newest) and ``checkpoint.prev.pt`` (the one
before). `save_checkpoint` writes a temporary file in the same folder, fsyncs it, moves the
current ``checkpoint.pt`` to ``checkpoint.prev.pt`` and then the temporary file onto
``checkpoint.pt``, each with ``os.replace``: whenever the process dies, a complete checkpoint
exists under one of the two names (resume="auto" looks at both).

Everything loads with ``torch.load(path, weights_only=True)``: a checkpoint may come from another
kernel's output and is untrusted, so it holds only tensors, numbers, strings, None and
lists/tuples/dicts of them. RNG states are converted to that form by `capture_rng_state`.
"""
from __future__ import annotations

import os
import random
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .outputs import atomic_write
from .paths import find_files

FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"
MODEL_NAME = "model.pt"
REQUIRED_KEYS = ("format_version", "stage", "arch", "classes", "model", "optimizer", "scaler", "step", "epoch",
                 "batch_in_epoch", "best_metric", "epochs_without_improvement", "config", "rng", "history",
                 "finished")
_SCALARS = (int, float, bool, str, type(None))  # exact types: numpy's float64 subclasses float but won't load


def check_plain(value: Any, where: str = "state") -> None:
    """Raise TypeError naming the first entry that ``torch.load(weights_only=True)`` would refuse."""
    if type(value) in _SCALARS or isinstance(value, torch.Tensor):
        return
    if type(value) in (list, tuple):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
        return
    if type(value) in (dict, OrderedDict):
        for k, v in value.items():
            if type(k) not in (str, int):
                raise TypeError(f"checkpoint entry {where} has a key of type {type(k).__name__}; use str or int")
            check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"checkpoint entry {where} is a {type(value).__name__}; checkpoints hold only tensors, "
                    f"numbers, strings, None and lists/dicts of them (weights_only loading)")


def atomic_torch_save(obj: Any, path: str | os.PathLike, previous: str | os.PathLike | None = None) -> Path:
    """torch.save through `outputs.atomic_write` (fsynced temporary file, ``os.replace``).

    With ``previous``, an existing ``path`` is first moved there, so it is never overwritten in place.
    """
    with atomic_write(path, previous) as f:
        torch.save(obj, f)
    return Path(path)


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically, keeping the former ``path`` as ``checkpoint.prev.pt``.

    ``state`` needs `REQUIRED_KEYS` (``format_version`` is filled in) and only plain content.
    """
    path = Path(path)
    state = {**state, "format_version": FORMAT_VERSION}
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path}: checkpoint state lacks {missing}")
    check_plain(state)
    previous = path.with_name(PREVIOUS_NAME if path.name == CHECKPOINT_NAME else path.name + ".prev")
    return atomic_torch_save(state, path, previous)


def _open(path: Path, mmap: bool) -> dict:
    """Unpickle with weights_only; ValueError naming the file if it is not a checkpoint at all."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # truncated zip, bad pickle, refused global: all mean "not usable"
        raise ValueError(f"{path}: not a readable checkpoint (truncated or corrupt?): {err}") from err
    if not isinstance(state, dict) or "format_version" not in state or "stage" not in state:
        raise ValueError(f"{path}: not a training checkpoint (no format_version or stage)")
    return state


def _check_format(state: dict, path: Path) -> dict:
    version = state["format_version"]
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format version {version}; this code reads version {FORMAT_VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {missing}")
    return state


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint on the CPU with weights_only=True; every error names the file."""
    return _check_format(_open(Path(path), mmap=False), Path(path))


def check_compatible(state: dict, *, path: str | os.PathLike, arch: str, classes: Sequence[str]) -> None:
    """Refuse to resume a checkpoint made for another architecture or class list."""
    if state["arch"] != arch:
        raise ValueError(f"{path}: checkpoint is of arch {state['arch']!r}, this run trains {arch!r}; "
                         f"use resume='never' or another output_dir")
    saved = [str(c) for c in state["classes"]]
    if saved != [str(c) for c in classes]:
        differ = sorted(set(saved) ^ set(map(str, classes)))[:5]
        raise ValueError(f"{path}: checkpoint's class list ({len(saved)} classes) differs from this run's "
                         f"({len(classes)} classes; e.g. {differ or 'same labels, other order'}); "
                         f"use resume='never' or another output_dir")


def _candidates(dirs: Iterable[str | os.PathLike]) -> list[Path]:
    return sorted({p.resolve() for p in find_files(dirs, [CHECKPOINT_NAME, PREVIOUS_NAME])})


def find_latest_checkpoint(stage: str, dirs: Iterable[str | os.PathLike]) -> Path | None:
    """The newest readable checkpoint of ``stage`` anywhere under ``dirs`` (at any depth).

    Newest = highest global step, then latest mtime. Unreadable (truncated, corrupt) files are
    skipped with a warning and checkpoints of other stages ignored, but one of this stage in
    another format version is an error: its progress must not be dropped silently. Files are
    read memory-mapped, so scanning large checkpoints costs little.
    """
    best: tuple[int, float, Path] | None = None
    for path in _candidates(dirs):
        try:
            state = _open(path, mmap=True)
        except ValueError as err:
            warnings.warn(f"skipping checkpoint: {err}")
            continue
        if state["stage"] != stage:
            continue
        _check_format(state, path)
        key = (int(state["step"]), path.stat().st_mtime, path)
        del state
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else best[2]


# ---------------------------------------------------------------- random number generators

def capture_rng_state() -> dict:
    """Every RNG the loop touches, as plain data: torch CPU, each CUDA device, numpy, random."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": int(py_version), "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`. CUDA states are restored only if the device count matches."""
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(f"checkpoint has RNG states of {len(cuda)} CUDA devices, this machine has "
                          f"{torch.cuda.device_count()}: CUDA RNG not restored")
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
