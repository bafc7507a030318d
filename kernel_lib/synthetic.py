"""The embedded synthetic dataset: RxRx1's structure, scaled down, in the exact Kaggle layout.

What it keeps of the real data (the competition's metadata): 4 cell types, several experiments per cell type with
whole experiments held out as test, 4 plates per experiment, 2 sites per well, 6 channel PNGs per
site, the negative control at B02 and positive controls at fixed positions on every plate,
treatment siRNAs in plate groups assigned to plates by a rotation per experiment, every treatment
siRNA once per experiment, wells randomised per experiment, some wells removed from some plates.

Images: cells are Gaussian blobs (a small nucleus in channel 1, a whole cell elsewhere). Each
siRNA has a phenotype: a relative change of each channel's intensity and of the cell size; cell
types differ in base intensities and sizes. Batch effects sit on top: per-experiment channel gain
and offset, a per-experiment illumination gradient and a per-plate gain. The siRNA signal is
smaller than the batch effects, so normalising per plate (from the control wells) measurably
matters, as on the real data.

Two layouts: ``embedded`` (the default, 20 experiments of 40 siRNAs, what ``python run_all.py``
runs) and ``real`` (`real_layout.py`: every real experiment, plate and well from the competition's
metadata, 1,108 siRNAs in their real plate groups, rendered small). Experiments render in
parallel, each from its own generator seeded by (seed, experiment), so the result does not depend
on the number of workers.

Writes ``root/data/`` (what a Kaggle user has: CSVs + PNG trees) and, beside it, ``root/test_truth.csv``
(the labels of the test wells, which a Kaggle user would not have).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm  # plain text bars: readable in executed notebooks and papermill logs

from .real_layout import REAL_METADATA_DIR, real_layout_wells

ROWS = "ABCDEFGHIJKLMNOP"  # a 384-well plate: 16 rows x 24 columns
INNER_WELLS = [f"{r}{c:02d}" for r in ROWS[1:15] for c in range(2, 24)]  # the 308 wells imaged in RxRx1
NEGATIVE_CONTROL_WELL = "B02"
POSITIVE_CONTROL_WELLS = ["C03", "O23", "G10", "J15", "E20", "M05", "H22", "D13", "L09", "N17",
                          "F06", "K19", "I03", "C21", "O11", "E08", "G17", "J06", "M13", "D22",
                          "L02", "N08", "F15", "K23", "H11", "B17", "I19", "C12", "O04", "E14"]


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes and strengths of a synthetic dataset; the defaults are ``python run_all.py``'s data."""

    cell_types: tuple[str, ...] = ("HEPG2", "HUVEC", "RPE", "U2OS")
    train_experiments: int = 4        # per cell type
    test_experiments: int = 1         # per cell type
    plates: int = 4                   # = number of plate groups, as in RxRx1
    sirnas_per_group: int = 10        # RxRx1: 277
    positive_controls: int = 4        # RxRx1: 30 (at most len(POSITIVE_CONTROL_WELLS))
    removed_well_rate: float = 0.25   # chance that a plate loses one treatment well
    sites: int = 2
    image_size: int = 64              # RxRx1: 512
    cells_per_site: int = 24
    vocabulary: str = "numeric"       # "numeric" (original release) or "string" (re-release)
    signal: float = 0.25              # relative channel change of a phenotype
    batch_effect: float = 1.0         # scales every batch effect
    seed: int = 0
    # layout="real": the competition's experiments, plates and wells (the sizes above that describe
    # the layout are then ignored; image_size, sites, cells_per_site, signal, batch_effect hold)
    layout: str = "embedded"          # "embedded" | "real"
    metadata_dir: str = ""            # real layout: the competition's CSVs; "": the copy in tests/fixtures
    experiments: tuple[str, ...] = ()  # real layout: keep these experiments (empty: all 51)
    plates_per_experiment: int = 0    # real layout: keep the first plates of each experiment (0: all;
    #                                   fewer than 4 plates: plate groups can no longer be inferred)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def real_layout_spec(image_size: int = 16, experiments: tuple[str, ...] = (), plates_per_experiment: int = 0,
                     vocabulary: str = "numeric", seed: int = 0) -> SyntheticSpec:
    """The real RxRx1 layout (51 experiments, 125,510 sites at full size), rendered at ``image_size``."""
    return SyntheticSpec(layout="real", image_size=image_size, experiments=tuple(experiments),
                         plates_per_experiment=plates_per_experiment, vocabulary=vocabulary, seed=seed)


