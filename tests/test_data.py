"""SiteDataset, normalisation statistics and the packed cache, on the small synthetic dataset
and the real fixture PNGs; images are checked against PIL, an independent decoder."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from kernel_lib import data, metadata
from kernel_lib import rxrx_io as rio

REAL_IMAGES = Path(__file__).parent / "fixtures" / "rxrx1" / "images"


def pil_site(data_dir: Path, r, channels=range(1, 7)) -> np.ndarray:
    """(C, H, W) uint8 decoded with PIL."""
    return np.stack([np.array(Image.open(rio.image_path(r.dataset, r.experiment, r.plate, r.well, r.site, c,
                                                        str(data_dir)))) for c in channels])


def row(frame: pd.DataFrame, i: int):
    """Row ``i`` as a named tuple (attributes dataset, experiment, plate, well, site, ...)."""
    return next(frame.iloc[[i]].itertuples())


def direct_stats(data_dir: Path, sites: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Channel mean and std (floored at 1) over every pixel at the statistics' stride of ``sites``."""
    k = data._STAT_STRIDE
    x = np.stack([pil_site(data_dir, r)[:, ::k, ::k] for r in sites.itertuples()]).astype(np.float64)
    x = x.transpose(1, 0, 2, 3).reshape(6, -1)
    return x.mean(1), np.maximum(x.std(1), 1.0)


@pytest.fixture(scope="module")
def wells(small_synthetic) -> pd.DataFrame:
    return metadata.read_wells(small_synthetic)


@pytest.fixture(scope="module")
def sites(wells) -> pd.DataFrame:
    return metadata.expand_sites(wells)


@pytest.fixture(scope="module")
def treatment(sites) -> pd.DataFrame:
    return sites[sites["well_type"] == "treatment"].reset_index(drop=True)


@pytest.fixture(scope="module")
def plate_stats(small_synthetic, sites) -> data.NormStats:
    return data.compute_norm_stats(small_synthetic, sites, by="plate", progress=False)


def make(small_synthetic, frame, wells, normalization="none", stats=None, **kwargs) -> data.SiteDataset:
    return data.SiteDataset(small_synthetic, frame, metadata.class_list(wells), metadata.cell_types(wells),
                            normalization=normalization, stats=stats, **kwargs)


def copy_plate(src: Path, dst: Path, r) -> Path:
    """A writable copy of the plate folder that holds site row ``r`` (the datasets need no CSVs)."""
    plate = Path(r["dataset"]) / r["experiment"] / f"Plate{r['plate']}"
    shutil.copytree(src / plate, dst / plate)
    return dst


def test_item_contract(small_synthetic, wells, treatment, plate_stats, small_synthetic_spec):
    ds = make(small_synthetic, treatment, wells, "plate", plate_stats)
    item = ds[7]
    size = small_synthetic_spec.image_size
    assert set(item) == {"image", "mean", "std", "label", "cell_type", "index"}
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (6, size, size)
    assert item["mean"].dtype == item["std"].dtype == torch.float32
    assert item["mean"].shape == item["std"].shape == (6,)
    for key in ("label", "cell_type", "index"):
        assert item[key].dtype == torch.int64 and item[key].ndim == 0
    assert item["index"].item() == 7
    r = row(ds.frame, 7)
    np.testing.assert_array_equal(item["image"].numpy(), pil_site(small_synthetic, r))


def test_labels_and_cell_types_index_into_their_lists(small_synthetic, wells, treatment):
    ds = make(small_synthetic, treatment, wells)
    labels = ds.labels()
    train = (ds.frame["dataset"] == "train").to_numpy()
    assert [ds.classes[i] for i in labels[train]] == ds.frame.loc[train, "sirna"].tolist()
    assert (labels[~train] == -1).all() and (~train).any()          # test wells are unlabelled
    items = [ds[i] for i in range(0, len(ds), 37)]
    assert [ds.cell_types[it["cell_type"]] for it in items] == ds.frame["cell_type"].iloc[::37].tolist()
    assert [it["label"].item() for it in items] == labels[::37].tolist()


