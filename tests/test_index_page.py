"""One final kernel, one report (index_page.py): the merge writes the chain's index page into its
own output from its input folders, figures and notebooks copied in so that every link works; the
merge lists eda and base_cnn as upstream for that page and ignores them for the submission."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from kernel_lib import index_page, kaggle_build, merge_stage, metadata, parameters, synthetic
from kernel_lib.outputs import read_metrics, write_json
from kernel_lib.predictions import save_predictions
from kernel_lib.registry import get_stage
from benchmarks.simulate import write_simulated_stages

PNG = b"\x89PNG\r\n\x1a\n fake"


def links(page: Path) -> list[str]:
    return re.findall(r"(?:href|src)='([^']+)'", page.read_text())


def kaggle_inputs(root: Path) -> Path:
    """/kaggle/input as the merge kernel sees it: each source kernel's output in its own folder."""
    inputs = root / "input"
    eda = inputs / "notebooks" / "me" / "rxrx1-eda"
    eda.mkdir(parents=True)
    write_json(eda / "metrics.json", {"stage": "eda", "finished": True, "warnings": ["[eda] 3 sites missing"]})
    (eda / "plate_map_HEPG2-01_well_type.png").write_bytes(PNG + b"eda")
    (eda / "__notebook__.ipynb").write_text("{}")
    (eda / "__results__.html").write_text("<html>eda</html>")
    base = inputs / "notebooks" / "me" / "rxrx1-base-cnn-chunk-2"
    base.mkdir(parents=True)
    write_json(base / "metrics.json", {"stage": "base_cnn", "finished": True, "chunks": 2, "val_acc_well": 0.41234,
                                       "wall_time_s": {"chunk": 10.0, "total": 3600.04}, "split": "experiment:X"})
    (base / "loss.png").write_bytes(PNG + b"loss")
    (base / "__notebook__.ipynb").write_text("{}")  # no __results__.html: the ipynb only
    return inputs


def test_the_merge_index_links_only_files_inside_its_output(tmp_path):
    inputs = kaggle_inputs(tmp_path)
    out = tmp_path / "working"
    out.mkdir()
    write_json(out / "metrics.json", {"stage": "merge", "finished": True, "test_accuracy": 0.9, "val_acc_well": 0.8})
    (out / "submission.csv").write_text("id_code,sirna\n")
    pd.DataFrame({"experiment": ["HEPG2-08"], "rotation": [1], "mass": [3.0], "runner_up": [1.0],
                  "margin": [0.75]}).to_csv(out / "test_rotations.csv", index=False)
    (out / "test_plate_map_HEPG2-08.png").write_bytes(PNG)

    page = index_page.write_merge_index(out, [inputs], data_dir="/kaggle/input/competitions/rxrx1")
    assert page == out / "index.html"
    found = links(page)
    assert found and all((out / link).is_file() for link in found), [l for l in found if not (out / l).is_file()]
    assert all(not link.startswith(("/", "..")) for link in found)
    # upstream files are copied beside the page, byte for byte
    assert (out / "stages" / "eda" / "plate_map_HEPG2-01_well_type.png").read_bytes() == PNG + b"eda"
    assert (out / "stages" / "base_cnn" / "loss.png").read_bytes() == PNG + b"loss"
    assert {"submission.csv", "test_plate_map_HEPG2-08.png", "stages/eda/__results__.html",
            "stages/eda/__notebook__.ipynb", "stages/base_cnn/__notebook__.ipynb"} <= set(found)
    assert "stages/base_cnn/__results__.html" not in found
    table = index_page.summary_from_folders(index_page.stage_folders([inputs], own={"merge": out}))
    assert table.to_html(na_rep="") in page.read_text()
    assert list(table.index) == ["eda", "base_cnn", "merge"]
    assert table.loc["base_cnn", "chunks"] == 2 and table.loc["base_cnn", "wall_s"] == 3600.0
    assert table.loc["base_cnn", "val_acc_well"] == 0.4123 and table.loc["merge", "test_acc"] == 0.9
    assert table.loc["eda", "warnings"] == 1 and "<b>eda</b>: 3 sites missing" in page.read_text()
    assert "HEPG2-08" in page.read_text() and "0.750" in page.read_text()
    # no metrics.json is copied: the copies are never mistaken for a stage's folder
    assert not list((out / "stages").rglob("metrics.json"))


