"""rxrx_io against the real RxRx1 fixtures: paths, PNG reading (checked with PIL, an independent
decoder), the official RGB rendering (re-derived here from its formula) and combine_metadata."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kernel_lib import rxrx_io as rio

FIXTURES = Path(__file__).parent / "fixtures" / "rxrx1"
IMAGES = FIXTURES / "images"
METADATA = FIXTURES / "metadata"
SITES = [("train", "HEPG2-01"), ("train", "HUVEC-01"), ("train", "RPE-01"), ("train", "U2OS-01"),
         ("test", "HEPG2-08")]
# the official rxrx.io display map (rxrx1-utils, rxrx/io.py): channel -> (colour, display range)
OFFICIAL_RGB_MAP = {1: ([19, 0, 249], (0, 51)), 2: ([42, 255, 31], (0, 107)), 3: ([255, 0, 25], (0, 64)),
                    4: ([45, 255, 252], (0, 191)), 5: ([250, 0, 253], (0, 89)), 6: ([254, 255, 40], (0, 191))}


def pil_channel(dataset: str, experiment: str, site: int, channel: int, base: Path = IMAGES) -> np.ndarray:
    path = base / dataset / experiment / "Plate1" / f"B02_s{site}_w{channel}.png"
    return np.array(Image.open(path))


def official_rgb(t: np.ndarray, channels, vmax: float = 255) -> np.ndarray:
    """The rxrx.io rendering written out from its formula, pixel arithmetic in float64."""
    total = np.zeros((*t.shape[:2], 3), dtype=np.int64)
    for i, ch in enumerate(channels):
        colour, (lo, hi) = OFFICIAL_RGB_MAP[ch]
        x = (t[:, :, i].astype(np.float64) / vmax) / ((hi - lo) / 255.0) + lo / 255.0
        x = np.where(x > 1.0, 1.0, x)
        for k in range(3):
            total[:, :, k] += np.trunc(x * colour[k]).astype(np.int64)
    return np.where(total > 255, 255, total)


def copy_plate(tmp_path: Path, dataset: str = "train", experiment: str = "HEPG2-01") -> Path:
    """A writable copy of one fixture plate folder; returns the images root of the copy."""
    src = IMAGES / dataset / experiment / "Plate1"
    shutil.copytree(src, tmp_path / dataset / experiment / "Plate1")
    return tmp_path


def test_image_path_is_the_kaggle_layout():
    assert rio.image_path("train", "HUVEC-01", 3, "B02", 2, 5, "/data/rxrx1") == \
        "/data/rxrx1/train/HUVEC-01/Plate3/B02_s2_w5.png"


@pytest.mark.parametrize("dataset,experiment", SITES)
def test_load_site_equals_per_channel_pil_reads(dataset, experiment):
    x = rio.load_site(dataset, experiment, 1, "B02", 1, base_path=str(IMAGES))
    expected = np.stack([pil_channel(dataset, experiment, 1, c) for c in range(1, 7)], axis=-1)
    assert x.shape == (512, 512, 6) and x.dtype == np.uint8
    np.testing.assert_array_equal(x, expected)
    # the channels really differ, so the equality above also pins their order
    assert all(not np.array_equal(x[..., 0], x[..., c]) for c in range(1, 6))


def test_load_site_channel_subset_keeps_the_requested_order():
    x = rio.load_site("train", "RPE-01", 1, "B02", 1, channels=(5, 1, 3), base_path=str(IMAGES))
    assert x.shape == (512, 512, 3)
    for i, c in enumerate((5, 1, 3)):
        np.testing.assert_array_equal(x[..., i], pil_channel("train", "RPE-01", 1, c))


def test_load_site_reads_the_four_channels_that_site_2_has():
    x = rio.load_site("test", "HEPG2-08", 1, "B02", 2, channels=(1, 2, 3, 4), base_path=str(IMAGES))
    np.testing.assert_array_equal(x[..., 3], pil_channel("test", "HEPG2-08", 2, 4))


def test_convert_tensor_to_rgb_hand_computed_pixels():
    # channel 1 (colour 19,0,249, range 0-51), channel 2 (colour 42,255,31, range 0-107)
    t = np.array([[[51, 0], [255, 107], [10, 20]]], dtype=np.uint8)   # (1, 3, 2)
    rgb = rio.convert_tensor_to_rgb(t, channels=(1, 2))
    # pixel 0: channel 1 at the top of its range -> its colour, channel 2 dark
    # pixel 1: both saturated -> 19+42, 0+255, 249+31 capped at 255
    # pixel 2: 10/51 and 20/107 of each colour, each truncated before the sum:
    #          (3 + 7, 0 + 47, 48 + 5); rounding, or truncating after the sum, gives other values
    assert rgb.tolist() == [[[19, 0, 249], [61, 255, 255], [10, 47, 53]]]


@pytest.mark.parametrize("dataset,experiment", SITES[:2])
def test_convert_tensor_to_rgb_matches_the_official_formula_on_a_real_site(dataset, experiment):
    t = np.stack([pil_channel(dataset, experiment, 1, c) for c in range(1, 7)], axis=-1)
    rgb = rio.convert_tensor_to_rgb(t)
    expected = official_rgb(t, range(1, 7))
    assert rgb.shape == (512, 512, 3)
    np.testing.assert_array_equal(rgb, expected)
    assert 0 < (expected == 255).mean() < 1   # the cap is exercised, not every pixel saturated


def test_convert_tensor_to_rgb_honours_vmax_and_a_channel_subset():
    t = np.stack([pil_channel("train", "U2OS-01", 1, c) for c in (4, 6)], axis=-1)
    np.testing.assert_array_equal(rio.convert_tensor_to_rgb(t, channels=(4, 6), vmax=128),
                                  official_rgb(t, (4, 6), vmax=128))


def test_load_site_as_rgb_renders_the_pil_read_site():
    rgb = rio.load_site_as_rgb("train", "HUVEC-01", 1, "B02", 1, base_path=str(IMAGES))
    t = np.stack([pil_channel("train", "HUVEC-01", 1, c) for c in range(1, 7)], axis=-1)
    np.testing.assert_array_equal(rgb, official_rgb(t, range(1, 7)))


@pytest.mark.slow  # the real metadata through rxrx.io's combine
def test_combine_metadata_on_the_real_metadata():
    md = rio.combine_metadata(str(METADATA))
    n_wells = 36515 + 19897 + 4097 + 2246           # the four Kaggle CSVs
    assert len(md) == 2 * n_wells == 125510
    assert md.index.name == "id_code"
    assert list(md.columns) == ["cell_type", "dataset", "experiment", "plate", "site", "sirna", "well", "well_type"]
    assert md["sirna"].dtype == np.float64
    assert md["site"].value_counts().to_dict() == {1: n_wells, 2: n_wells}
    test_treat = (md["dataset"] == "test") & (md["well_type"] == "treatment")
    assert md["sirna"].isna().equals(test_treat)
    assert test_treat.sum() == 2 * 19897
    row = md.loc["HEPG2-01_1_B03"]                  # train.csv's first row: sirna 513
    assert row["sirna"].tolist() == [513.0, 513.0] and sorted(row["site"]) == [1, 2]
    assert row["cell_type"].iloc[0] == "HEPG2" and row["plate"].iloc[0] == 1
    control = md.loc["HEPG2-08_1_B02"]              # a test negative control keeps its label
    assert control["sirna"].tolist() == [1138.0, 1138.0]
    assert set(control["well_type"]) == {"negative_control"} and set(control["dataset"]) == {"test"}
    assert md["experiment"].nunique() == 51 and set(md["cell_type"]) == {"HEPG2", "HUVEC", "RPE", "U2OS"}


def test_combine_metadata_without_controls():
    md = rio.combine_metadata(str(METADATA), include_controls=False)
    assert len(md) == 2 * (36515 + 19897)
    assert set(md["well_type"]) == {"treatment"}


def test_combine_metadata_keeps_string_labels_as_strings(string_vocabulary):
    folder, mapping = string_vocabulary
    md = rio.combine_metadata(str(folder))
    assert md["sirna"].dtype == object
    assert md.loc["HEPG2-01_1_B03", "sirna"].tolist() == [mapping["513"]] * 2
    assert md.loc["HEPG2-08_1_B02", "sirna"].tolist() == ["UNTREATED"] * 2
    test_treat = (md["dataset"] == "test") & (md["well_type"] == "treatment")
    assert md["sirna"].isna().equals(test_treat)


def test_a_missing_channel_file_is_named(tmp_path):
    # site 2 of the fixtures has channels 1-4 only: a real missing-channel case
    missing = rio.image_path("train", "HEPG2-01", 1, "B02", 2, 5, str(IMAGES))
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        rio.load_site("train", "HEPG2-01", 1, "B02", 2, base_path=str(IMAGES))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "signature_only"])
def test_an_unreadable_png_is_a_value_error_naming_the_file(tmp_path, damage):
    root = copy_plate(tmp_path)
    path = Path(rio.image_path("train", "HEPG2-01", 1, "B02", 1, 3, str(root)))
    good = path.read_bytes()
    bad = {"garbage": np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes(),
           "truncated": good[:len(good) // 2],
           "empty": b"",
           "signature_only": good[:8]}[damage]
    path.write_bytes(bad)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        rio.load_site("train", "HEPG2-01", 1, "B02", 1, base_path=str(root))


def test_a_channel_of_another_size_is_named(tmp_path):
    root = copy_plate(tmp_path)
    path = Path(rio.image_path("train", "HEPG2-01", 1, "B02", 1, 4, str(root)))
    Image.fromarray(np.zeros((256, 512), np.uint8)).save(path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        rio.load_site("train", "HEPG2-01", 1, "B02", 1, base_path=str(root))


def test_a_16_bit_png_is_refused_naming_the_file(tmp_path):
    root = copy_plate(tmp_path)
    path = Path(rio.image_path("train", "HEPG2-01", 1, "B02", 1, 2, str(root)))
    Image.fromarray(np.full((512, 512), 1000, np.uint16)).save(path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        rio.load_site("train", "HEPG2-01", 1, "B02", 1, base_path=str(root))
