"""Where things are: the competition data, upstream stages' outputs, the cache.

On Kaggle, inputs are mounted read-only under /kaggle/input: historically at
/kaggle/input/<slug>/, today also under /kaggle/input/notebooks/<user>/<slug>/,
/kaggle/input/datasets/<owner>/<slug>/ and /kaggle/input/competitions/<competition>/. Nothing
here assumes one of those layouts: everything is found by glob. ``KAGGLE_ROOT`` (default
``/kaggle``) moves the whole tree, which is how the tests emulate a Kaggle session.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

from .outputs import METRICS_FILE, read_metrics

def kaggle_root() -> Path:
    return Path(os.environ.get("KAGGLE_ROOT", "/kaggle"))


def kaggle_input() -> Path:
    return kaggle_root() / "input"


def find_files(roots: Iterable[str | os.PathLike], names: Iterable[str]) -> list[Path]:
    """Files called one of ``names`` anywhere under ``roots`` (roots included), sorted.

    The walk does not enter ``Plate<N>`` folders: they hold the competition's ~800k PNGs, which
    a mounted /kaggle/input would otherwise make every search list.
    """
    wanted, found = set(names), set()
    for root in roots:
        for folder, subdirs, files in os.walk(root):
            subdirs[:] = [d for d in subdirs if not (d.startswith("Plate") and d[5:].isdigit())]
            found.update(Path(folder) / f for f in files if f in wanted)
    return sorted(found)


def _is_data_dir(folder: Path) -> bool:
    return (folder / "train.csv").is_file() and (folder / "test.csv").is_file()


def find_data_dirs(roots: Iterable[str | os.PathLike]) -> list[Path]:
    """Folders under ``roots`` (at any depth) holding train.csv and test.csv, shortest path first."""
    found = {p.parent for p in find_files(roots, ["train.csv"])}
    return sorted((f for f in found if _is_data_dir(f)), key=lambda f: (len(f.parts), str(f)))


def resolve_data_dir(data_dir: str | os.PathLike = "") -> Path:
    """``data_dir`` if given (checked), else the competition data found under the Kaggle input."""
    if data_dir:
        folder = Path(data_dir)
        if not _is_data_dir(folder):
            raise FileNotFoundError(f"parameter data_dir={str(data_dir)!r}: no train.csv and test.csv there; "
                                    "expected a Kaggle-layout RxRx1 folder (CSVs + train/ and test/ PNG trees)")
        return folder
    found = find_data_dirs([kaggle_input()])
    if not found:
        raise FileNotFoundError(f"data_dir is empty and no folder under {kaggle_input()} holds train.csv and "
                                "test.csv: attach the competition 'recursion-cellular-image-classification' "
                                "or pass data_dir")
    return found[0]


def stage_dirs(stage: str, roots: Iterable[str | os.PathLike]) -> list[Path]:
    """Every folder under ``roots`` (at any depth, roots included) whose metrics.json names ``stage``."""
    return sorted({p.parent for p in find_files(roots, [METRICS_FILE]) if read_metrics(p.parent).get("stage") == stage})


def find_stage_dir(stage: str, roots: Iterable[str | os.PathLike]) -> Path:
    """The output folder of ``stage`` under ``roots``: a finished one first, then the most steps."""
    roots = list(roots)
    candidates = stage_dirs(stage, roots)
    if not candidates:
        raise FileNotFoundError(f"no output of stage {stage!r} (a metrics.json with \"stage\": \"{stage}\") "
                                f"under {[str(r) for r in roots]}; run that stage first or attach its kernel")

    def rank(folder: Path) -> tuple:
        m = read_metrics(folder)
        return (bool(m.get("finished")), int(m.get("steps_done", 0)), str(folder))

    return max(candidates, key=rank)


def cache_dir() -> Path:
    """Packed-cache folder: ``KERNEL_LIB_CACHE`` or a temp folder (never /kaggle/working: 20 GB)."""
    return Path(os.environ.get("KERNEL_LIB_CACHE", Path(tempfile.gettempdir()) / "kernel_lib_cache"))