def test_the_local_chain_page_links_the_stage_folders_in_place(tmp_path):
    out = tmp_path / "out"
    for name in ("eda", "base_cnn"):
        (out / name).mkdir(parents=True)
        write_json(out / name / "metrics.json", {"stage": name, "finished": True})
    (out / "eda" / "plate_map_A.png").write_bytes(PNG)
    (out / "base_cnn" / "base_cnn_chunk1.ipynb").write_text("{}")
    folders = {n: out / n for n in ("eda", "base_cnn")}
    page = index_page.write_index_page(out, folders, index_page.summary_from_folders(folders), "DATA", "smoke")
    assert set(links(page)) == {"eda/plate_map_A.png", "base_cnn/base_cnn_chunk1.html", "base_cnn/base_cnn_chunk1.ipynb"}
    assert not (out / "stages").exists()
    assert "profile: smoke" in page.read_text()


def test_the_merge_reads_eda_and_base_cnn_for_its_page_only():
    merge = get_stage("merge")
    assert merge.upstream[:3] == ("eda", "base_cnn", "resnet50")
    params = parameters.stage_params(merge, "synthetic", {}, 0.0)
    assert params["stages"] == ["cell_line_hepg2", "cell_line_huvec", "cell_line_rpe", "cell_line_u2os"]
    plans = {p.slug: p for p in kaggle_build.plan_kernels(max_chunks=2)}
    assert plans["rxrx1-merge"].sources[:3] == ("rxrx1-eda", "rxrx1-base-cnn-chunk-2", "rxrx1-resnet50-chunk-2")


@pytest.fixture(scope="module")
def stage_outputs(small_synthetic, tmp_path_factory):
    """The cell lines' and resnet50's prediction files (simulated), and eda/base_cnn folders."""
    data = small_synthetic
    root = tmp_path_factory.mktemp("stage_outputs")
    cell_types = metadata.cell_types(metadata.read_wells(data))
    write_simulated_stages(data, root, [(f"cell_line_{ct.lower()}", [ct]) for ct in cell_types]
                           + [("resnet50", cell_types), ("base_cnn", cell_types)], top1=0.6)
    (root / "base_cnn" / "loss.png").write_bytes(PNG)
    (root / "eda").mkdir()
    write_json(root / "eda" / "metrics.json", {"stage": "eda", "finished": True})
    (root / "eda" / "plate_map_A.png").write_bytes(PNG)
    return data, root


@pytest.mark.slow  # two merges (plate groups, assignment, plate-map figures)
def test_eda_and_base_cnn_in_the_inputs_change_nothing_the_merge_computes(stage_outputs, tmp_path):
    data, root = stage_outputs
    without = tmp_path / "without"
    shutil.copytree(root, without, ignore=shutil.ignore_patterns("eda", "base_cnn"))
    a = merge_stage.merge_stage({"data_dir": str(data), "output_dir": str(tmp_path / "a"), "input_dirs": [str(without)]})
    b = merge_stage.merge_stage({"data_dir": str(data), "output_dir": str(tmp_path / "b"), "input_dirs": [str(root)]})
    assert (tmp_path / "a" / "submission.csv").read_bytes() == (tmp_path / "b" / "submission.csv").read_bytes()
    pd.testing.assert_frame_equal(a.validation_table, b.validation_table)
    assert read_metrics(tmp_path / "b")["sources"] == read_metrics(tmp_path / "a")["sources"]
    assert "base_cnn" not in read_metrics(tmp_path / "b")["sources"].values()
    # only the page differs: it shows the stages it found
    page = (tmp_path / "b" / "index.html").read_text()
    assert "stages/eda/plate_map_A.png" in page and "stages/base_cnn/loss.png" in page
    assert "stages/eda" not in (tmp_path / "a" / "index.html").read_text()
    assert all((tmp_path / "b" / link).is_file() for link in links(tmp_path / "b" / "index.html"))
