"""Plate maps: every well of a 384-well plate (16 rows A..P x 24 columns) as a shapely unit square
centred on its (column, row) cell, in a geopandas GeoDataFrame, drawn as one matplotlib collection per
category (well type, or plate group: the inferred one for test plates after the merge). Figures are
plain ``matplotlib.figure.Figure`` objects (no pyplot state); eda.py saves them.
"""
from __future__ import annotations

import re
import zlib
from typing import Mapping

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from . import metadata
from .plates import PlateGroups

PLATE_ROWS, PLATE_COLUMNS = 16, 24  # a 384-well plate
ROW_LETTERS = "ABCDEFGHIJKLMNOP"
MAP_KINDS = ("well_type", "plate_group")
UNKNOWN_GROUP, CONTROL_GROUP = "unknown", "control"
_WELL = re.compile(r"^([A-Z])(\d{1,2})$")
_WELL_TYPE_COLOURS = {"treatment": "#6baed6", "negative_control": "#e6550d", "positive_control": "#31a354"}
_PALETTE = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#1f78b4",
            "#b2df8a", "#fb9a99"]
_SPECIAL_COLOURS = {UNKNOWN_GROUP: "#bdbdbd", CONTROL_GROUP: "#525252"}
_EMPTY_EDGE, _DPI = "#c8c8c8", 110
FIGURE_DPI = _DPI


def plate_group_names(wells: pd.DataFrame, groups: PlateGroups) -> pd.Series:
    """Per well: ``group k`` (treatment wells of train plates), ``unknown`` (test treatment wells:
    the metadata does not say which group a test plate holds) or ``control``."""
    names = pd.Series(CONTROL_GROUP, index=wells.index, dtype=object)
    treated = wells["well_type"] == metadata.TREATMENT
    train = treated & wells["experiment"].isin(list(groups.rotation))
    names[treated & ~train] = UNKNOWN_GROUP
    names[train] = [f"group {groups.plate_group(e, p)}"
                    for e, p in zip(wells.loc[train, "experiment"], wells.loc[train, "plate"])]
    return names


def parse_well(well: str) -> tuple[int, int]:
    """``"B02"`` -> (row 2, column 2), both 1-based; error naming the well when off the plate."""
    m = _WELL.match(str(well))
    row = ROW_LETTERS.find(m.group(1)) + 1 if m else 0
    column = int(m.group(2)) if m else 0
    if not (1 <= row <= PLATE_ROWS and 1 <= column <= PLATE_COLUMNS):
        raise ValueError(f"well {well!r} is not a well of a {PLATE_ROWS}x{PLATE_COLUMNS} plate "
                         f"(expected a row letter A..{ROW_LETTERS[PLATE_ROWS - 1]} and a column 1..{PLATE_COLUMNS})")
    return row, column


