"""The notebooks and the papermill chain: clean committed notebooks, every stage executed with tiny
parameters, the recorded metrics checked against numbers derived independently from the data,
chunked training equal to the bit to one chunk, failures that name the notebook."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch

from kernel_lib import metadata, synthetic
from kernel_lib.chain import Chain, ChainError, select_stages, summary_table, write_index
from kernel_lib.parameters import parse_overrides
from kernel_lib.registry import PROFILES, STAGES, STAGE_NAMES

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted({s.notebook_path for s in STAGES})
TINY = synthetic.SyntheticSpec(image_size=16, sirnas_per_group=4, train_experiments=3, test_experiments=1,
                               positive_controls=2, seed=3)
# tiny stages; resnet50 is cut into chunks of 2 optimizer steps (several papermill executions)
TINY_PARAMS = {
    "all": {"num_workers": 0, "device": "cpu"},
    "eda": {"n_sites_per_experiment": 1},
    "base_cnn": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "max_train_sites": 0},
    "resnet50": {"epochs": 2, "batch_size": 16, "chunk_steps": 2, "image_size": 16},
    **{f"cell_line_{ct}": {"epochs": 1, "batch_size": 8, "image_size": 16, "max_train_sites": 0} for ct in ("hepg2", "huvec", "rpe", "u2os")},
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_is_clean_and_parameterised(path):
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} carries outputs"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and nb.cells.index(tagged[0]) == 1
    import papermill
    names = set(papermill.inspect_notebook(str(path)))
    # every literal line of the parameters cell is seen by papermill (a comment with '=' hides it)
    assigned = {line.split("=")[0].strip() for line in tagged[0].source.splitlines() if "=" in line}
    assert names == assigned and {"data_dir", "output_dir", "input_dirs"} <= names


def test_python3_kernel_resolves():
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    assert spec.language == "python"


def test_overrides_and_stage_selection():
    over = parse_overrides(["resnet50.lr=6e-4", "all.device=cpu", "merge.stages=[cell_line_rpe]"])
    assert over == {"resnet50": {"lr": 6e-4}, "all": {"device": "cpu"}, "merge": {"stages": ["cell_line_rpe"]}}
    with pytest.raises(ValueError, match="resnet5"):
        parse_overrides(["resnet5.lr=1"])
    with pytest.raises(ValueError, match="stage.name=value"):
        parse_overrides(["lr=1"])
    assert select_stages(start="cell_line_rpe") == ["cell_line_rpe", "cell_line_u2os", "merge"]
    assert select_stages(only="merge,eda") == ["eda", "merge"]


def test_unknown_parameter_is_refused_before_running(tmp_path):
    chain = Chain(data_dir=tmp_path, out=tmp_path / "out", profile="smoke",
                  overrides=parse_overrides(["resnet50.learning_rate=1"]))
    with pytest.raises(ValueError, match="learning_rate"):
        chain.params_for(next(s for s in STAGES if s.name == "resnet50"))
    chain.overrides = parse_overrides(["base_cnn.normalization=per-well"])
    with pytest.raises(ValueError, match="stage base_cnn: parameter 'normalization' must be one of"):
        chain.params_for(next(s for s in STAGES if s.name == "base_cnn"))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return synthetic.ensure(tmp_path_factory.mktemp("tiny"), TINY, progress=False)


@pytest.fixture(scope="module")
def chain_run(tiny_data, tmp_path_factory):
    """The whole chain on the tiny dataset, resnet50 in chunks."""
    out = tmp_path_factory.mktemp("chain")
    chain = Chain(data_dir=tiny_data, out=out, profile="smoke", overrides=TINY_PARAMS)
    runs = chain.run()
    return chain, runs


@pytest.mark.slow
def test_every_stage_finishes_and_records_its_metrics(chain_run, tiny_data):
    chain, runs = chain_run
    assert [r.stage for r in runs] == chain.stages == [s.name for s in STAGES if not s.optional]
    wells = metadata.read_wells(tiny_data)
    for name in chain.stages:
        m = json.loads((chain.stage_dir(name) / "metrics.json").read_text())
        assert m["finished"] is True
        assert m.get("stage", name) == name
    eda = json.loads((chain.stage_dir("eda") / "metrics.json").read_text())
    assert eda["n_experiments"] == wells["experiment"].nunique() == 16
    # the grouped split holds out one train experiment per cell type, and says so
    base = json.loads((chain.stage_dir("base_cnn") / "metrics.json").read_text())
    held = base["split"].removeprefix("experiment:").split(",")
    assert sorted(e.split("-")[0] for e in held) == ["HEPG2", "HUVEC", "RPE", "U2OS"]
    n_train_wells = ((wells["dataset"] == "train") & (wells["well_type"] == "treatment")
                     & ~wells["experiment"].isin(held)).sum()
    assert base["n_train"] == 2 * n_train_wells
    # a cell-line stage trains and validates on its cell type only, with the same held-out experiments
    rpe = json.loads((chain.stage_dir("cell_line_rpe") / "metrics.json").read_text())
    assert rpe["split"] == base["split"]
    n_rpe = ((wells["dataset"] == "train") & (wells["well_type"] == "treatment") & (wells["cell_type"] == "RPE")
             & ~wells["experiment"].isin(held)).sum()
    assert rpe["n_train"] == 2 * n_rpe
    assert list(rpe["val_acc_well_by_cell_type"]) == ["RPE"]


@pytest.mark.slow
def test_chunked_stage_ran_as_several_notebooks(chain_run):
    chain, runs = chain_run
    run = next(r for r in runs if r.stage == "resnet50")
    m = json.loads((chain.stage_dir("resnet50") / "metrics.json").read_text())
    steps_per_chunk = TINY_PARAMS["resnet50"]["chunk_steps"]
    assert run.chunks >= -(-m["steps_done"] // steps_per_chunk) >= 3
    for nb in run.notebooks:
        assert nb.is_file() and nb.with_suffix(".html").is_file()
    assert [nb.name for nb in run.notebooks] == [f"resnet50_chunk{i}.ipynb" for i in range(1, run.chunks + 1)]


@pytest.mark.slow
def test_chunked_weights_equal_one_chunk(chain_run, tiny_data, tmp_path):
    chain, _ = chain_run
    over = {k: dict(v) for k, v in TINY_PARAMS.items()}
    over["resnet50"].pop("chunk_steps")
    single = Chain(data_dir=tiny_data, out=tmp_path, profile="smoke", overrides=over)
    runs = single.run(["resnet50"])
    assert runs[0].chunks == 1
    a = torch.load(chain.stage_dir("resnet50") / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "resnet50" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "chunked run differs from one chunk"


@pytest.mark.slow
def test_submission_and_accuracy_tables(chain_run, tiny_data):
    chain, runs = chain_run
    sub = pd.read_csv(chain.out / "submission.csv", dtype=str)
    sample = pd.read_csv(tiny_data / "sample_submission.csv", dtype=str)
    assert list(sub.columns) == ["id_code", "sirna"]
    assert sub["id_code"].tolist() == sample["id_code"].tolist()
    classes = set(metadata.class_list(metadata.read_wells(tiny_data)))
    assert set(sub["sirna"]) <= classes
    truth = synthetic.read_test_truth(tiny_data).set_index("id_code")["sirna"]
    expected = float((sub.set_index("id_code")["sirna"] == truth.reindex(sub["id_code"])).mean())
    merge = json.loads((chain.stage_dir("merge") / "metrics.json").read_text())
    assert merge["test_accuracy"] == pytest.approx(expected)
    assert set(merge["sources"].values()) == {f"cell_line_{c}" for c in ("hepg2", "huvec", "rpe", "u2os")}
    modes = {"argmax", "plate_groups", "assignment"}
    assert modes <= set(merge["validation_table"][0]) and modes <= set(merge["test_table"][0])
    table = summary_table(chain, runs)
    assert table.loc["merge", "test_acc"] == pytest.approx(expected, abs=1e-4)
    index = write_index(chain, table).read_text()
    for nb in chain.out.glob("*/*_chunk*.html"):
        assert nb.relative_to(chain.out).as_posix() in index
    assert "plate_map" in index
    # after the merge: each test experiment's plates by inferred group, with its rotation and margin
    rotations = pd.read_csv(chain.stage_dir("merge") / "test_rotations.csv")
    assert rotations["experiment"].tolist() == sorted(sub["id_code"].str.rsplit("_", n=2).str[0].unique())
    for e in rotations["experiment"]:
        assert f"merge/test_plate_map_{e}.png" in index


@pytest.mark.slow
def test_rerun_skips_finished_and_failure_names_the_notebook(chain_run, tiny_data, tmp_path):
    chain, _ = chain_run
    again = Chain(data_dir=tiny_data, out=chain.out, profile="smoke", overrides=TINY_PARAMS)
    assert all(r.skipped and r.chunks == 0 for r in again.run(["eda", "merge"]))
    bad = Chain(data_dir=tiny_data, out=tmp_path, profile="smoke",
                overrides={**TINY_PARAMS, "base_cnn": {"init_from": str(tmp_path / "no_such_model.pt")}})
    with pytest.raises(ChainError) as err:
        bad.run(["base_cnn"])
    failed = tmp_path / "base_cnn" / "base_cnn_chunk1.ipynb"
    assert str(failed) in str(err.value) and "no_such_model.pt" in str(err.value)
    assert failed.is_file()


def test_run_all_list_shows_stages_and_parameters(capsys):
    import run_all  # the repository root is on sys.path (conftest.py)

    assert run_all.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in STAGE_NAMES:
        assert name in out
    assert "cell_type = 'RPE'" in out and "profile synthetic" in out
    resnet50 = out.split("\nresnet50  (")[1].split("\nfinal_fit")[0]
    assert f"    epochs = {PROFILES['synthetic']['resnet50']['epochs']}\n" in resnet50
    # -p overrides show as the chain would run them; a bad one is refused, naming it
    assert run_all.main(["--list", "-p", "resnet50.epochs=7", "-p", "all.lr=0.125"]) == 0
    more = capsys.readouterr().out
    assert "    epochs = 7" in more.split("resnet50  (")[1].split("\nfinal_fit")[0]
    assert more.count("lr = 0.125") == sum(1 for s in STAGES if s.trains)
    assert run_all.main(["--list", "-p", "cell_lines.epochs=1"]) == 2
    assert "unknown stage 'cell_lines'" in capsys.readouterr().err


@pytest.mark.slow
def test_final_fit_and_pseudo_labels_run_in_the_chain_and_the_second_merge_is_final(chain_run, tiny_data, tmp_path):
    """The optional stages on the finished tiny chain (copied): a final fit on every train
    experiment, reporting resnet50's validation; a pseudo-label stage on the merge's confident test
    wells; merge_pseudo averages both in and its submission becomes the chain's."""
    import shutil

    chain, _ = chain_run
    out = tmp_path / "out"
    shutil.copytree(chain.out, out)
    labels = pd.read_csv(out / "merge" / "pseudo_labels.csv", dtype={"id_code": str, "sirna": str})
    threshold = float(labels["probability"].median())
    tiny = {"epochs": 1, "batch_size": 8, "image_size": 16, "max_train_sites": 0}
    more = Chain(data_dir=tiny_data, out=out, profile="smoke", extra=("final_fit", "pseudo_label"),
                 overrides={**TINY_PARAMS, "final_fit": tiny, "pseudo_label": {**tiny, "pseudo_threshold": threshold}})
    assert more.stages[-3:] == ["merge", "pseudo_label", "merge_pseudo"] and more.final_merge == "merge_pseudo"
    more.run(["final_fit", "pseudo_label", "merge_pseudo"])
    read = lambda name: json.loads((out / name / "metrics.json").read_text())  # noqa: E731
    wells = metadata.read_wells(tiny_data)
    final, resnet = read("final_fit"), read("resnet50")
    n_train = ((wells["dataset"] == "train") & (wells["well_type"] == "treatment")).sum()
    assert final["n_train"] == 2 * n_train and final["n_val"] == 0  # the held-out experiments train too
    assert final["validation_from"] == "resnet50" and final["val_acc_well"] == resnet["val_acc_well"]
    assert final["split"] == f"all:no validation (validation: resnet50's {resnet['split']})"
    pseudo = read("pseudo_label")["pseudo_labels"]
    chosen = labels[labels["probability"] >= threshold]
    truth = synthetic.read_test_truth(tiny_data).set_index("id_code")["sirna"]
    assert pseudo["wells"] == len(chosen) > 0 and pseudo["of_wells"] == len(labels)
    assert pseudo["accuracy"] == pytest.approx((chosen["sirna"] == truth.loc[chosen["id_code"]].to_numpy()).mean())
    assert read("pseudo_label")["n_train"] == 2 * (
        n_train - len(wells[(wells["dataset"] == "train") & (wells["well_type"] == "treatment")
                            & wells["experiment"].isin(resnet["split"].removeprefix("experiment:").split(","))])
        + len(chosen))
    second = read("merge_pseudo")
    assert second["averaged"] == ["final_fit", "pseudo_label"] and "final_fit" in second["validation_note"]
    assert (out / "submission.csv").read_bytes() == (out / "merge_pseudo" / "submission.csv").read_bytes()
