"""How every stage writes its files: atomically, and JSON with one NaN rule.

Every writer in kernel_lib goes through `atomic_write`: the content goes to a temporary file in the
target's folder, is flushed and fsynced, then ``os.replace``d onto the target (the previous copy
optionally kept), and the folder is fsynced, so a killed process leaves either the old file or the
new one, never half of one, and no temporary file behind.

JSON (metrics.json, config.json, classes.json, Kaggle metadata) has one rule for non-finite
numbers: NaN and +-inf are written as ``null`` (strict JSON; a missing metric reads as None).
This module also owns reading and updating a stage folder's ``metrics.json``.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

METRICS_FILE = "metrics.json"


def _fsync_dir(folder: Path) -> None:
    # The rename itself must reach the disk too; not every platform can open a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike, previous: str | os.PathLike | None = None,
                 mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path``.

    With ``previous``, an existing ``path`` is first moved there, so it is never overwritten in
    place. On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_write(path, mode="w") as f:
        f.write(text)
    return Path(path)


def json_safe(value: Any) -> Any:
    """Plain JSON data: non-finite floats become None, tuples lists, numpy scalars Python numbers."""
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()  # numpy scalars and 0-d arrays
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def write_json(path: str | os.PathLike, data: Any, indent: int = 1) -> Path:
    """JSON written atomically, NaN/inf as null (``allow_nan=False`` proves none slipped through)."""
    return write_text(path, json.dumps(json_safe(data), indent=indent, allow_nan=False) + "\n")


def read_metrics(folder: str | os.PathLike) -> dict:
    """A stage folder's metrics.json, or {} when there is none (or it is unreadable)."""
    path = Path(folder) / METRICS_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (ValueError, OSError):
        return {}


def update_metrics(folder: str | os.PathLike, **values: Any) -> dict:
    """Merge ``values`` into a stage folder's metrics.json (written atomically); returns the result."""
    metrics = {**read_metrics(folder), **json_safe(values)}
    write_json(Path(folder) / METRICS_FILE, metrics)
    return metrics