def _boxes(rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    return shapely.box(columns - 0.5, rows - 0.5, columns + 0.5, rows + 0.5)


def well_geometry(wells: pd.DataFrame, groups: PlateGroups | None = None) -> gpd.GeoDataFrame:
    """The wells as a GeoDataFrame: their columns plus ``row``, ``column`` (1-based), a unit
    square ``geometry`` centred on (column, row), and ``plate_group`` when ``groups`` is given."""
    rc = np.array([parse_well(w) for w in wells["well"]], dtype=float).reshape(-1, 2)
    out = gpd.GeoDataFrame(wells.assign(row=rc[:, 0].astype(int), column=rc[:, 1].astype(int)),
                           geometry=_boxes(rc[:, 0], rc[:, 1]))
    if groups is not None:
        out["plate_group"] = plate_group_names(wells, groups)
    return out


def plate_grid() -> gpd.GeoSeries:
    """Every position of the plate as a unit square (the outlines drawn under a plate map)."""
    rows, columns = np.meshgrid(np.arange(1, PLATE_ROWS + 1), np.arange(1, PLATE_COLUMNS + 1), indexing="ij")
    return gpd.GeoSeries(_boxes(rows.ravel().astype(float), columns.ravel().astype(float)))


def category_colour(category: str) -> str:
    """A colour that depends on the category's name only, so every panel and plate agrees."""
    if category in _WELL_TYPE_COLOURS:
        return _WELL_TYPE_COLOURS[category]
    if category in _SPECIAL_COLOURS:
        return _SPECIAL_COLOURS[category]
    m = re.fullmatch(r"group (\d+)", category)
    index = int(m.group(1)) if m else zlib.crc32(category.encode())
    return _PALETTE[index % len(_PALETTE)]


def _category_order(category: str) -> tuple:
    m = re.fullmatch(r"group (\d+)", category)
    return (0, int(m.group(1)), "") if m else (1, 0, category)


def _style_plate_axes(ax: Axes, title: str) -> None:
    ax.set_xlim(0.5, PLATE_COLUMNS + 0.5)
    ax.set_ylim(PLATE_ROWS + 0.5, 0.5)  # row A on top, as a plate is read
    ax.set_aspect("equal")
    ax.set_xticks(range(1, PLATE_COLUMNS + 1), [str(c) for c in range(1, PLATE_COLUMNS + 1)], fontsize=7)
    ax.set_yticks(range(1, PLATE_ROWS + 1), list(ROW_LETTERS[:PLATE_ROWS]), fontsize=7)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    ax.set_xlabel("")
    ax.set_ylabel("")
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=10, pad=18)


def _legend_handles(counts: Mapping[str, int]) -> list[Patch]:
    handles = [Patch(facecolor=category_colour(c), edgecolor="white", label=f"{c} ({n})") for c, n in counts.items()]
    return handles + [Patch(facecolor="none", edgecolor=_EMPTY_EDGE, label="no well in metadata")]


def draw_squares(ax: Axes, geometry: gpd.GeoSeries, **style) -> PolyCollection:
    """The polygons of ``geometry`` as one matplotlib PolyCollection on ``ax``.

    What GeoSeries.plot draws, built straight from the shapely coordinates: geopandas' plotting
    builds a path per polygon in Python and cost about 0.2 s per call, which made the plate maps of
    the 51 real experiments take minutes.
    """
    rings = shapely.get_exterior_ring(np.asarray(geometry.values))
    verts = [shapely.get_coordinates(r) for r in rings]
    collection = PolyCollection(verts, **style)
    ax.add_collection(collection)
    return collection


def plot_plate_map(plate: gpd.GeoDataFrame, by: str = "well_type", ax: Axes | None = None,
                   legend: bool = True) -> Figure:
    """One plate, wells coloured by ``by`` (``well_type`` or ``plate_group``, a column of
    ``well_geometry``); positions without a well are outlines. One PolyCollection per category,
    labelled with the category, so the drawn colours can be read back."""
    if by not in MAP_KINDS:
        raise ValueError(f"plate maps colour wells by one of {MAP_KINDS}, got by={by!r}")
    if by not in plate.columns:
        raise ValueError(f"column {by!r} missing: build the frame with well_geometry(wells, groups)")
    keys = plate[["experiment", "plate"]].drop_duplicates()
    if len(keys) != 1:
        raise ValueError(f"plot_plate_map draws one plate; got {len(keys)} (experiment, plate) pairs")
    own_figure = ax is None
    if own_figure:
        fig = Figure(figsize=(10.5, 5.6))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        fig.subplots_adjust(left=0.04, right=0.78, bottom=0.02, top=0.86)
    draw_squares(ax, plate_grid(), facecolor="none", edgecolor=_EMPTY_EDGE, linewidth=0.6)
    counts = plate[by].value_counts()
    counts = {c: int(counts[c]) for c in sorted(counts.index, key=_category_order)}
    for category in counts:
        draw_squares(ax, plate[plate[by] == category].geometry, facecolor=category_colour(category),
                     edgecolor="white", linewidth=0.8, label=category)
    first = plate.iloc[0]
    title = f"{first['experiment']} plate {first['plate']} ({first['cell_type']}, {first['dataset']})"
    if by == "plate_group":
        treated = [c for c in counts if c != CONTROL_GROUP]
        title += f": {' + '.join(treated) if treated else 'no treatment wells'}"
    _style_plate_axes(ax, title)
    if legend and own_figure:
        ax.figure.legend(handles=_legend_handles(counts), loc="upper left", bbox_to_anchor=(0.79, 0.86),
                         fontsize=8, frameon=False)
    elif legend:
        ax.legend(handles=_legend_handles(counts), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                  frameon=False)
    return ax.figure


