"""Exploratory analysis of an RxRx1 dataset (the eda stage): metadata tables, channel intensities
per experiment (batch effects), RGB composites, and the stage itself (``run_eda``), which saves the
plate maps (plate_maps.py) and these figures as PNGs, the tables as CSVs and a ``metrics.json``.

Everything is derived from the data (labels, cell types, plates, well types, sites, plate groups)
except the plate format, a 384-well plate (plate_maps.py). Figures are plain
``matplotlib.figure.Figure`` objects (no pyplot state).
"""
from __future__ import annotations

import multiprocessing
import os
import re
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import geopandas as gpd
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tqdm import tqdm  # plain text bars: readable in executed notebooks and papermill logs

from . import metadata, paths
from . import rxrx_io as rio
from .config import EdaConfig
from .environment import record_environment
from .outputs import update_metrics, write_json
from .parameters import with_stage_defaults
from .plate_maps import (FIGURE_DPI, MAP_KINDS, UNKNOWN_GROUP, category_colour, plate_group_names,
                         plot_experiment_plate_maps, well_geometry)
from .plates import PlateGroups, infer_plate_groups

STAGE = "eda"
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


# ---- tables -------------------------------------------------------------------------------------

def detect_sites(data_dir: str | os.PathLike, wells: pd.DataFrame) -> list[int]:
    """The site numbers imaged per well, read from the first well's files (``{well}_s{n}_w1.png``)."""
    r = wells.sort_values("id_code").iloc[0]
    folder = rio.site_dir(data_dir, r["dataset"], r["experiment"], int(r["plate"]))
    found = sorted(int(m.group(1)) for p in folder.glob(f"{r['well']}_s*_w{rio.DEFAULT_CHANNELS[0]}.png")
                   if (m := re.search(r"_s(\d+)_w", p.name)))
    if not found:
        raise FileNotFoundError(f"no images of well {r['id_code']} in {folder} "
                                f"(expected {r['well']}_s<site>_w{rio.DEFAULT_CHANNELS[0]}.png)")
    return found


def find_sites(data_dir: str | os.PathLike, wells: pd.DataFrame, probe: int = 20) -> list[int]:
    """The site numbers imaged per well, from the first of the first ``probe`` wells (by id_code)
    that has images; [] when none has (a download of the CSVs only)."""
    for _, r in wells.sort_values("id_code").head(probe).iterrows():
        folder = rio.site_dir(data_dir, r["dataset"], r["experiment"], int(r["plate"]))
        found = sorted(int(m.group(1)) for p in folder.glob(f"{r['well']}_s*_w{rio.DEFAULT_CHANNELS[0]}.png")
                       if (m := re.search(r"_s(\d+)_w", p.name)))
        if found:
            return found
    return []


def site_exists(data_dir: str | os.PathLike, r: Any, channels: Sequence[int] = rio.DEFAULT_CHANNELS) -> bool:
    """Whether every channel PNG of the site (a row with dataset, experiment, plate, well, site) exists."""
    return all(os.path.isfile(rio.image_path(r.dataset, r.experiment, int(r.plate), r.well, int(r.site), c,
                                             base_path=str(data_dir))) for c in channels)


