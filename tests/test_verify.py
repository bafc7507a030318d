"""`verify`: every problem of a Kaggle-layout folder listed, in both modes, on broken copies."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from kernel_lib import metadata, verify

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def broken(small_synthetic_copy) -> tuple[Path, dict[str, str]]:
    """A copy of the small synthetic set with one of each fault; returns (folder, fault -> path)."""
    data = small_synthetic_copy
    pngs = sorted(data.rglob("*.png"))
    faults = {name: pngs[i].relative_to(data).as_posix()
              for name, i in (("missing", 3), ("truncated", 50), ("not_png", 100), ("odd", 150), ("deep", 200),
                              ("missing2", 250))}
    raw = (data / faults["truncated"]).read_bytes()
    for name in faults:  # the copy's PNGs are links to the session's: unlink, then write anew
        (data / faults[name]).unlink()
    (data / faults["truncated"]).write_bytes(raw[:40])          # header intact, pixels gone
    (data / faults["not_png"]).write_bytes(b"GIF89a" + b"\0" * 40)
    cv2.imwrite(str(data / faults["odd"]), np.zeros((20, 20), np.uint8))
    cv2.imwrite(str(data / faults["deep"]), np.zeros((16, 16), np.uint16))
    return data, faults


def test_a_clean_dataset_passes_both_modes(small_synthetic):
    for mode in verify.MODES:
        report = verify.verify_dataset(small_synthetic, mode, workers=1, progress=False)
        n_sites = 2 * sum(len(pd.read_csv(small_synthetic / f)) for f in
                          ("train.csv", "test.csv", "train_controls.csv", "test_controls.csv"))
        assert report.ok and report.files == 6 * n_sites and report.usual_size == (16, 16), report.summary()


@pytest.mark.slow  # starts a process pool
def test_every_fault_is_listed_quick_and_full(broken):
    data, faults = broken
    quick = verify.verify_dataset(data, "quick", workers=2, progress=False)
    assert sorted(quick.missing) == sorted([faults["missing"], faults["missing2"]])
    unreadable = dict(quick.unreadable)
    assert set(unreadable) == {faults["not_png"], faults["deep"]}          # the header says so
    assert "bit depth 16" in unreadable[faults["deep"]]
    assert quick.odd_sized == [(faults["odd"], (20, 20))]
    full = verify.verify_dataset(data, "full", workers=1, progress=False)
    assert set(dict(full.unreadable)) == {faults["not_png"], faults["deep"], faults["truncated"]}
    assert "does not decode" in dict(full.unreadable)[faults["truncated"]]
    table = full.problems()
    assert len(table) == 6 and set(table["problem"]) == {"missing", "unreadable", "odd_sized"}
    assert not full.ok and faults["odd"] in full.summary()


def test_sample_submission_disagreeing_with_test_csv_is_listed(small_synthetic_csvs):
    data = small_synthetic_csvs
    sample = pd.read_csv(data / "sample_submission.csv")
    sample.iloc[1:].to_csv(data / "sample_submission.csv", index=False)
    report = verify.verify_dataset(data, "quick", workers=1, progress=False)
    assert len(report.csv_problems) == 1 and sample["id_code"].iloc[0] in report.csv_problems[0]


def test_broken_csv_stops_with_the_file_named(small_synthetic_csvs):
    data = small_synthetic_csvs
    train = pd.read_csv(data / "train.csv")
    train.drop(columns="well").to_csv(data / "train.csv", index=False)
    with pytest.raises(ValueError, match="train.csv: missing column"):
        verify.verify_dataset(data, progress=False)


@pytest.mark.slow
def test_command_line_exit_code_and_report(broken, tmp_path):
    data, faults = broken
    out = subprocess.run([sys.executable, str(REPO / "run_all.py"), "verify", "--data", str(data), "--full",
                          "--report", str(tmp_path / "problems.csv")], capture_output=True, text=True)
    assert out.returncode == 1 and "2 missing, 3 unreadable, 1 odd-sized" in out.stdout
    assert set(pd.read_csv(tmp_path / "problems.csv")["path"]) == set(faults.values())


def test_png_header_reads_size_depth_and_colour():
    ok, buf = cv2.imencode(".png", np.zeros((7, 9), np.uint8))
    assert verify.png_header(buf.tobytes()[:26]) == (7, 9, 8, 0)
    assert verify.png_header(b"\x89PNG\r\n\x1a\n" + b"\0" * 10) is None


@pytest.mark.slow
def test_a_training_stage_verifies_the_pngs_it_reads_before_training(broken, tmp_path):
    from kernel_lib import train_stage
    from kernel_lib.config import TrainConfig

    data, faults = broken
    cfg = TrainConfig(stage="resnet50", data_dir=str(data), output_dir=str(tmp_path / "out"), verify="quick")
    with pytest.raises(ValueError) as err:
        train_stage.load_data(cfg)
    message = str(err.value)
    assert "verify='quick'" in message and faults["missing"] in message and faults["odd"] in message
    assert "run_all.py verify" in message


@pytest.mark.slow  # starts a process pool
def test_auto_workers_start_processes_only_when_the_files_repay_them(small_synthetic, tmp_path):
    """workers=0: a chain stage's few thousand PNGs are checked in this process (a spawned pool
    cost more than the work); decoding (full) 4,200 files is worth a process per core."""
    sites = metadata.expand_sites(metadata.read_wells(small_synthetic))
    files = verify.site_rows_files(small_synthetic, sites)
    quick = verify.verify_files(small_synthetic, files, "quick", progress=False)
    assert quick.workers == 1 and quick.ok and quick.files == len(files)
    absent = [str(tmp_path / f"absent_{k}.png") for k in range(4200)]
    full = verify.verify_files(tmp_path, absent, "full", progress=False)
    assert full.workers == min(os.cpu_count() or 1, 2) and len(full.missing) == 4200