def test_an_unknown_label_names_its_id_code(small_synthetic, wells, sites):
    frame = pd.concat([sites[sites["well_type"] == "treatment"].head(4),
                       sites[sites["well_type"] == "negative_control"].head(1)])
    bad = frame["id_code"].iloc[-1]
    with pytest.raises(ValueError, match=rf"at id_code '{bad}'"):
        make(small_synthetic, frame, wells)     # a control label against the treatment class list


def test_normalization_none_scales_to_unit_range(small_synthetic, wells, treatment):
    ds = make(small_synthetic, treatment, wells, "none")
    batch = torch.utils.data.default_collate([ds[i] for i in range(3)])
    assert batch["mean"].eq(0).all() and batch["std"].eq(255).all()
    out = data.normalize_batch(batch["image"], batch["mean"], batch["std"])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, batch["image"].float() / 255)


def test_normalization_image_uses_each_sites_own_statistics(small_synthetic, wells, treatment):
    ds = make(small_synthetic, treatment, wells, "image")
    items = [ds[i] for i in (0, 5, 11)]
    for it in items:
        x = it["image"].numpy().reshape(6, -1).astype(np.float64)
        np.testing.assert_allclose(it["mean"].numpy(), x.mean(1), rtol=1e-5)
        np.testing.assert_allclose(it["std"].numpy(), np.maximum(x.std(1), 1.0), rtol=1e-5)
    batch = torch.utils.data.default_collate(items)
    out = data.normalize_batch(batch["image"], batch["mean"], batch["std"])
    assert out.shape == batch["image"].shape
    assert out.mean(dim=(2, 3)).abs().max() < 1e-4
    spread = batch["std"] > 1                        # where the floor did not apply, unit variance
    torch.testing.assert_close(out.std(dim=(2, 3), correction=0)[spread],
                               torch.ones(int(spread.sum())), rtol=1e-3, atol=1e-3)


def test_plate_statistics_are_the_plates_control_sites(small_synthetic, wells, sites, treatment, plate_stats):
    ds = make(small_synthetic, treatment, wells, "plate", plate_stats)
    for i in (0, len(ds) - 1):
        r = ds.frame.iloc[i]
        plate = sites[(sites["experiment"] == r["experiment"]) & (sites["plate"] == r["plate"])]
        controls = plate[plate["well_type"] != "treatment"]
        assert 0 < len(controls) < data._STAT_SITES
        mean, std = direct_stats(small_synthetic, controls)
        np.testing.assert_allclose(ds[i]["mean"].numpy(), mean, rtol=1e-5)
        np.testing.assert_allclose(ds[i]["std"].numpy(), std, rtol=1e-5)
        all_mean, _ = direct_stats(small_synthetic, plate)
        assert not np.allclose(all_mean, mean, rtol=1e-3)    # 'controls' really excluded the treatments


def test_experiment_statistics_and_the_all_wells_source(small_synthetic, sites):
    experiment = sites["experiment"].iloc[0]
    exp_sites = sites[sites["experiment"] == experiment]
    stats = data.compute_norm_stats(small_synthetic, exp_sites, by="experiment", progress=False)
    mean, std = direct_stats(small_synthetic, exp_sites[exp_sites["well_type"] != "treatment"])
    got_mean, got_std = stats.lookup(experiment, 3)          # any plate of the experiment
    np.testing.assert_allclose(got_mean, mean, rtol=1e-5)
    np.testing.assert_allclose(got_std, std, rtol=1e-5)
    plate1 = exp_sites[exp_sites["plate"] == 1]
    every = data.compute_norm_stats(small_synthetic, plate1, by="plate", source="all", progress=False)
    np.testing.assert_allclose(every.lookup(experiment, 1)[0], direct_stats(small_synthetic, plate1)[0], rtol=1e-5)