def _well_type_counts(wells: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return wells.groupby(keys)["well_type"].value_counts().unstack(fill_value=0)


def metadata_tables(wells: pd.DataFrame, groups: PlateGroups, sites_per_well: int = 2) -> dict[str, pd.DataFrame]:
    """Counts of the dataset's structure: ``cell_types``, ``experiments``, ``plates``,
    ``well_types`` and ``plate_groups`` tables (sites = wells x ``sites_per_well``)."""
    exps = wells.groupby("experiment").agg(cell_type=("cell_type", "first"), dataset=("dataset", "first"),
                                           plates=("plate", "nunique"), wells=("id_code", "size"))
    exps = exps.join(_well_type_counts(wells, ["experiment"])).assign(sites=lambda t: t["wells"] * sites_per_well)
    exps["rotation"] = [str(groups.rotation.get(e, "")) for e in exps.index]  # "" for test experiments

    cell_types = exps.pivot_table(index="cell_type", columns="dataset", values="wells", aggfunc="size",
                                  fill_value=0)
    cell_types = cell_types[[d for d in ("train", "test") if d in cell_types]].add_suffix("_experiments")
    cell_types.columns.name = None
    cell_types["plates"] = exps.groupby("cell_type")["plates"].sum()
    cell_types["wells"] = exps.groupby("cell_type")["wells"].sum()
    cell_types["sites"] = cell_types["wells"] * sites_per_well

    plates = wells.groupby(["experiment", "plate"]).agg(cell_type=("cell_type", "first"),
                                                        dataset=("dataset", "first"), wells=("id_code", "size"))
    plates = plates.join(_well_type_counts(wells, ["experiment", "plate"]))
    treated = wells.assign(plate_group=plate_group_names(wells, groups))[wells["well_type"] == metadata.TREATMENT]
    plates["plate_group"] = treated.groupby(["experiment", "plate"])["plate_group"].first()
    plates["plate_group"] = plates["plate_group"].fillna(UNKNOWN_GROUP)

    well_types = wells.groupby(["well_type", "dataset"]).size().unstack(fill_value=0)
    well_types = well_types[[d for d in ("train", "test") if d in well_types]].add_suffix("_wells")
    well_types.columns.name = None
    labelled = wells[wells["sirna"] != ""]
    well_types["sirnas"] = labelled.groupby("well_type")["sirna"].nunique()
    well_types["sirnas"] = well_types["sirnas"].fillna(0).astype(int)

    train_plates = plates[plates["plate_group"] != UNKNOWN_GROUP]["plate_group"].value_counts()
    plate_groups = pd.DataFrame({
        "group": [f"group {k}" for k in range(groups.n_groups)],
        "sirnas": [len(g) for g in groups.groups],
        "train_plates": [int(train_plates.get(f"group {k}", 0)) for k in range(groups.n_groups)],
        "first_sirnas": [", ".join(g[:5]) for g in groups.groups],
    }).set_index("group")
    return {"cell_types": cell_types, "experiments": exps, "plates": plates.reset_index(),
            "well_types": well_types, "plate_groups": plate_groups}


# ---- images -------------------------------------------------------------------------------------

def sample_sites(sites: pd.DataFrame, n_per_experiment: int, seed: int) -> pd.DataFrame:
    """Up to ``n_per_experiment`` sites of each experiment, drawn by a generator seeded with
    (seed, experiment), so an experiment's sample does not depend on which others are present."""
    if n_per_experiment < 1:
        raise ValueError(f"parameter n_sites_per_experiment must be >= 1, got {n_per_experiment}")
    parts = []
    for experiment, group in sites.groupby("experiment", sort=True):
        rng = np.random.default_rng([seed, zlib.crc32(str(experiment).encode())])
        k = min(n_per_experiment, len(group))
        parts.append(group.iloc[np.sort(rng.choice(len(group), size=k, replace=False))])
    return pd.concat(parts, ignore_index=True)


def histogram_stats(counts: np.ndarray) -> dict[str, float]:
    """Mean, std and ``PERCENTILES`` of the values 0..len(counts)-1 seen ``counts`` times; the
    percentiles are numpy's ``inverted_cdf`` ones (exact for integer images)."""
    values = np.arange(len(counts), dtype=np.float64)
    n = counts.sum()
    mean = float((counts * values).sum() / n)
    std = float(np.sqrt((counts * (values - mean) ** 2).sum() / n))
    cdf = np.cumsum(counts)
    out = {"mean": mean, "std": std}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.searchsorted(cdf, n * p / 100, side="left"))
    return out