@dataclass
class _Biology:
    """Per-label phenotypes and per-cell-type baselines."""

    channel_effect: dict[str, np.ndarray] = field(default_factory=dict)  # label -> (6,)
    size_effect: dict[str, float] = field(default_factory=dict)
    cell_base: dict[str, np.ndarray] = field(default_factory=dict)       # cell type -> (6,) intensity
    cell_radius: dict[str, float] = field(default_factory=dict)


def _labels(spec: SyntheticSpec, rng: np.random.Generator) -> tuple[list[str], list[str], str]:
    """(treatment labels, positive control labels, negative control label) in the spec's vocabulary."""
    n_treat = spec.plates * spec.sirnas_per_group
    n_pos = spec.positive_controls
    if spec.vocabulary == "numeric":
        labels = [str(i) for i in range(n_treat + n_pos + 1)]
        return labels[:n_treat], labels[n_treat:n_treat + n_pos], labels[-1]
    if spec.vocabulary == "string":
        numbers = rng.permutation(n_treat + n_pos) + 1   # the re-release numbers siRNAs differently
        labels = [f"sirna_{k}" for k in numbers]
        return labels[:n_treat], labels[n_treat:], "UNTREATED"
    raise ValueError(f"synthetic parameter vocabulary must be 'numeric' or 'string', got {spec.vocabulary!r}")


def _layout(spec: SyntheticSpec, rng: np.random.Generator) -> tuple[pd.DataFrame, list[list[str]]]:
    """All wells: experiment, plate, well, sirna, well_type, dataset; and the plate groups."""
    if spec.positive_controls > len(POSITIVE_CONTROL_WELLS):
        raise ValueError(f"synthetic parameter positive_controls must be <= {len(POSITIVE_CONTROL_WELLS)}")
    treatments, positives, negative = _labels(spec, rng)
    order = rng.permutation(len(treatments))
    groups = [[treatments[i] for i in order[g::spec.plates]] for g in range(spec.plates)]
    control_wells = [NEGATIVE_CONTROL_WELL, *POSITIVE_CONTROL_WELLS[:spec.positive_controls]]
    free = [w for w in INNER_WELLS if w not in control_wells]
    if spec.sirnas_per_group > len(free):
        raise ValueError(f"synthetic parameter sirnas_per_group must be <= {len(free)}")
    treatment_wells = sorted(rng.choice(free, size=spec.sirnas_per_group, replace=False).tolist())
    rows = []
    for ct in spec.cell_types:
        n_exp = spec.train_experiments + spec.test_experiments
        for e in range(n_exp):
            experiment = f"{ct}-{e + 1:02d}"
            dataset = "train" if e < spec.train_experiments else "test"
            rotation = int(rng.integers(spec.plates))
            for plate in range(1, spec.plates + 1):
                group = groups[(plate - 1 + rotation) % spec.plates]
                sirnas = rng.permutation(group).tolist()       # wells randomised per experiment
                wells = list(treatment_wells)
                if rng.random() < spec.removed_well_rate:      # a removed well, as on real plates
                    drop = int(rng.integers(len(wells)))
                    wells.pop(drop), sirnas.pop(drop)
                for well, sirna in zip(wells, sirnas):
                    rows.append((experiment, plate, well, sirna, "treatment", dataset))
                rows.append((experiment, plate, NEGATIVE_CONTROL_WELL, negative, "negative_control", dataset))
                for well, sirna in zip(POSITIVE_CONTROL_WELLS, positives):
                    rows.append((experiment, plate, well, sirna, "positive_control", dataset))
    wells = pd.DataFrame(rows, columns=["experiment", "plate", "well", "sirna", "well_type", "dataset"])
    wells.insert(0, "id_code", wells["experiment"] + "_" + wells["plate"].astype(str) + "_" + wells["well"])
    return wells, groups


# The datasets `python run_all.py --synthetic NAME` (and `kaggle rehearse --synthetic NAME`) run on.
REAL_LAYOUT_SUBSET = ("HEPG2-01", "HEPG2-02", "HEPG2-08", "HUVEC-01", "HUVEC-02", "HUVEC-17",
                      "RPE-01", "RPE-02", "RPE-08", "U2OS-01", "U2OS-02", "U2OS-04")  # 2 train + 1 test per cell type
DATASETS: dict[str, SyntheticSpec] = {
    "embedded": SyntheticSpec(),
    "real-layout": real_layout_spec(16),
    "real-layout-subset": real_layout_spec(16, experiments=REAL_LAYOUT_SUBSET),
}


def dataset_spec(name: str, image_size: int = 0) -> SyntheticSpec:
    """A named synthetic dataset (``DATASETS``), optionally rendered at another ``image_size``."""
    if name not in DATASETS:
        raise ValueError(f"unknown synthetic dataset {name!r}; choose one of {sorted(DATASETS)}")
    spec = DATASETS[name]
    if image_size:
        if not 4 <= image_size <= 512:
            raise ValueError(f"synthetic image size must be in [4, 512], got {image_size}")
        spec = dataclasses.replace(spec, image_size=image_size)
    return spec


