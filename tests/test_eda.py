"""The EDA stage: tables, plate maps, channel statistics, composites, run_eda and its notebook."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba
from PIL import Image

from kernel_lib import eda, plate_maps
from kernel_lib import metadata
from kernel_lib.config import EdaConfig
from kernel_lib import rxrx_io as rio
from kernel_lib.plates import infer_plate_groups
from kernel_lib.synthetic import SyntheticSpec, ensure

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / "tests" / "fixtures" / "rxrx1"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = SyntheticSpec(image_size=16, sirnas_per_group=3, train_experiments=2, test_experiments=1)


@pytest.fixture(scope="module")
def real_groups(real_wells):
    return infer_plate_groups(real_wells)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return ensure(tmp_path_factory.mktemp("eda_synthetic"), TINY, progress=False)


def _read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


# ---- wells and geometry ---------------------------------------------------------------------------

def test_parse_well_maps_letters_and_numbers_to_grid_cells():
    assert plate_maps.parse_well("B02") == (2, 2)
    assert plate_maps.parse_well("A01") == (1, 1)
    assert plate_maps.parse_well("P24") == (16, 24)
    assert plate_maps.parse_well("O23") == (15, 23)
    for bad in ("Q01", "B25", "B00", "2B", ""):
        with pytest.raises(ValueError, match=repr(bad)):
            plate_maps.parse_well(bad)


def test_well_geometry_of_a_full_real_plate(real_wells):
    sizes = real_wells.groupby(["experiment", "plate"]).size()
    experiment, plate = sizes[sizes == 308].index[0]
    wells = real_wells[(real_wells["experiment"] == experiment) & (real_wells["plate"] == plate)]
    gdf = plate_maps.well_geometry(wells)
    assert len(gdf) == 308
    assert np.allclose(gdf.geometry.area, 1.0)
    centre = {w: (p.x, p.y) for w, p in zip(gdf["well"], gdf.geometry.centroid)}
    assert centre["B02"] == (2.0, 2.0)           # column 2, row 2
    assert centre["O23"] == (23.0, 15.0)
    assert centre["C13"] == (13.0, 3.0)
    assert len(set(centre.values())) == 308      # no two wells on one cell
    # RxRx1 images the inner wells only: rows B..O, columns 2..23
    xmin, ymin, xmax, ymax = gdf.total_bounds
    assert (xmin, ymin, xmax, ymax) == (1.5, 1.5, 23.5, 15.5)


def test_plate_grid_covers_the_384_positions():
    grid = plate_maps.plate_grid()
    assert len(grid) == 384
    assert np.isclose(grid.union_all().area, 384.0)   # disjoint unit squares
    assert tuple(grid.total_bounds) == (0.5, 0.5, 24.5, 16.5)


# ---- tables on the real metadata ------------------------------------------------------------------

def test_metadata_tables_count_the_real_dataset(real_wells, real_groups):
    tables = eda.metadata_tables(real_wells, real_groups, sites_per_well=2)
    ct = tables["cell_types"]
    # the real metadata: 33 train experiments (HEPG2 7, HUVEC 16, RPE 7, U2OS 3), 18 test (4, 8, 4, 2)
    assert ct["train_experiments"].to_dict() == {"HEPG2": 7, "HUVEC": 16, "RPE": 7, "U2OS": 3}
    assert ct["test_experiments"].to_dict() == {"HEPG2": 4, "HUVEC": 8, "RPE": 4, "U2OS": 2}
    n_rows = 36515 + 19897 + 4097 + 2246   # train, test, train_controls, test_controls
    assert ct["wells"].sum() == n_rows and ct["sites"].sum() == 2 * n_rows
    assert ct["plates"].sum() == (33 + 18) * 4
    wt = tables["well_types"]
    assert wt.loc["treatment", "train_wells"] == 36515 and wt.loc["treatment", "test_wells"] == 19897
    assert wt.loc[["negative_control", "positive_control"], "train_wells"].sum() == 4097
    assert wt.loc[["negative_control", "positive_control"], "test_wells"].sum() == 2246
    assert wt.loc["treatment", "sirnas"] == 1108
    assert tables["plate_groups"]["sirnas"].tolist() == [277, 277, 277, 277]
    assert tables["plate_groups"]["train_plates"].tolist() == [33, 33, 33, 33]
    exps = tables["experiments"]
    assert len(exps) == 51 and exps.loc["HEPG2-08", "rotation"] == ""
    for e, r in real_groups.rotation.items():
        assert exps.loc[e, "rotation"] == str(r)
    plates = tables["plates"].set_index(["experiment", "plate"])
    assert len(plates) == 204
    assert (plates.loc["HEPG2-08", "plate_group"] == "unknown").all()
    assert plates.loc[("HEPG2-05", 1), "plate_group"] == f"group {real_groups.plate_group('HEPG2-05', 1)}"


def test_default_experiments_on_real_metadata(real_wells):
    assert eda.default_experiments(real_wells) == ["HEPG2-01", "HUVEC-01", "RPE-01", "U2OS-01", "HEPG2-08"]


# ---- plate maps -----------------------------------------------------------------------------------

def _collections(fig) -> dict[str, object]:
    ax = fig.axes[0]
    return {c.get_label(): c for c in ax.collections if not c.get_label().startswith("_")}


def test_plate_group_column_agrees_with_each_wells_sirna(real_wells, real_groups):
    # HEPG2-05 has a non-zero rotation: plate k does not hold group k-1 there
    exp = real_wells[real_wells["experiment"] == "HEPG2-05"]
    assert real_groups.rotation["HEPG2-05"] != 0
    gdf = plate_maps.well_geometry(exp, real_groups)
    treated = gdf[gdf["well_type"] == "treatment"]
    expected = ["group %d" % real_groups.label_to_group[s] for s in treated["sirna"]]
    assert treated["plate_group"].tolist() == expected
    assert (gdf.loc[gdf["well_type"] != "treatment", "plate_group"] == "control").all()


def test_plate_map_colours_wells_by_their_plate_group(real_wells, real_groups):
    wells = real_wells[(real_wells["experiment"] == "HEPG2-05") & (real_wells["plate"] == 2)]
    well = wells[wells["well_type"] == "treatment"].iloc[0]
    group = f"group {real_groups.label_to_group[well['sirna']]}"
    gdf = plate_maps.well_geometry(wells, real_groups)
    fig = plate_maps.plot_plate_map(gdf, "plate_group")
    drawn = _collections(fig)
    assert set(drawn) == {group, "control"}
    assert np.allclose(drawn[group].get_facecolor()[0], to_rgba(plate_maps.category_colour(group)))
    assert len(drawn[group].get_paths()) == (wells["well_type"] == "treatment").sum()
    assert len(drawn["control"].get_paths()) == (wells["well_type"] != "treatment").sum()
    assert group in fig.axes[0].get_title() and "HEPG2-05 plate 2" in fig.axes[0].get_title()
    assert fig.axes[0].get_ylim() == (16.5, 0.5)   # row A on top, as a plate is read
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == list("ABCDEFGHIJKLMNOP")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [str(c) for c in range(1, 25)]


def test_test_plates_have_unknown_groups_and_well_types(real_wells, real_groups):
    wells = real_wells[(real_wells["experiment"] == "HEPG2-08") & (real_wells["plate"] == 1)]
    gdf = plate_maps.well_geometry(wells, real_groups)
    assert set(gdf.loc[gdf["well_type"] == "treatment", "plate_group"]) == {"unknown"}
    drawn = _collections(plate_maps.plot_plate_map(gdf, "well_type"))
    assert set(drawn) == set(wells["well_type"])
    negative = drawn["negative_control"].get_paths()
    centres = sorted(tuple(np.round(p.vertices[:4].mean(0), 6)) for p in negative)
    negative_wells = wells.loc[wells["well_type"] == "negative_control", "well"]
    expected = sorted((float(c), float(r)) for r, c in map(plate_maps.parse_well, negative_wells))
    assert centres == expected and (2.0, 2.0) in centres   # B02


def test_plot_plate_map_rejects_bad_input(real_wells, real_groups):
    gdf = plate_maps.well_geometry(real_wells[real_wells["experiment"] == "HEPG2-01"], real_groups)
    with pytest.raises(ValueError, match="one plate"):
        plate_maps.plot_plate_map(gdf, "well_type")
    with pytest.raises(ValueError, match="sirna"):
        plate_maps.plot_plate_map(gdf[gdf["plate"] == 1], "sirna")


# ---- images ---------------------------------------------------------------------------------------

def test_histogram_stats_equal_numpy():
    rng = np.random.default_rng(0)
    # arange(100) and repeat(.., 25) put percentiles exactly on a cumulative count: the edge cases
    for values in (rng.integers(0, 256, size=1001), rng.poisson(3, size=64).clip(0, 255), np.array([7]),
                   np.full(10, 255), np.arange(100), np.repeat([0, 9, 200, 255], 25)):
        stats = eda.histogram_stats(np.bincount(values, minlength=256))
        assert np.isclose(stats["mean"], values.mean()) and np.isclose(stats["std"], values.std())
        for p in eda.PERCENTILES:
            assert stats[f"p{p}"] == np.percentile(values, p, method="inverted_cdf")


def test_channel_table_equals_numpy_over_an_experiments_pngs(small_synthetic):
    wells = metadata.read_wells(small_synthetic)
    wells = wells[wells["experiment"].isin(["HUVEC-02", "RPE-01"])]
    sites = metadata.expand_sites(wells, (1, 2))
    n_all = int((sites["experiment"] == "HUVEC-02").sum())
    table = eda.channel_intensity_table(small_synthetic, sites, n_sites_per_experiment=10_000, seed=1,
                                        progress=False)
    assert len(table) == 2 * 6
    folder = small_synthetic / "train" / "HUVEC-02"
    for c in range(1, 7):
        files = sorted(folder.glob(f"Plate*/*_w{c}.png"))
        pixels = np.concatenate([_read_png(f).ravel() for f in files])
        row = table[(table["experiment"] == "HUVEC-02") & (table["channel"] == c)].iloc[0]
        assert row["n_sites"] == len(files) == n_all
        assert row["n_pixels"] == pixels.size
        assert np.isclose(row["mean"], pixels.mean()) and np.isclose(row["std"], pixels.std())
        assert row["p5"] == np.percentile(pixels, 5, method="inverted_cdf")
        assert row["p99"] == np.percentile(pixels, 99, method="inverted_cdf")


def test_sample_sites_is_seeded_per_experiment(small_synthetic):
    sites = metadata.expand_sites(metadata.read_wells(small_synthetic), (1, 2))
    one = eda.sample_sites(sites, 5, seed=3)
    assert one.groupby("experiment").size().eq(5).all()
    alone = eda.sample_sites(sites[sites["experiment"] == "RPE-01"], 5, seed=3)
    assert alone["id_code"].tolist() == one.loc[one["experiment"] == "RPE-01", "id_code"].tolist()
    other = eda.sample_sites(sites, 5, seed=4)
    assert set(other["id_code"] + other["site"].astype(str)) != set(one["id_code"] + one["site"].astype(str))
    with pytest.raises(ValueError, match="n_sites_per_experiment"):
        eda.sample_sites(sites, 0, seed=3)


def test_real_channel_table_shows_the_hepg2_huvec_batch_effect(real_wells):
    sites = metadata.expand_sites(real_wells[(real_wells["plate"] == 1) & (real_wells["well"] == "B02") &
                                             real_wells["experiment"].isin(["HEPG2-01", "HUVEC-01"])], (1,))
    table = eda.channel_intensity_table(REAL / "images", sites, 4, seed=0, progress=False)
    means = table.pivot(index="channel", columns="experiment", values="mean")
    direct = _read_png(REAL / "images/train/HEPG2-01/Plate1/B02_s1_w1.png")
    assert np.isclose(means.loc[1, "HEPG2-01"], direct.mean())
    # the real images: HEPG2-01's channel means are several times HUVEC-01's
    assert (means["HEPG2-01"] > means["HUVEC-01"]).all()
    assert means["HEPG2-01"].sum() > 3 * means["HUVEC-01"].sum()
    assert eda.plot_channel_distributions(table).axes[0].get_ylabel().startswith("w1")


def test_detect_sites_reads_the_real_tree(real_wells):
    assert eda.detect_sites(REAL / "images", real_wells) == [1, 2]
    with pytest.raises(FileNotFoundError, match="HEPG2-01_1_B02"):
        eda.detect_sites(REAL / "metadata", real_wells)


def test_rgb_composite_draws_the_named_site(real_wells):
    examples = eda.example_sites(real_wells, ["U2OS-01", "HEPG2-08"])
    assert examples["id_code"].tolist() == ["U2OS-01_1_B02", "HEPG2-08_1_B02"]
    fig = eda.plot_rgb_composites(REAL / "images", examples)
    drawn = fig.axes[1].images[0].get_array()
    site = np.stack([_read_png(REAL / f"images/test/HEPG2-08/Plate1/B02_s1_w{c}.png") for c in range(1, 7)], -1)
    assert drawn.shape == (512, 512, 3)
    assert np.array_equal(drawn, rio.convert_tensor_to_rgb(site).astype(np.uint8))
    assert "HEPG2-08 plate 1 B02 s1" in fig.axes[1].get_title()


# ---- the stage ------------------------------------------------------------------------------------

def test_eda_config_names_the_bad_parameter():
    good = {"data_dir": "", "output_dir": "o", "input_dirs": [], "seed": 1, "experiments": ["A-01"],
            "n_sites_per_experiment": 2, "image_size": 0, "images": True}
    assert eda.eda_config(good).to_dict() == good
    # a bare notebook gets the registry's full-profile defaults
    assert eda.eda_config({"output_dir": "o"}).n_sites_per_experiment == 8
    with pytest.raises(ValueError, match="'n_site'"):
        eda.eda_config({**good, "n_site": 3})
    with pytest.raises(TypeError, match="seed"):
        eda.eda_config({**good, "seed": "42"})
    with pytest.raises(TypeError, match="experiments"):
        eda.eda_config({**good, "experiments": "HEPG2-01"})
    with pytest.raises(ValueError, match="n_sites_per_experiment"):
        eda.eda_config({**good, "n_sites_per_experiment": -1})


@pytest.mark.slow
def test_run_eda_writes_pngs_tables_and_metrics(tiny, tmp_path):
    out = tmp_path / "eda"
    result = eda.run_eda(tiny, out, experiments=["RPE-03"], n_sites_per_experiment=2, seed=0, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stage"] == "eda" and metrics["finished"] is True
    assert set(metrics["figures"]) == {"plate_map_RPE-03_well_type.png", "plate_map_RPE-03_plate_group.png",
                                       "channel_intensities.png", "rgb_composites.png"}
    for name in metrics["figures"]:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
    intensities = pd.read_csv(out / "channel_intensities.csv")
    assert intensities.groupby("experiment")["n_sites"].first().eq(2).all()
    assert pd.read_csv(out / "experiments.csv")["experiment"].nunique() == 12   # 4 cell types x 3
    assert result["tables"]["cell_types"]["test_experiments"].tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="NOPE-01"):
        eda.run_eda(tiny, tmp_path / "bad", experiments=["NOPE-01"], progress=False)


def _groups_from_csvs(data_dir: Path) -> tuple[list[int], int]:
    """Plate groups straight from train.csv: siRNAs sharing a train plate share a group (union-find);
    group k is the one on the first experiment's k-th plate. Returns (sizes, rotations seen)."""
    train = pd.read_csv(data_dir / "train.csv", dtype=str)
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for _, plate in train.groupby(["experiment", "plate"]):
        labels = plate["sirna"].tolist()
        for other in labels[1:]:
            parent[root(other)] = root(labels[0])
    first = sorted(train["experiment"].unique())[0]
    plates = sorted(train["plate"].unique(), key=int)
    order = [root(train[(train["experiment"] == first) & (train["plate"] == p)]["sirna"].iloc[0]) for p in plates]
    sizes = [sum(root(s) == g for s in train["sirna"].unique()) for g in order]
    rotations = set()
    for e, exp in train.groupby("experiment"):
        g = order.index(root(exp[exp["plate"] == plates[0]]["sirna"].iloc[0]))
        rotations.add(g)   # the group on the first plate is the rotation
    return sizes, len(rotations)


