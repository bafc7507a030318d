"""An rxrx.io-compatible reader of the Kaggle layout (``from kernel_lib import rxrx_io as rio``).

Same names, signatures and results as recursionpharma/rxrx1-utils' ``rxrx/io.py`` (which needs
TensorFlow 1.13 and is not on PyPI), over a local Kaggle-layout root, so code written against
``rxrx.io`` runs by changing one import. Differences: ``base_path`` defaults to ``$RXRX_DATA`` (or
``.``) instead of a Google Cloud bucket, and every read error names the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import pandas as pd

from . import metadata

DEFAULT_BASE_PATH = os.environ.get("RXRX_DATA", ".")
DEFAULT_METADATA_BASE_PATH = DEFAULT_BASE_PATH
DEFAULT_IMAGES_BASE_PATH = DEFAULT_BASE_PATH
DEFAULT_CHANNELS = (1, 2, 3, 4, 5, 6)
# channel -> colour and display range of the official RGB rendering
RGB_MAP = {
    1: {"rgb": np.array([19, 0, 249]), "range": [0, 51]},
    2: {"rgb": np.array([42, 255, 31]), "range": [0, 107]},
    3: {"rgb": np.array([255, 0, 25]), "range": [0, 64]},
    4: {"rgb": np.array([45, 255, 252]), "range": [0, 191]},
    5: {"rgb": np.array([250, 0, 253]), "range": [0, 89]},
    6: {"rgb": np.array([254, 255, 40]), "range": [0, 191]},
}
CHANNEL_NAMES = {1: "nucleus (Hoechst)", 2: "endoplasmic reticulum", 3: "actin", 4: "nucleoli",
                 5: "mitochondria", 6: "Golgi"}


def image_path(dataset: str, experiment: str, plate: int, address: str, site: int, channel: int,
               base_path: str = DEFAULT_IMAGES_BASE_PATH) -> str:
    """``{base_path}/{dataset}/{experiment}/Plate{plate}/{address}_s{site}_w{channel}.png``"""
    return os.path.join(base_path, dataset, experiment, f"Plate{plate}", f"{address}_s{site}_w{channel}.png")


def load_image(image_path: str) -> np.ndarray:
    """One channel PNG as a 2-D uint8 array (H, W). Missing, corrupt or non-8-bit files raise
    errors that name the file."""
    data = np.fromfile(image_path, dtype=np.uint8) if os.path.isfile(image_path) else None
    if data is None:
        raise FileNotFoundError(f"image not found: {image_path}")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise ValueError(f"corrupt or unreadable PNG: {image_path}")
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(f"{image_path}: expected a single-channel 8-bit image, got shape {img.shape} {img.dtype}")
    return img


def load_images_as_tensor(image_paths: Sequence[str], dtype=np.uint8) -> np.ndarray:
    """Stack channel images into (H, W, len(paths)); every channel must have the first one's size."""
    first = load_image(image_paths[0])
    out = np.empty((*first.shape, len(image_paths)), dtype=dtype)
    out[..., 0] = first
    for i, p in enumerate(image_paths[1:], start=1):
        img = load_image(p)
        if img.shape != first.shape:
            raise ValueError(f"{p}: image size {img.shape} differs from {image_paths[0]} {first.shape}")
        out[..., i] = img
    return out


def load_site(dataset: str, experiment: str, plate: int, well: str, site: int,
              channels: Sequence[int] = DEFAULT_CHANNELS, base_path: str = DEFAULT_IMAGES_BASE_PATH) -> np.ndarray:
    """One site as (H, W, len(channels)) uint8: (512, 512, 6) on the real data."""
    paths = [image_path(dataset, experiment, plate, well, site, c, base_path) for c in channels]
    return load_images_as_tensor(paths)


def convert_tensor_to_rgb(t: np.ndarray, channels: Sequence[int] = DEFAULT_CHANNELS, vmax: float = 255,
                          rgb_map: dict = RGB_MAP) -> np.ndarray:
    """(H, W, len(channels)) intensities -> (H, W, 3) int RGB in 0..255, as rxrx.io renders a site:
    each channel is scaled to its display range (capped at 1), coloured, truncated to int, and the
    coloured channels are summed and capped at 255."""
    h, w = t.shape[:2]
    im = np.zeros((h, w, 3), dtype=int)
    for i, ch in enumerate(channels):
        lo, hi = rgb_map[ch]["range"]
        x = (t[:, :, i] / vmax) / ((hi - lo) / 255) + lo / 255
        x = np.minimum(x, 1.0)
        im += (x[:, :, None] * rgb_map[ch]["rgb"]).astype(int)
    return np.minimum(im, 255)


def load_site_as_rgb(dataset: str, experiment: str, plate: int, well: str, site: int,
                     channels: Sequence[int] = DEFAULT_CHANNELS, base_path: str = DEFAULT_IMAGES_BASE_PATH,
                     rgb_map: dict = RGB_MAP) -> np.ndarray:
    x = load_site(dataset, experiment, plate, well, site, channels, base_path)
    return convert_tensor_to_rgb(x, channels, rgb_map=rgb_map)


def combine_metadata(base_path: str = DEFAULT_METADATA_BASE_PATH, include_controls: bool = True) -> pd.DataFrame:
    """train.csv + test.csv (+ *_controls.csv), one row per site (sites 1 and 2), indexed by
    id_code, columns cell_type, dataset, experiment, plate, site, sirna, well, well_type.
    As in rxrx.io, ``sirna`` is float (NaN for test treatments) for the numeric vocabulary;
    string vocabularies keep their labels (None where unknown)."""
    wells = metadata.read_wells(base_path, include_controls=include_controls)
    sites = metadata.expand_sites(wells, (1, 2))
    labels = sites["sirna"].replace("", None)
    known = labels.dropna()
    if metadata.vocabulary_kind(known.unique()) == "numeric":
        sites["sirna"] = labels.astype(float)
    else:
        sites["sirna"] = labels.astype(object)
    cols = ["cell_type", "dataset", "experiment", "plate", "site", "sirna", "well", "well_type"]
    return sites.sort_values(["id_code", "site"]).set_index("id_code")[cols]


def site_dir(base_path: str | os.PathLike, dataset: str, experiment: str, plate: int) -> Path:
    return Path(base_path) / dataset / experiment / f"Plate{plate}"
