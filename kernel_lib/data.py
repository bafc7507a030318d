"""Torch datasets over sites or wells of a Kaggle-layout RxRx1 folder.

Items stay uint8 until they reach the device: a dataset returns the raw image and the
normalisation statistics that go with it, and the training loop computes
``(image.float() - mean) / std`` where the arithmetic is cheap (on the GPU when there is one).

Normalisation modes (``normalization``): ``none`` (0..255 scaled to 0..1), ``image`` (each site's
own channel mean/std), ``plate`` and ``experiment`` (channel statistics of the site's plate or
experiment, from its control wells or from all its wells: ``norm_source``). Per-plate statistics
are the cheap batch correction that the 2019 winners found worth 10+ points of accuracy.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from tqdm import tqdm  # plain text bars: readable in executed notebooks and papermill logs

from . import rxrx_io as rio
from .outputs import atomic_write, write_json

NORMALIZATIONS = ("none", "image", "plate", "experiment")
NORM_SOURCES = ("controls", "all")
_STAT_SITES = 64          # sites read per plate/experiment for its statistics
_STAT_STRIDE = 2          # every 2nd pixel in each direction: a quarter of the pixels, same statistics


_POOL: tuple[int, ThreadPoolExecutor] | None = None
_THREADED_PIXELS = 128 * 128  # channels at least this large decode on the pool


def _decoder_pool() -> ThreadPoolExecutor:
    """Threads that decode a site's channel PNGs side by side (cv2 releases the GIL while it
    decodes): one per core, made anew in each process; a DataLoader worker decodes alone, since
    the workers already keep the cores busy."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        threads = 1 if torch.utils.data.get_worker_info() is not None else (os.cpu_count() or 1)
        _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=threads, thread_name_prefix="png"))
    return _POOL[1]


def read_site(data_dir: str | os.PathLike, dataset: str, experiment: str, plate: int, well: str, site: int,
              channels: Sequence[int] = rio.DEFAULT_CHANNELS, image_size: int = 0,
              out: np.ndarray | None = None) -> np.ndarray:
    """One site as (C, H, W) uint8, resized to ``image_size`` (0 = native) with area averaging.

    All channels must have the same size; errors name the file (missing, corrupt, wrong size).
    """
    paths = [rio.image_path(dataset, experiment, plate, well, site, c, str(data_dir)) for c in channels]
    head = rio.load_image(paths[0])
    # threads pay off for real 512-px channels (~3 ms each); for small images the hand-offs cost more
    rest = (_decoder_pool().map(rio.load_image, paths[1:]) if head.size >= _THREADED_PIXELS
            else map(rio.load_image, paths[1:]))
    first = None
    for i, (path, img) in enumerate(zip(paths, [head, *rest])):
        if first is None:
            first = img.shape
        elif img.shape != first:
            raise ValueError(f"{path}: image size {img.shape} differs from channel {channels[0]}'s {first}")
        if image_size and img.shape != (image_size, image_size):
            img = cv2.resize(img, (image_size, image_size), interpolation=cv2.INTER_AREA)
        if out is None:
            out = np.empty((len(paths), *img.shape), dtype=np.uint8)
        elif out.shape[1:] != img.shape:
            raise ValueError(f"{path}: image size {img.shape}, expected {out.shape[1:]} "
                             f"(set image_size to resize)")
        out[i] = img
    return out


@dataclass
class NormStats:
    """Channel statistics per plate or experiment: ``table`` indexed by experiment (and plate),
    columns mean_<c>, std_<c> in 0..255 units."""

    by: str
    source: str
    table: pd.DataFrame
    _rows: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # a dict read per item: a pandas .loc lookup costs milliseconds, more than reading a cached site
        means = self.table[[c for c in self.table.columns if c.startswith("mean_")]].to_numpy(np.float32)
        stds = self.table[[c for c in self.table.columns if c.startswith("std_")]].to_numpy(np.float32)
        self._rows = dict(zip(self.table.index, zip(means, stds)))

    def lookup(self, experiment: str, plate: int) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of the site's plate or experiment, each (C,) float32 (fresh copies)."""
        key = (experiment, int(plate)) if self.by == "plate" else experiment
        try:
            means, stds = self._rows[key]
        except KeyError:
            raise KeyError(f"no {self.by} normalisation statistics for {key!r}") from None
        return means.copy(), stds.copy()

    def save(self, path: str | os.PathLike) -> None:
        self.table.reset_index().to_csv(path, index=False)