def test_notebook_parameters_are_eda_config_fields():
    papermill = pytest.importorskip("papermill")
    names = set(papermill.inspect_notebook(str(REPO / "notebooks" / "01_eda.ipynb")))
    assert names == {"data_dir", "output_dir", "input_dirs"} and names <= set(EdaConfig.__dataclass_fields__)


@pytest.mark.slow
def test_notebook_records_the_datasets_numbers(tiny, tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("KAGGLE_ROOT", str(tmp_path / "no_kaggle"))
    out = tmp_path / "out_eda"
    papermill.execute_notebook(str(REPO / "notebooks" / "01_eda.ipynb"), str(tmp_path / "run.ipynb"),
                               parameters={"data_dir": str(tiny), "output_dir": str(out),
                                           "experiments": ["HUVEC-01"], "n_sites_per_experiment": 3},
                               kernel_name="python3", cwd=str(tmp_path), progress_bar=False)
    metrics = json.loads((out / "metrics.json").read_text())
    csvs = [pd.read_csv(tiny / f, dtype=str) for f in ("train.csv", "test.csv", "train_controls.csv",
                                                        "test_controls.csv")]
    sizes, rotations = _groups_from_csvs(tiny)
    assert metrics["finished"] is True
    assert metrics["n_wells"] == sum(len(c) for c in csvs)
    assert metrics["n_experiments"] == len(set().union(*(c["experiment"] for c in csvs)))
    assert metrics["plate_groups"] == len(sizes) == TINY.plates
    assert metrics["group_sizes"] == sizes
    assert metrics["rotations_seen"] == rotations
    assert metrics["experiments"] == ["HUVEC-01"]
    assert len(metrics["figures"]) == 4
    for name in metrics["figures"]:
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