def test_plates_without_controls_fall_back_to_all_their_wells(small_synthetic, treatment):
    plate = treatment[(treatment["experiment"] == treatment["experiment"].iloc[0]) & (treatment["plate"] == 2)]
    stats = data.compute_norm_stats(small_synthetic, plate, by="plate", source="controls", progress=False)
    np.testing.assert_allclose(stats.lookup(plate["experiment"].iloc[0], 2)[0],
                               direct_stats(small_synthetic, plate)[0], rtol=1e-5)


@pytest.mark.parametrize("by", ["plate", "experiment"])
def test_norm_stats_save_load_roundtrip(tmp_path, small_synthetic, sites, plate_stats, by):
    stats = plate_stats if by == "plate" else data.compute_norm_stats(small_synthetic, sites, by=by,
                                                                      progress=False)
    path = tmp_path / f"{by}.csv"
    stats.save(path)
    loaded = data.load_norm_stats(path, by, stats.source)
    pairs = sites[["experiment", "plate"]].drop_duplicates()
    assert len(loaded.table) == (len(pairs) if by == "plate" else pairs["experiment"].nunique())
    for e, p in pairs.itertuples(index=False):
        for got, want in zip(loaded.lookup(e, p), stats.lookup(e, p)):
            np.testing.assert_array_equal(got, want)


def test_norm_stats_errors_name_the_problem(tmp_path, plate_stats):
    with pytest.raises(KeyError, match="NOPE-01"):
        plate_stats.lookup("NOPE-01", 1)
    path = tmp_path / "stats.csv"
    plate_stats.table.reset_index().drop(columns=["plate"]).to_csv(path, index=False)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*\['plate'\]"):
        data.load_norm_stats(path, "plate", "controls")


def test_parameter_errors_are_named(small_synthetic, wells, treatment, sites, plate_stats):
    with pytest.raises(ValueError, match="normalization"):
        make(small_synthetic, treatment, wells, "batch")
    with pytest.raises(ValueError, match="experiment statistics"):
        make(small_synthetic, treatment, wells, "experiment", plate_stats)
    with pytest.raises(ValueError, match="plate statistics"):
        make(small_synthetic, treatment, wells, "plate", None)
    with pytest.raises(ValueError, match="unit"):
        make(small_synthetic, treatment, wells, unit="plate")
    with pytest.raises(ValueError, match="'well'"):
        data.compute_norm_stats(small_synthetic, sites, by="well", progress=False)
    with pytest.raises(ValueError, match="norm_source"):
        data.compute_norm_stats(small_synthetic, sites, source="treatments", progress=False)


def test_well_unit_stacks_the_sites(small_synthetic, wells, treatment):
    first_sites = treatment[treatment["site"] == 1].head(6)
    ds = make(small_synthetic, first_sites, wells, "image", unit="well")
    item = ds[2]
    r = row(ds.frame, 2)
    assert item["image"].shape == (2, 6, 16, 16)
    np.testing.assert_array_equal(item["image"][0].numpy(), pil_site(small_synthetic, r))
    np.testing.assert_array_equal(item["image"][1].numpy(), pil_site(small_synthetic, r._replace(site=2)))
    both = item["image"].numpy().transpose(1, 0, 2, 3).reshape(6, -1).astype(np.float64)
    np.testing.assert_allclose(item["mean"].numpy(), both.mean(1), rtol=1e-5)   # statistics over both sites
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    out = data.normalize_batch(batch["image"], batch["mean"], batch["std"])
    assert out.shape == (2, 2, 6, 16, 16) and out.mean(dim=(1, 3, 4)).abs().max() < 1e-4


def real_sites(real_wells, experiment: str = "HEPG2-01", site: int = 1) -> pd.DataFrame:
    return metadata.expand_sites(real_wells[real_wells["id_code"] == f"{experiment}_1_B02"], sites=(site,))