def plot_experiment_plate_maps(wells: gpd.GeoDataFrame, experiment: str, by: str = "well_type") -> Figure:
    """All plates of one experiment, two per row, with one legend (counts over the experiment)."""
    part = wells[wells["experiment"] == experiment]
    if part.empty:
        raise ValueError(f"experiment {experiment!r} has no wells in this frame")
    plate_numbers = sorted(part["plate"].unique())
    ncols = min(2, len(plate_numbers))
    nrows = -(-len(plate_numbers) // ncols)
    width, height = 8.2 * ncols + 2.6, 5.0 * nrows + 0.8
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    # a fixed layout: constrained layout measured every tick label and cost more than the drawing
    fig.subplots_adjust(left=0.3 / width, right=1 - 2.6 / width, bottom=0.1 / height, top=1 - 1.1 / height,
                        wspace=0.08, hspace=0.35)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, plate in zip(axes, plate_numbers):
        plot_plate_map(part[part["plate"] == plate], by, ax=ax, legend=False)
    for ax in axes[len(plate_numbers):]:
        ax.set_visible(False)
    counts = part[by].value_counts()
    counts = {c: int(counts[c]) for c in sorted(counts.index, key=_category_order)}
    fig.legend(handles=_legend_handles(counts), loc="upper left", bbox_to_anchor=(1 - 2.5 / width, 1 - 1.1 / height),
               fontsize=9, frameon=False, title=f"{by.replace('_', ' ')} (wells)")
    first = part.iloc[0]
    fig.suptitle(f"{experiment}: {first['cell_type']}, {first['dataset']}, {len(plate_numbers)} plates",
                 fontsize=13)
    return fig


def inferred_group_names(wells: pd.DataFrame, groups: PlateGroups, rotations: Mapping[str, int]) -> pd.Series:
    """Per well of experiments with an inferred rotation (test experiments, after the merge):
    ``group k`` for treatment wells (the group the rotation puts on their plate), ``control`` else."""
    names = pd.Series(CONTROL_GROUP, index=wells.index, dtype=object)
    treated = (wells["well_type"] == metadata.TREATMENT) & wells["experiment"].isin(list(rotations))
    names[treated] = [f"group {groups.group_on_plate(int(rotations[e]), p)}"
                      for e, p in zip(wells.loc[treated, "experiment"], wells.loc[treated, "plate"])]
    return names


def plot_inferred_plate_groups(wells: pd.DataFrame, groups: PlateGroups, rotations: pd.DataFrame,
                               experiment: str) -> Figure:
    """A test experiment's plates coloured by the plate group inferred for each plate from the
    predictions, titled with the inferred rotation and its margin (share of the probability mass
    against the runner-up rotation). ``rotations``: merge_stage.rotation_table rows."""
    row = rotations.set_index("experiment").loc[experiment]
    part = wells[wells["experiment"] == experiment]
    geometry = well_geometry(part).assign(
        plate_group=inferred_group_names(part, groups, {experiment: int(row["rotation"])}))
    fig = plot_experiment_plate_maps(geometry, experiment, "plate_group")
    margin = "" if pd.isna(row.get("margin")) else f", margin {float(row['margin']):.2f} vs the runner-up"
    fig.suptitle(f"{experiment} ({part['cell_type'].iloc[0]}, test): plate groups inferred from the predictions, "
                 f"rotation {int(row['rotation'])}{margin}", fontsize=13)
    return fig
