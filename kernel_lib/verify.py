"""Verify a Kaggle-layout RxRx1 folder the way the chain will read it, before GPU hours are spent.

First the CSVs (`metadata.read_wells`: columns, id_codes, duplicates, labels) and their consistency
(sample_submission.csv against test.csv), then every site's six PNGs, in parallel on every core,
listing every problem instead of stopping at the first:

- ``quick``: the file exists, starts with the PNG signature and its IHDR header gives a size, 8
  bits, grayscale (26 bytes read per file);
- ``full``: the file decodes (OpenCV, as the loader does) to an 8-bit single-channel image.

In both modes a file whose size differs from the dataset's usual size (the most common one) is
listed as odd-sized: the loader requires the six channels of a site to agree.
"""
from __future__ import annotations

import multiprocessing
import os
import struct
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm  # plain text bars: readable in executed notebooks and papermill logs

from . import metadata
from . import rxrx_io as rio

MODES = ("quick", "full")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_BATCH = 2000  # files per task: large enough to amortise the process hop, small for a smooth bar
# Starting a process costs ~1 s (spawn, imports): a chain stage's 14,136 synthetic PNGs took 0.55 s
# in one process and 1.39 s in two. With workers=0 each process gets at least this many files.
_FILES_PER_PROCESS = {"quick": 25_000, "full": 500}


@dataclass
class VerifyReport:
    """What `verify_dataset` found. Paths are relative to the data folder."""

    data_dir: Path
    mode: str
    files: int = 0
    seconds: float = 0.0
    workers: int = 1
    csv_problems: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)   # (path, why)
    odd_sized: list[tuple[str, tuple[int, int]]] = field(default_factory=list)  # (path, (height, width))
    usual_size: tuple[int, int] | None = None

    @property
    def ok(self) -> bool:
        return not (self.csv_problems or self.missing or self.unreadable or self.odd_sized)

    @property
    def files_per_second_per_core(self) -> float:
        return self.files / self.seconds / self.workers if self.seconds else float("nan")

    def problems(self) -> pd.DataFrame:
        """One row per problem: path, problem, detail."""
        rows = [("(csv)", "csv", p) for p in self.csv_problems]
        rows += [(p, "missing", "") for p in self.missing]
        rows += [(p, "unreadable", why) for p, why in self.unreadable]
        rows += [(p, "odd_sized", f"{h}x{w}, usual {self.usual_size[0]}x{self.usual_size[1]}")
                 for p, (h, w) in self.odd_sized]
        return pd.DataFrame(rows, columns=["path", "problem", "detail"])

    def summary(self) -> str:
        size = f"{self.usual_size[0]}x{self.usual_size[1]}" if self.usual_size else "-"
        head = (f"{self.data_dir}: {self.files:,} PNGs checked ({self.mode}) in {self.seconds:.1f} s on "
                f"{self.workers} process(es), {self.files_per_second_per_core:,.0f} files/s per core; usual size {size}")
        if self.ok:
            return head + "\nno problems found"
        lines = [head, f"{len(self.csv_problems)} CSV problem(s), {len(self.missing)} missing, "
                       f"{len(self.unreadable)} unreadable, {len(self.odd_sized)} odd-sized file(s):"]
        table = self.problems()
        lines += [f"  {r.problem:10s} {r.path}  {r.detail}" for r in table.head(50).itertuples()]
        if len(table) > 50:
            lines.append(f"  ... and {len(table) - 50} more")
        return "\n".join(lines)


def png_header(head: bytes) -> tuple[int, int, int, int] | None:
    """(height, width, bit depth, colour type) from a PNG's first 26 bytes (signature, IHDR), or
    None if it is not a PNG. RxRx1's channel images are 8-bit grayscale: depth 8, colour type 0."""
    if len(head) < 26 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return int(height), int(width), head[24], head[25]