def real_dataset(real_wells, frame, **kwargs) -> data.SiteDataset:
    return data.SiteDataset(REAL_IMAGES, frame, metadata.class_list(real_wells, include_controls=True),
                            metadata.cell_types(real_wells), normalization="none", **kwargs)


def test_image_size_resizes_by_area_averaging(real_wells):
    ds = real_dataset(real_wells, real_sites(real_wells), image_size=128)
    small = ds[0]["image"].numpy().astype(np.int64)
    full = pil_site(REAL_IMAGES, row(ds.frame, 0)).astype(np.float64)
    block_mean = full.reshape(6, 128, 4, 128, 4).mean(axis=(2, 4))
    assert small.shape == (6, 128, 128)
    assert np.abs(small - block_mean).max() <= 1
    assert np.abs(small - full[:, ::4, ::4]).max() > 1     # averaged, not subsampled


def test_a_real_site_with_missing_channels_names_the_file(real_wells):
    ds = real_dataset(real_wells, real_sites(real_wells, "U2OS-01", site=2))
    missing = rio.image_path("train", "U2OS-01", 1, "B02", 2, 5, str(REAL_IMAGES))
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        ds[0]
    four = real_dataset(real_wells, real_sites(real_wells, "U2OS-01", site=2), channels=(1, 2, 3, 4))
    assert four[0]["image"].shape == (4, 512, 512)


def test_a_channel_of_another_size_names_the_file(tmp_path, small_synthetic, wells, treatment):
    r = treatment.iloc[0]
    root = copy_plate(small_synthetic, tmp_path / "d", r)
    path = rio.image_path(r["dataset"], r["experiment"], r["plate"], r["well"], 1, 3, str(root))
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(path)
    ds = make(root, treatment.iloc[:1], wells)
    with pytest.raises(ValueError, match=re.escape(path)):
        ds[0]


def test_a_site_of_another_size_names_the_file_unless_resized(tmp_path, small_synthetic, wells, treatment):
    frame = treatment[treatment["experiment"] == treatment["experiment"].iloc[0]].head(4).reset_index(drop=True)
    r = frame.iloc[3]                      # the second site of the second well
    assert r["site"] == 2 and frame["plate"].nunique() == 1
    root = copy_plate(small_synthetic, tmp_path / "d", r)
    for c in range(1, 7):
        path = rio.image_path(r["dataset"], r["experiment"], r["plate"], r["well"], 2, c, str(root))
        Image.fromarray(np.full((32, 32), 10 * c, np.uint8)).save(path)
    odd = re.escape(rio.image_path(r["dataset"], r["experiment"], r["plate"], r["well"], 2, 1, str(root)))
    # a cache packs every site into one shape: the odd site is named, with the way out
    with pytest.raises(ValueError, match=odd + ".*image_size"):
        make(root, frame, wells).use_cache(tmp_path / "cache", progress=False)
    # so is a well whose second site has another size than its first
    well_ds = make(root, frame[frame["site"] == 1], wells, unit="well")
    with pytest.raises(ValueError, match=odd):
        well_ds[1]
    resized = make(root, frame, wells, image_size=16).use_cache(tmp_path / "cache", progress=False)
    assert resized[3]["image"].shape == (6, 16, 16)
    assert resized[3]["image"][:, 0, 0].tolist() == [10 * c for c in range(1, 7)]