def compute_norm_stats(data_dir: str | os.PathLike, sites: pd.DataFrame, by: str = "plate",
                       source: str = "controls", channels: Sequence[int] = rio.DEFAULT_CHANNELS,
                       image_size: int = 0, seed: int = 0, progress: bool = True) -> NormStats:
    """Channel mean/std of every plate (or experiment) in ``sites`` (one row per site, all datasets).

    ``source='controls'`` uses the control wells (the same siRNAs on every plate, so differences
    between plates are batch effects); plates without controls fall back to all their wells.
    At most ``_STAT_SITES`` sites per group are read, chosen by a seeded generator.
    """
    if by not in ("plate", "experiment"):
        raise ValueError(f"normalisation statistics are by 'plate' or 'experiment', got {by!r}")
    if source not in NORM_SOURCES:
        raise ValueError(f"parameter norm_source must be one of {NORM_SOURCES}, got {source!r}")
    keys = ["experiment", "plate"] if by == "plate" else ["experiment"]
    rng = np.random.default_rng(seed)
    rows = []
    groups = list(sites.groupby(keys, sort=True))
    for key, group in tqdm(groups, desc=f"{by} statistics", disable=not progress, mininterval=5):
        pool = group[group["well_type"] != "treatment"] if source == "controls" else group
        if pool.empty:
            pool = group
        if len(pool) > _STAT_SITES:
            pool = pool.iloc[np.sort(rng.choice(len(pool), size=_STAT_SITES, replace=False))]
        acc = np.zeros(len(channels)), np.zeros(len(channels)), 0
        s1, s2, n = acc
        for r in pool.itertuples():
            x = read_site(data_dir, r.dataset, r.experiment, r.plate, r.well, r.site, channels, image_size)
            x = x[:, ::_STAT_STRIDE, ::_STAT_STRIDE].reshape(len(channels), -1).astype(np.float64)
            s1 += x.sum(1)
            s2 += (x ** 2).sum(1)
            n += x.shape[1]
        mean = s1 / n
        std = np.sqrt(np.maximum(s2 / n - mean ** 2, 1.0))
        key = key if isinstance(key, tuple) else (key,)
        rows.append((*key, *mean, *std))
    cols = keys + [f"mean_{c}" for c in channels] + [f"std_{c}" for c in channels]
    table = pd.DataFrame(rows, columns=cols).set_index(keys)
    return NormStats(by=by, source=source, table=table)


def load_norm_stats(path: str | os.PathLike, by: str, source: str) -> NormStats:
    keys = ["experiment", "plate"] if by == "plate" else ["experiment"]
    table = pd.read_csv(path, dtype={"experiment": str})
    missing = [k for k in keys if k not in table.columns]
    if missing:
        raise ValueError(f"{path}: normalisation statistics lack columns {missing}")
    return NormStats(by=by, source=source, table=table.set_index(keys))


class PackedCache:
    """A packed uint8 cache of decoded sites, (N, C, H, W) in one memory-mapped file, for
    repeated epochs without PNG decoding. Its key covers the data folder, the ids, the size and
    the channels, so a stale cache is never read for other data."""

    def __init__(self, path: Path, shape: tuple[int, ...]):
        self.path = path
        self.array = np.memmap(path, dtype=np.uint8, mode="r", shape=shape)

    @staticmethod
    def key(data_dir: str | os.PathLike, frame: pd.DataFrame, channels: Sequence[int], image_size: int,
            well_sites: Sequence[int] = ()) -> str:
        """``well_sites``: the sites stacked per item of a well dataset; empty for a site dataset."""
        h = hashlib.sha256()
        h.update(str(Path(data_dir).resolve()).encode())
        h.update("|".join(frame["id_code"] + "_s" + frame["site"].astype(str)).encode())
        h.update(f"{tuple(channels)}:{image_size}".encode())
        if well_sites:   # a well cache over site-1 rows must not be mistaken for a site cache
            h.update(f":wells{tuple(well_sites)}".encode())
        return h.hexdigest()[:16]

    @classmethod
    def build(cls, cache_dir: str | os.PathLike, dataset: "SiteDataset", progress: bool = True) -> "PackedCache":
        """Decode every site of ``dataset`` once into ``cache_dir/<key>.u8`` (reused when present)."""
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        key = cls.key(dataset.data_dir, dataset.frame, dataset.channels, dataset.image_size,
                      dataset.sites if dataset.unit == "well" else ())
        data_path, meta_path = cache_dir / f"{key}.u8", cache_dir / f"{key}.json"
        if meta_path.is_file() and data_path.is_file():
            shape = tuple(json.loads(meta_path.read_text())["shape"])
            return cls(data_path, shape)
        first = dataset.read(0)
        shape = (len(dataset), *first.shape)
        # a half-packed cache can be gigabytes: atomic_write never leaves one behind
        with atomic_write(data_path, mode="w+b") as f:
            arr = np.memmap(f, dtype=np.uint8, mode="w+", shape=shape)
            try:
                for i in tqdm(range(len(dataset)), desc="packing cache", disable=not progress, mininterval=5):
                    dataset.read(i, out=arr[i])
                arr.flush()
            finally:
                del arr
        write_json(meta_path, {"shape": list(shape), "data_dir": str(dataset.data_dir)})
        return cls(data_path, shape)