def channel_intensity_table(data_dir: str | os.PathLike, sites: pd.DataFrame, n_sites_per_experiment: int = 8,
                            seed: int = 42, image_size: int = 0, channels: Sequence[int] = rio.DEFAULT_CHANNELS,
                            progress: bool = True, skip_missing: bool = False) -> pd.DataFrame:
    """Pixel statistics per experiment and channel over a seeded sample of its sites (0..255 units).

    ``sites``: one row per site (metadata.expand_sites). Returns one row per (experiment, channel):
    cell_type, dataset, channel_name, n_sites, n_pixels, mean, std, p1 ... p99. With
    ``skip_missing``, sampled sites without their PNGs are left out and counted in
    ``table.attrs["missing_sites"]`` (a missing file is otherwise an error naming it).
    """
    from .data import read_site  # imports torch: only when images are read

    sample = sample_sites(sites, n_sites_per_experiment, seed)
    if skip_missing:
        present = np.array([site_exists(data_dir, r, channels) for r in sample.itertuples()], dtype=bool)
        missing = int((~present).sum())
        sample = sample[present]
    else:
        missing = 0
    hists: dict[str, np.ndarray] = {}
    for r in tqdm(sample.itertuples(), total=len(sample), desc="channel intensities", disable=not progress,
                  mininterval=5):
        x = read_site(data_dir, r.dataset, r.experiment, r.plate, r.well, r.site, channels, image_size)
        h = hists.setdefault(r.experiment, np.zeros((len(channels), 256), dtype=np.int64))
        for i in range(len(channels)):
            h[i] += np.bincount(x[i].ravel(), minlength=256)
    info = sample.groupby("experiment").agg(cell_type=("cell_type", "first"), dataset=("dataset", "first"),
                                            n_sites=("site", "size"))
    rows = []
    for experiment, h in hists.items():
        for i, c in enumerate(channels):
            rows.append({"experiment": experiment, **info.loc[experiment].to_dict(), "channel": c,
                         "channel_name": rio.CHANNEL_NAMES.get(c, f"channel {c}"), "n_pixels": int(h[i].sum()),
                         **histogram_stats(h[i])})
    columns = ["experiment", "cell_type", "dataset", "n_sites", "channel", "channel_name", "n_pixels", "mean", "std",
               *(f"p{p}" for p in PERCENTILES)]
    table = pd.DataFrame(rows, columns=columns) if not rows else pd.DataFrame(rows)
    table = table.sort_values(["cell_type", "experiment", "channel"], ignore_index=True)
    table.attrs["missing_sites"] = missing
    table.attrs["sampled_sites"] = len(sample) + missing
    return table


def plot_channel_distributions(table: pd.DataFrame) -> Figure:
    """One panel per channel, one column per experiment (grouped by cell type): the mean (dot),
    25-75th (thick bar) and 5-95th (thin bar) percentiles, so shifts between experiments of one
    cell type (batch effects) and between cell types are visible side by side. Test experiments
    are drawn hollow."""
    order = table[["cell_type", "experiment"]].drop_duplicates().sort_values(["cell_type", "experiment"])
    x_of = {e: i for i, e in enumerate(order["experiment"])}
    cell_types = sorted(order["cell_type"].unique())
    channels = sorted(table["channel"].unique())
    fig = Figure(figsize=(max(8.0, 0.28 * len(x_of) + 3), 1.9 * len(channels) + 1), layout="constrained")
    axes = fig.subplots(len(channels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, c in zip(axes, channels):
        part = table[table["channel"] == c]
        for ct in cell_types:
            rows = part[part["cell_type"] == ct]
            x = rows["experiment"].map(x_of).to_numpy()
            colour = category_colour(f"group {cell_types.index(ct)}")
            ax.vlines(x, rows["p5"], rows["p95"], colors=colour, linewidth=1)
            ax.vlines(x, rows["p25"], rows["p75"], colors=colour, linewidth=4)
            test = (rows["dataset"] == "test").to_numpy()
            ax.scatter(x[~test], rows["mean"][~test], color=colour, edgecolor="black", zorder=3, s=22, label=ct)
            ax.scatter(x[test], rows["mean"][test], facecolor="white", edgecolor=colour, zorder=3, s=22)
        ax.set_ylabel(f"w{c} {part['channel_name'].iloc[0]}", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(x_of)), list(x_of), rotation=90, fontsize=7)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False, title="cell type")
    n = int(table["n_sites"].max())
    fig.suptitle(f"Channel intensity per experiment ({n} sampled sites at most; hollow = test): batch effects")
    return fig