def test_packed_cache_returns_the_decoded_sites_and_is_reused(tmp_path, small_synthetic, wells, treatment,
                                                              monkeypatch):
    frame = treatment.iloc[:24]
    ds = make(small_synthetic, frame, wells).use_cache(tmp_path, progress=False)
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds[i]["image"].numpy(),
                                      pil_site(small_synthetic, row(frame, i)))
    packed = sorted(tmp_path.glob("*.u8"))
    assert len(packed) == 1 and packed[0].stat().st_size == 24 * 6 * 16 * 16
    stamp = packed[0].stat().st_mtime_ns

    again = make(small_synthetic, frame, wells)
    monkeypatch.setattr(again, "read", lambda *a, **k: pytest.fail("the cache was rebuilt"))
    again.use_cache(tmp_path, progress=False)
    assert again.cache.path == packed[0] and packed[0].stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again[5]["image"].numpy(), ds[5]["image"].numpy())

    key = data.PackedCache.key
    base = key(small_synthetic, frame, ds.channels, 0)
    assert base == key(small_synthetic, frame.copy(), ds.channels, 0)
    assert base != key(small_synthetic, frame, ds.channels, 8)                  # another image_size
    assert base != key(small_synthetic, frame.iloc[::-1], ds.channels, 0)       # another order of sites
    assert base != key(small_synthetic, frame, (1, 2, 3), 0)                    # other channels
    resized = make(small_synthetic, frame, wells, image_size=8).use_cache(tmp_path, progress=False)
    assert resized.cache.path != packed[0] and resized[0]["image"].shape == (6, 8, 8)


def test_an_empty_dataset_caches_nothing(tmp_path, small_synthetic, wells, treatment):
    ds = make(small_synthetic, treatment.iloc[:0], wells).use_cache(tmp_path, progress=False)  # a final fit's val
    assert len(ds) == 0 and ds.cache is None and not list(tmp_path.iterdir())


def test_a_well_cache_holds_both_sites_and_is_not_a_site_cache(tmp_path, small_synthetic, wells, treatment):
    first_sites = treatment[treatment["site"] == 1].head(5)
    sites_ds = make(small_synthetic, first_sites, wells).use_cache(tmp_path, progress=False)
    wells_ds = make(small_synthetic, first_sites, wells, unit="well").use_cache(tmp_path, progress=False)
    assert wells_ds.cache.path != sites_ds.cache.path
    for i in range(len(wells_ds)):
        assert wells_ds[i]["image"].shape == (2, 6, 16, 16)
        np.testing.assert_array_equal(wells_ds[i]["image"].numpy(), wells_ds.read(i))
        np.testing.assert_array_equal(wells_ds[i]["image"][0].numpy(), sites_ds[i]["image"].numpy())


@pytest.mark.parametrize("cached", [False, True])
def test_dataloader_with_two_workers(tmp_path, small_synthetic, wells, treatment, plate_stats, cached):
    ds = make(small_synthetic, treatment.iloc[:20], wells, "plate", plate_stats)
    if cached:
        ds.use_cache(tmp_path, progress=False)
    batches = list(DataLoader(ds, batch_size=6, num_workers=2, shuffle=False))
    assert [len(b["index"]) for b in batches] == [6, 6, 6, 2]
    images = torch.cat([b["image"] for b in batches])
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(20))
    assert torch.equal(images, torch.stack([ds[i]["image"] for i in range(20)]))
    assert torch.cat([b["label"] for b in batches]).tolist() == ds.labels()[:20].tolist()
    assert torch.equal(torch.cat([b["mean"] for b in batches]), torch.stack([ds[i]["mean"] for i in range(20)]))


def test_a_failed_cache_build_names_the_file_and_leaves_no_partial_cache(small_synthetic, wells, treatment,
                                                                         tmp_path):
    # the last site's files are absent (a site 3 the dataset does not have): the build fails at the end
    last = treatment.iloc[[-1]].assign(site=3)
    ds = make(small_synthetic, pd.concat([treatment, last], ignore_index=True), wells)
    broken = f"{last['well'].iloc[0]}_s3_w1.png"
    with pytest.raises(FileNotFoundError, match=broken):
        data.PackedCache.build(tmp_path / "cache", ds, progress=False)
    assert list((tmp_path / "cache").iterdir()) == []