def check_file(path: str, mode: str) -> tuple[str, object]:
    """("ok", (h, w)) | ("missing", "") | ("unreadable", why) for one PNG."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except FileNotFoundError:
        return "missing", ""
    except OSError as err:
        return "unreadable", str(err)
    header = png_header(head)
    if header is None:
        return "unreadable", "not a PNG (bad signature or header)" if head else "empty file"
    height, width, depth, colour = header
    if (depth, colour) != (8, 0):
        return "unreadable", f"PNG of bit depth {depth}, colour type {colour}; expected 8-bit grayscale"
    size = (height, width)
    if mode == "full":
        img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if img is None:
            return "unreadable", "does not decode (truncated or corrupt)"
        if img.ndim != 2 or img.dtype != np.uint8:
            return "unreadable", f"decodes to {img.dtype} with shape {img.shape}, expected 8-bit single channel"
        size = img.shape
    return "ok", size


def _check_batch(paths: Sequence[str], mode: str) -> list[tuple[str, object]]:
    return [check_file(p, mode) for p in paths]


def site_files(data_dir: str | os.PathLike, wells: pd.DataFrame, sites: Sequence[int] = (1, 2),
               channels: Sequence[int] = rio.DEFAULT_CHANNELS) -> list[str]:
    """Every PNG the chain reads for ``wells`` (one row per well, metadata.read_wells)."""
    base = str(data_dir)
    return [rio.image_path(d, e, int(p), w, s, c, base)
            for d, e, p, w in wells[["dataset", "experiment", "plate", "well"]].itertuples(index=False)
            for s in sites for c in channels]


def site_rows_files(data_dir: str | os.PathLike, sites: pd.DataFrame,
                    channels: Sequence[int] = rio.DEFAULT_CHANNELS) -> list[str]:
    """Every PNG of ``sites`` (one row per site, metadata.expand_sites)."""
    base = str(data_dir)
    return [rio.image_path(d, e, int(p), w, int(s), c, base)
            for d, e, p, w, s in sites[["dataset", "experiment", "plate", "well", "site"]].itertuples(index=False)
            for c in channels]


def _csv_problems(data_dir: Path, wells: pd.DataFrame) -> list[str]:
    problems = []
    sample = data_dir / "sample_submission.csv"
    if sample.is_file():
        ids = set(metadata.read_csv_checked(sample, ["id_code", "sirna"])["id_code"])
        test = set(wells.loc[(wells["dataset"] == "test") & (wells["well_type"] == metadata.TREATMENT), "id_code"])
        if ids != test:
            extra, lacking = sorted(ids - test), sorted(test - ids)
            problems.append(f"{sample}: {len(extra)} id_code(s) not in test.csv (e.g. {extra[:3]}), "
                            f"{len(lacking)} test id_code(s) missing (e.g. {lacking[:3]})")
    return problems


def verify_files(data_dir: str | os.PathLike, files: Sequence[str], mode: str = "quick", workers: int = 0,
                 progress: bool = True) -> VerifyReport:
    """Check ``files`` (absolute paths under ``data_dir``) in parallel; every problem is listed.
    ``workers=0``: one process per core, but no more than the files repay (`_FILES_PER_PROCESS`)."""
    if mode not in MODES:
        raise ValueError(f"verify mode must be one of {MODES}, got {mode!r}")
    data_dir = Path(data_dir)
    if not workers:
        workers = min(os.cpu_count() or 1, len(files) // _FILES_PER_PROCESS.get(mode, 500))
    workers = max(1, min(workers, -(-len(files) // _BATCH)))
    report = VerifyReport(data_dir, mode, files=len(files), workers=workers)
    t0 = time.perf_counter()
    batches = [files[i:i + _BATCH] for i in range(0, len(files), _BATCH)]
    bar = tqdm(total=len(files), desc=f"verify ({mode})", unit="file", disable=not progress, mininterval=2)
    results: list[tuple[str, object]] = []
    if workers > 1:
        # spawn, not fork: training kernels call this with torch's and the decoder's threads running
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for batch in pool.map(_check_batch, batches, [mode] * len(batches)):
                results += batch
                bar.update(len(batch))
    else:
        for batch in batches:
            results += _check_batch(batch, mode)
            bar.update(len(batch))
    bar.close()
    report.seconds = time.perf_counter() - t0
    sizes = Counter(r for status, r in results if status == "ok")
    report.usual_size = sizes.most_common(1)[0][0] if sizes else None
    for path, (status, detail) in zip(files, results):
        rel = os.path.relpath(path, data_dir)
        if status == "missing":
            report.missing.append(rel)
        elif status == "unreadable":
            report.unreadable.append((rel, str(detail)))
        elif detail != report.usual_size:
            report.odd_sized.append((rel, tuple(detail)))
    return report


def verify_dataset(data_dir: str | os.PathLike, mode: str = "quick", workers: int = 0, sites: Sequence[int] = (1, 2),
                   progress: bool = True) -> VerifyReport:
    """The CSVs (an error stops here: nothing else can be read), then every site's six PNGs."""
    data_dir = Path(data_dir)
    wells = metadata.read_wells(data_dir)
    report = verify_files(data_dir, site_files(data_dir, wells, sites), mode, workers, progress)
    report.csv_problems = _csv_problems(data_dir, wells)
    return report