def _biology(spec: SyntheticSpec, cell_types: list[str], labels: list[str], negative: str,
             rng: np.random.Generator) -> _Biology:
    bio = _Biology()
    for label in labels:
        strength = 0.0 if label == negative else spec.signal
        bio.channel_effect[label] = strength * np.clip(rng.normal(size=6), -2, 2)
        bio.size_effect[label] = strength * 0.5 * float(np.clip(rng.normal(), -1.5, 1.5))
    for ct in cell_types:
        bio.cell_base[ct] = rng.uniform(25, 70, size=6)
        bio.cell_radius[ct] = rng.uniform(0.035, 0.06)
    return bio


def _render_site(size: int, n_cells: int, intensity: np.ndarray, radius: float,
                 field_gain: np.ndarray, gain: np.ndarray, offset: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
    """One site, (6, size, size) uint8. intensity: (6,) mean cell intensity per channel; radius as a
    fraction of the image; field_gain: (size, size) illumination; gain, offset: (6,) batch effects.

    Cells are separable Gaussians, so the image is a matrix product: (H, n) @ diag(I_c) @ (n, W).
    """
    n = max(1, int(rng.poisson(n_cells)))
    grid = np.arange(size, dtype=np.float32)
    centres = rng.uniform(0, size, size=(n, 2)).astype(np.float32)
    r = (radius * size * rng.lognormal(0, 0.15, size=n)).astype(np.float32)
    cell_i = intensity[None, :] * rng.lognormal(0, 0.2, size=(n, 6))          # (n, 6)
    img = np.empty((6, size, size), dtype=np.float32)
    for c in range(6):
        rc = r * (0.45 if c == 0 else 1.0)                                     # channel 1: the nucleus
        gy = np.exp(-0.5 * ((grid[None, :] - centres[:, :1]) / rc[:, None]) ** 2)  # (n, H)
        gx = np.exp(-0.5 * ((grid[None, :] - centres[:, 1:]) / rc[:, None]) ** 2)  # (n, W)
        img[c] = (gy.T * cell_i[:, c]) @ gx
    img = img * field_gain[None] * gain[:, None, None] + offset[:, None, None]
    img += rng.normal(0, 2.0, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_png(path: Path, img: np.ndarray) -> None:
    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write {path}")


def _string_vocabulary(wells: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The re-release's vocabulary over numeric labels: ``sirna_<k>`` under a shuffled numbering,
    the negative control ``UNTREATED``."""
    negative = wells.loc[wells["well_type"] == "negative_control", "sirna"].iloc[0]
    labels = sorted(set(wells["sirna"]) - {negative}, key=int)
    numbers = np.random.default_rng([seed, 7]).permutation(len(labels)) + 1
    mapping = {label: f"sirna_{k}" for label, k in zip(labels, numbers)} | {negative: "UNTREATED"}
    return wells.assign(sirna=wells["sirna"].map(mapping))


def _wells(spec: SyntheticSpec, rng: np.random.Generator) -> tuple[pd.DataFrame, dict]:
    """Every well of the dataset and what spec.json records of its layout (groups, rotations)."""
    if spec.layout == "embedded":
        wells, groups = _layout(spec, rng)
        return wells, {"groups": groups}
    if spec.layout != "real":
        raise ValueError(f"synthetic parameter layout must be 'embedded' or 'real', got {spec.layout!r}")
    wells, groups, rotations = real_layout_wells(spec.metadata_dir or REAL_METADATA_DIR, spec.experiments,
                                                 spec.plates_per_experiment, spec.seed)
    if spec.vocabulary == "string":
        wells = _string_vocabulary(wells, spec.seed)
    elif spec.vocabulary != "numeric":
        raise ValueError(f"synthetic parameter vocabulary must be 'numeric' or 'string', got {spec.vocabulary!r}")
    return wells, {"groups": groups.groups, "train_rotations": groups.rotation, "test_rotations": rotations}


def _render_experiment(data: Path, spec: SyntheticSpec, bio: _Biology, index: int, experiment: str,
                       exp_wells: pd.DataFrame) -> int:
    """Write every site PNG of one experiment; returns the number of sites. Its own generator,
    seeded by (seed, experiment index), makes it independent of the worker that runs it."""
    rng = np.random.default_rng([spec.seed, 1, index])
    size, b = spec.image_size, spec.batch_effect
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    ct = experiment.split("-")[0]
    exp_gain = np.exp(rng.normal(0, 0.45 * b, size=6))
    offset = rng.uniform(0, 12 * b, size=6)
    tilt = rng.normal(0, 0.2 * b, size=2)
    field_gain = np.clip(1 + tilt[0] * yy + tilt[1] * xx - 0.15 * b * (yy ** 2 + xx ** 2), 0.3, None)
    sites = 0
    for plate, plate_wells in exp_wells.groupby("plate"):
        gain = exp_gain * np.exp(rng.normal(0, 0.12 * b, size=6))
        dataset = plate_wells["dataset"].iloc[0]
        folder = data / dataset / experiment / f"Plate{plate}"
        folder.mkdir(parents=True)
        for well, sirna in zip(plate_wells["well"], plate_wells["sirna"]):
            intensity = bio.cell_base[ct] * np.exp(bio.channel_effect[sirna])
            radius = bio.cell_radius[ct] * np.exp(bio.size_effect[sirna])
            for site in range(1, spec.sites + 1):
                img = _render_site(size, spec.cells_per_site, intensity, radius, field_gain, gain, offset, rng)
                for c in range(6):
                    _write_png(folder / f"{well}_s{site}_w{c + 1}.png", img[c])
                sites += 1
    return sites


def generate(root: str | os.PathLike, spec: SyntheticSpec = SyntheticSpec(), progress: bool = True,
             workers: int = 0) -> Path:
    """Write a synthetic dataset under ``root`` (replacing what is there); returns ``root/data``.

    ``workers``: processes rendering experiments (0: one per core); the files do not depend on it.
    """
    root = Path(root)
    data = root / "data"
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    rng = np.random.default_rng(spec.seed)
    wells, layout = _wells(spec, rng)
    labels = sorted(wells["sirna"].unique())
    negative = wells.loc[wells["well_type"] == "negative_control", "sirna"].iloc[0]
    cell_types = sorted({e.split("-")[0] for e in wells["experiment"]})
    bio = _biology(spec, cell_types, labels, negative, rng)
    tasks = [(i, e, w) for i, (e, w) in enumerate(wells.groupby("experiment", sort=True))]
    workers = min(workers or os.cpu_count() or 1, len(tasks))
    bar = tqdm(total=len(wells) * spec.sites, desc="synthetic sites", unit="site", disable=not progress,
               mininterval=2)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(_render_experiment, data, spec, bio, i, e, w) for i, e, w in tasks]
            for f in futures:
                bar.update(f.result())
    else:
        for i, e, w in tasks:
            bar.update(_render_experiment(data, spec, bio, i, e, w))
    bar.close()
    _write_csvs(root, data, wells)
    (root / "spec.json").write_text(json.dumps({**asdict(spec), **layout}, indent=1))
    return data


def _write_csvs(root: Path, data: Path, wells: pd.DataFrame) -> None:
    cols = ["id_code", "experiment", "plate", "well"]
    treat = wells["well_type"] == "treatment"
    for dataset in ("train", "test"):
        part = wells[wells["dataset"] == dataset]
        t = part[part["well_type"] == "treatment"]
        (t[cols + ["sirna"]] if dataset == "train" else t[cols]).to_csv(data / f"{dataset}.csv", index=False)
        part[part["well_type"] != "treatment"][cols + ["sirna", "well_type"]].to_csv(
            data / f"{dataset}_controls.csv", index=False)
    test_treat = wells[(wells["dataset"] == "test") & treat]
    placeholder = wells.loc[treat, "sirna"].iloc[0]
    test_treat[["id_code"]].assign(sirna=placeholder).to_csv(data / "sample_submission.csv", index=False)
    test_treat[["id_code", "sirna"]].to_csv(root / "test_truth.csv", index=False)


def ensure(cache_dir: str | os.PathLike, spec: SyntheticSpec = SyntheticSpec(), progress: bool = True,
           workers: int = 0) -> Path:
    """The dataset for ``spec`` under ``cache_dir/<spec key>/``, generated on first use; returns the
    data folder (``.../data``). A half-written folder (no ``complete`` marker) is regenerated."""
    root = Path(cache_dir) / f"synthetic-{spec.key()}"
    marker = root / "complete"
    if not marker.is_file():
        generate(root, spec, progress=progress, workers=workers)
        marker.write_text("ok\n")
    return root / "data"


def read_test_truth(data_dir: str | os.PathLike) -> pd.DataFrame | None:
    """The synthetic test labels beside a generated data folder, or None (real data)."""
    path = Path(data_dir).parent / "test_truth.csv"
    if not path.is_file():
        return None
    return pd.read_csv(path, dtype=str, keep_default_na=False)