class SiteDataset(Dataset):
    """Sites (``unit='site'``: one item per site) or wells (``unit='well'``: one item per well,
    its sites stacked) of a Kaggle-layout folder.

    ``frame``: one row per item with id_code, experiment, plate, well, site, cell_type, sirna,
    dataset, well_type (for wells, ``site`` is the first site). Item ``i`` is a dict:
    ``image`` uint8 (C, H, W) or, for wells, (S, C, H, W); ``mean``, ``std`` float32 (C,);
    ``label`` int64 (index into ``classes``, -1 when unknown); ``cell_type`` int64 (index into
    ``cell_types``); ``index`` int64.
    """

    def __init__(self, data_dir: str | os.PathLike, frame: pd.DataFrame, classes: Sequence[str],
                 cell_types: Sequence[str], normalization: str = "plate", stats: NormStats | None = None,
                 image_size: int = 0, channels: Sequence[int] = rio.DEFAULT_CHANNELS, unit: str = "site",
                 sites: Sequence[int] = (1, 2), split_name: str = ""):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"parameter normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if normalization in ("plate", "experiment") and (stats is None or stats.by != normalization):
            raise ValueError(f"normalization={normalization!r} needs {normalization} statistics")
        if unit not in ("site", "well"):
            raise ValueError(f"unit must be 'site' or 'well', got {unit!r}")
        self.data_dir = Path(data_dir)
        self.frame = frame.reset_index(drop=True)
        self.classes = list(classes)
        self.cell_types = list(cell_types)
        self.normalization, self.stats = normalization, stats
        self.image_size, self.channels, self.unit = image_size, tuple(channels), unit
        self.sites = tuple(sites)
        self.split_name = split_name
        self.cache: PackedCache | None = None
        index = {c: i for i, c in enumerate(self.classes)}
        labels = self.frame["sirna"].fillna("")
        unknown = labels[(labels != "") & ~labels.isin(index)]
        if len(unknown):
            # a wrong vocabulary (e.g. string labels against a numeric class list) must not become -1
            i = unknown.index[0]
            raise ValueError(f"unknown label {unknown.iloc[0]!r} at id_code {self.frame.at[i, 'id_code']!r}: "
                             f"not in the class list ({len(self.classes)} classes, e.g. {self.classes[:3]})")
        self._labels = np.array([index.get(x, -1) for x in labels], dtype=np.int64)
        ct_index = {c: i for i, c in enumerate(self.cell_types)}
        self._cell_types = np.array([ct_index[c] for c in self.frame["cell_type"]], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.frame)

    def labels(self) -> np.ndarray:
        """(N,) int64 class indices, -1 where unknown."""
        return self._labels

    def read(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """Decode item ``i``: (C, H, W) uint8 for a site, (S, C, H, W) for a well."""
        r = self.frame.iloc[i]
        if self.unit == "site":
            return read_site(self.data_dir, r["dataset"], r["experiment"], r["plate"], r["well"], int(r["site"]),
                             self.channels, self.image_size, out)
        # every site decodes into the buffer shaped by the first one, so a site of another size
        # is an error naming its file, and a cache build writes straight into its slot
        first = read_site(self.data_dir, r["dataset"], r["experiment"], r["plate"], r["well"], self.sites[0],
                          self.channels, self.image_size, None if out is None else out[0])
        if out is None:
            out = np.empty((len(self.sites), *first.shape), dtype=np.uint8)
            out[0] = first
        for j, s in enumerate(self.sites[1:], start=1):
            read_site(self.data_dir, r["dataset"], r["experiment"], r["plate"], r["well"], s,
                      self.channels, self.image_size, out[j])
        return out

    def image(self, i: int) -> np.ndarray:
        if self.cache is not None:
            return np.array(self.cache.array[i])  # a writable copy: the memmap is read-only
        return self.read(i)

    def norm(self, i: int, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std), each (C,) float32, in 0..255 units."""
        c = len(self.channels)
        if self.normalization == "none":
            return np.zeros(c, np.float32), np.full(c, 255.0, np.float32)
        if self.normalization == "image":
            x = image.reshape(-1, c, image.shape[-2] * image.shape[-1]) if image.ndim == 4 else image.reshape(1, c, -1)
            x = x.transpose(1, 0, 2).reshape(c, -1).astype(np.float32)
            return x.mean(1), np.maximum(x.std(1), 1.0)
        r = self.frame.iloc[i]
        return self.stats.lookup(r["experiment"], r["plate"])

    def __getitem__(self, i: int) -> dict:
        image = self.image(i)
        mean, std = self.norm(i, image)
        return {
            "image": torch.from_numpy(image),
            "mean": torch.from_numpy(mean),
            "std": torch.from_numpy(std),
            "label": torch.tensor(self._labels[i]),
            "cell_type": torch.tensor(self._cell_types[i]),
            "index": torch.tensor(i, dtype=torch.int64),
        }

    def use_cache(self, cache_dir: str | os.PathLike, progress: bool = True) -> "SiteDataset":
        """Read sites from a packed uint8 cache (built once); an empty dataset (a final fit's
        validation split) has nothing to cache."""
        if len(self):
            self.cache = PackedCache.build(cache_dir, self, progress=progress)
        return self


def normalize_batch(image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) or (B, S, C, H, W) + (B, C) statistics -> float32, on image's device."""
    shape = (mean.shape[0],) + (1,) * (image.ndim - 4) + (mean.shape[1], 1, 1)
    x = image.to(torch.float32, copy=True)  # a new tensor, so the in-place ops below never touch ``image``
    return x.sub_(mean.view(shape)).div_(std.view(shape))