def example_sites(wells: pd.DataFrame, experiments: Sequence[str], site: int = 1) -> pd.DataFrame:
    """One site per experiment for composites: its first plate's negative control well (the same
    biology everywhere, so differences are batch effects), else the plate's first well."""
    rows = []
    for experiment in experiments:
        part = wells[wells["experiment"] == experiment].sort_values(["plate", "well"])
        part = part[part["plate"] == part["plate"].iloc[0]]
        negative = part[part["well_type"] == "negative_control"]
        rows.append((negative if len(negative) else part).iloc[0])
    return pd.DataFrame(rows).assign(site=site).reset_index(drop=True)


def plot_rgb_composites(data_dir: str | os.PathLike, sites: pd.DataFrame, ncols: int = 3) -> Figure:
    """Each site rendered as rxrx.io does (rio.convert_tensor_to_rgb), titled with where it is from."""
    ncols = max(1, min(ncols, len(sites)))
    nrows = -(-len(sites) // ncols)
    fig = Figure(figsize=(4.2 * ncols, 4.5 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, r in zip(axes, sites.itertuples()):
        tensor = rio.load_site(r.dataset, r.experiment, int(r.plate), r.well, int(r.site), base_path=str(data_dir))
        ax.imshow(rio.convert_tensor_to_rgb(tensor).astype(np.uint8), interpolation="nearest")
        label = f", siRNA {r.sirna}" if r.sirna else ""
        ax.set_title(f"{r.experiment} plate {r.plate} {r.well} s{r.site}\n{r.well_type}{label}", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle("RGB composites in rxrx colours and fixed display ranges (channels 1-6): "
                 "bright experiments saturate, a batch effect")
    return fig


# ---- the stage ----------------------------------------------------------------------------------

def eda_config(params: Mapping[str, Any]) -> EdaConfig:
    """The notebook's parameters over the stage's defaults, checked: errors name the parameter."""
    return EdaConfig.from_params(with_stage_defaults(STAGE, params))


def default_experiments(wells: pd.DataFrame) -> list[str]:
    """The first train experiment of each cell type and the first test experiment."""
    train = wells[wells["dataset"] == "train"].groupby("cell_type")["experiment"].min()
    test = sorted(wells.loc[wells["dataset"] == "test", "experiment"].unique())
    return sorted(train) + test[:1]


def _save(fig: Figure, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=FIGURE_DPI)
    return path


def _save_experiment_maps(geometry: gpd.GeoDataFrame, experiment: str, folder: Path) -> dict[str, Path]:
    return {f"plate_map_{experiment}_{by}": _save(plot_experiment_plate_maps(geometry, experiment, by), folder,
                                                  f"plate_map_{experiment}_{by}") for by in MAP_KINDS}


def plate_map_figures(geometry: gpd.GeoDataFrame, experiments: Sequence[str], folder: Path,
                      progress: bool = True, workers: int = 0) -> dict[str, Path]:
    """Both plate maps of every experiment as PNGs in ``folder``, rendered on every core (the 51
    real experiments are 102 figures); returns name -> path in experiment order."""
    workers = min(workers or os.cpu_count() or 1, len(experiments))
    parts = [geometry[geometry["experiment"] == e] for e in experiments]
    bar = tqdm(total=len(experiments), desc="plate maps", unit="experiment", disable=not progress, mininterval=2)
    figures: dict[str, Path] = {}
    if workers > 1:
        # spawn, not fork: the EDA runs inside a Jupyter kernel, whose threads a fork would not carry
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for done in pool.map(_save_experiment_maps, parts, experiments, [folder] * len(parts)):
                figures.update(done)
                bar.update()
    else:
        for part, experiment in zip(parts, experiments):
            figures.update(_save_experiment_maps(part, experiment, folder))
            bar.update()
    bar.close()
    return figures


def run_eda(data_dir: str | os.PathLike, output_dir: str | os.PathLike, experiments: Sequence[str] = (),
            n_sites_per_experiment: int = 8, seed: int = 42, image_size: int = 0, input_dirs: Sequence[str] = (),
            images: bool = True, progress: bool = True) -> dict[str, Any]:
    """The EDA stage: tables (CSV), plate maps of ``experiments`` (default: see default_experiments),
    channel distributions of every experiment and composites (PNG), ``metrics.json``.

    The tables and plate maps need only the metadata CSVs and are always drawn. The image figures
    are drawn from the sampled sites whose PNGs exist; ``metrics.json`` says how many were missing
    (``images_missing``). ``images=False`` or ``n_sites_per_experiment=0`` reads no image at all.
    ``input_dirs`` is accepted for the notebook convention and unused. Returns ``metrics``,
    ``tables`` (name -> DataFrame), ``figures`` (name -> PNG path) and ``notes`` (what was left out).
    """
    config = EdaConfig(data_dir=str(data_dir), output_dir=str(output_dir), input_dirs=tuple(input_dirs),
                       seed=seed, experiments=tuple(experiments), n_sites_per_experiment=n_sites_per_experiment,
                       image_size=image_size, images=images)
    data_dir = paths.resolve_data_dir(data_dir)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    update_metrics(out, stage=STAGE, finished=False)
    record_environment(out)  # versions and GPUs in metrics.json; major-version warnings
    write_json(out / "config.json", config.to_dict())
    wells = metadata.read_wells(data_dir)
    groups = infer_plate_groups(wells)
    experiments = list(experiments) or default_experiments(wells)
    missing = [e for e in experiments if e not in set(wells["experiment"])]
    if missing:
        raise ValueError(f"parameter experiments: {missing} not in {data_dir} "
                         f"(experiments are e.g. {sorted(wells['experiment'].unique())[:5]})")
    read_images = images and n_sites_per_experiment > 0
    site_numbers = find_sites(data_dir, wells) if read_images else []
    notes: list[str] = []
    if not read_images:
        notes.append("images off (images=False or n_sites_per_experiment=0): tables and plate maps only")
    elif not site_numbers:
        notes.append(f"no site images found under {data_dir}/{{train,test}}/: tables and plate maps only")
    sites_per_well = len(site_numbers) or 2  # RxRx1 images 2 sites per well; the CSVs do not say
    tables = metadata_tables(wells, groups, sites_per_well=sites_per_well)
    missing_sites = sampled = 0
    if site_numbers:
        sites = metadata.expand_sites(wells, site_numbers)
        table = channel_intensity_table(data_dir, sites, n_sites_per_experiment, seed, image_size,
                                        progress=progress, skip_missing=True)
        missing_sites, sampled = table.attrs["missing_sites"], table.attrs["sampled_sites"]
        if missing_sites:
            notes.append(f"{missing_sites} of {sampled} sampled sites have no PNGs: the image figures show the "
                         f"{sampled - missing_sites} that exist")
        if len(table):
            tables["channel_intensities"] = table
    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv")

    figures = plate_map_figures(well_geometry(wells[wells["experiment"].isin(experiments)], groups), experiments,
                                out, progress)
    if "channel_intensities" in tables:
        figures["channel_intensities"] = _save(plot_channel_distributions(tables["channel_intensities"]), out,
                                               "channel_intensities")
    if site_numbers:
        composites = example_sites(wells, experiments, site=site_numbers[0])
        present = [site_exists(data_dir, r) for r in composites.itertuples()]
        if not all(present):
            notes.append(f"{len(present) - sum(present)} of {len(present)} example sites for the RGB composites "
                         f"have no PNGs: left out")
        if any(present):
            figures["rgb_composites"] = _save(plot_rgb_composites(data_dir, composites[present]), out,
                                              "rgb_composites")
    for note in notes:
        print(f"[{STAGE}] {note}")
    metrics = update_metrics(out, stage=STAGE, finished=True, figures=[p.name for p in figures.values()],
                             tables=[f"{n}.csv" for n in tables], n_wells=len(wells),
                             n_experiments=int(wells["experiment"].nunique()), experiments=experiments,
                             sites_per_well=len(site_numbers) or None, plate_groups=groups.n_groups,
                             group_sizes=[len(g) for g in groups.groups],
                             rotations_seen=len(set(groups.rotation.values())), images=read_images,
                             n_sites_sampled=sampled - missing_sites, images_missing=missing_sites, notes=notes)
    return {"metrics": metrics, "tables": tables, "figures": figures, "notes": notes}
