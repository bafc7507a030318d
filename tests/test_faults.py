"""Faults and bad input (issue 12): no dead ends, no stale results, every message names its cause.

Fast tests drive the chain's logic with a stand-in for papermill (``fake_execute``: writes what a
stage's notebook writes) and the merge, EDA and parameter code in-process; the slow ones execute
real notebooks (a prediction step that fails and is resumed, a kernel killed mid-cell, the console
of a real execution, the EDA stage on the real metadata without images)."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch

from kernel_lib import chain as chain_mod
from kernel_lib import eda, merge_stage, metadata, plate_maps, synthetic
from kernel_lib.chain import Chain, ChainError, StageRun, StaleResultsError, select_stages, summary_table, write_index
from kernel_lib.config import CHUNK_PARAMS, TrainConfig
from kernel_lib.outputs import read_metrics, write_json
from kernel_lib.parameters import CONFIGS, notebook_params, parse_overrides, stage_params, with_stage_defaults
from kernel_lib.plates import infer_plate_groups
from kernel_lib.predictions import save_predictions
from kernel_lib.registry import Stage, get_stage
from kernel_lib.status import stage_state
from benchmarks.simulate import write_simulated_stages
from kernel_lib.submission import well_log_probs

REPO = Path(__file__).resolve().parent.parent
REAL = REPO / "tests" / "fixtures" / "rxrx1"


# ----------------------------------------------------------------- a stand-in for papermill

def _write_stage_outputs(stage: Stage, params: dict, warnings_in_nb=(), metrics_warnings=()) -> None:
    folder = Path(params["output_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    cfg = CONFIGS[stage.kind].from_params(with_stage_defaults(stage.name, params))
    write_json(folder / "config.json", cfg.to_dict())
    files = {"train": ("predictions_val.npz", "predictions_test.npz", "submission.csv"),
             "merge": ("submission.csv",), "eda": ()}[stage.kind]
    for name in files:
        (folder / name).write_text(f"written by {stage.name}\n")
    write_json(folder / "metrics.json", {"stage": stage.name, "finished": True, "predicted": True,
                                         "steps_done": 4, "warnings": list(metrics_warnings)})


def _write_notebook(nb: Path, stderr: str = "") -> None:
    cell = nbformat.v4.new_code_cell("pass")
    if stderr:
        cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text=stderr)]
    nb.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), str(nb))


@pytest.fixture
def fake_execute(monkeypatch):
    """Chain._execute replaced: records (stage, notebook) and writes the stage's done outputs;
    ``fail`` names stages whose 'notebook' fails."""
    calls, fail = [], set()

    def execute(self, stage, nb, params):
        calls.append((stage.name, nb.name))
        _write_notebook(nb)
        if stage.name in fail:
            raise ChainError(f"stage {stage.name} failed in {nb} (cell 3): RuntimeError: boom")
        _write_stage_outputs(stage, params)

    monkeypatch.setattr(Chain, "_execute", execute)
    return calls, fail


def _chain(tmp_path, **kw) -> Chain:
    data = tmp_path / "data"
    data.mkdir(parents=True, exist_ok=True)
    return Chain(data_dir=data, out=tmp_path / "out", profile="smoke", progress=False, **kw)


# ----------------------------------------------------------------- 1: done means predicted

def test_a_trained_but_unpredicted_stage_is_not_done_and_is_rerun(tmp_path, fake_execute):
    calls, _ = fake_execute
    chain = _chain(tmp_path)
    chain.run(["base_cnn"])
    folder = chain.stage_dir("base_cnn")
    assert chain.state("base_cnn") == "done"
    # the prediction step failed: metrics say finished (training), no predictions
    (folder / "predictions_test.npz").unlink()
    write_json(folder / "metrics.json", {**read_metrics(folder), "predicted": False})
    assert chain.state("base_cnn") == "trained" and not chain.finished("base_cnn")
    runs = chain.run(["base_cnn"])
    assert not runs[0].skipped and runs[0].chunks == 1 and chain.state("base_cnn") == "done"
    assert [c[0] for c in calls] == ["base_cnn", "base_cnn"]


# ----------------------------------------------------------------- 3: other data or parameters

def _done_folder(chain: Chain, name: str, **changes) -> None:
    params = {**chain.params_for(get_stage(name)), **changes}
    _write_stage_outputs(get_stage(name), params)


def test_a_rerun_with_other_parameters_or_data_stops_naming_them(tmp_path, fake_execute):
    chain = _chain(tmp_path)
    _done_folder(chain, "base_cnn", lr=0.5, data_dir=str(tmp_path / "other_data"))
    with pytest.raises(StaleResultsError) as err:
        chain.run(["base_cnn"])
    text = str(err.value)
    assert "lr: was 0.5, now 0.0003" in text and "other_data" in text and "data_dir" in text
    assert "--force" in text and "--out" in text
    assert "epochs" not in text  # unchanged parameters are not listed
    # a partial (resumable) stage with changed parameters stops too, before any notebook runs
    chain2 = _chain(tmp_path / "b")
    _done_folder(chain2, "resnet50", epochs=9)
    write_json(chain2.stage_dir("resnet50") / "metrics.json", {"stage": "resnet50", "finished": False})
    with pytest.raises(StaleResultsError, match="epochs: was 9, now 1"):
        chain2.run(["resnet50"])
    assert fake_execute[0] == []


def test_chunk_shaping_parameters_do_not_count(tmp_path, fake_execute):
    chain = _chain(tmp_path)
    _done_folder(chain, "base_cnn", num_workers=7, time_budget_s=99.0, chunk_steps=3, device="cuda")
    assert {"num_workers", "time_budget_s", "chunk_steps", "device", "output_dir", "input_dirs"} <= set(CHUNK_PARAMS)
    runs = chain.run(["base_cnn"])
    assert runs[0].skipped and fake_execute[0] == []
    # --force reruns it whatever it holds
    _done_folder(chain, "base_cnn", lr=0.5)
    assert not chain.run(["base_cnn"], force=True)[0].skipped


# ----------------------------------------------------------------- 4: --force upstream

def test_force_upstream_marks_downstream_stale_and_a_failed_merge_leaves_no_submission(tmp_path, fake_execute):
    calls, fail = fake_execute
    chain = _chain(tmp_path)
    chain.run()
    final = chain.out / "submission.csv"
    assert final.read_text() == "written by merge\n"
    chain.run(["resnet50"], force=True)
    for name in ("cell_line_hepg2", "cell_line_huvec", "cell_line_rpe", "cell_line_u2os", "merge"):
        assert chain.state(name) == "stale", name
    assert chain.state("base_cnn") == "done" and chain.state("eda") == "done"
    assert not final.exists()  # built from the old weights
    calls.clear()
    fail.add("merge")
    with pytest.raises(ChainError, match="stage merge failed"):
        chain.run()
    # the stale stages reran (from scratch), the done ones were skipped, no old submission is left
    assert [c[0] for c in calls] == ["cell_line_hepg2", "cell_line_huvec", "cell_line_rpe", "cell_line_u2os", "merge"]
    assert not final.exists()
    assert not (chain.stage_dir("merge") / "submission.csv").exists()


def test_a_forced_merge_that_fails_removes_the_previous_final_submission(tmp_path, fake_execute):
    _, fail = fake_execute
    chain = _chain(tmp_path)
    chain.run()
    fail.add("merge")
    with pytest.raises(ChainError):
        chain.run(["merge"], force=True)
    assert not (chain.out / "submission.csv").exists()


# ----------------------------------------------------------------- 6: chunk numbering

def test_chunk_notebooks_are_numbered_on_from_the_folder(tmp_path, fake_execute):
    chain = _chain(tmp_path)
    folder = chain.stage_dir("resnet50")
    for i in (1, 2, 3):
        _write_notebook(folder / f"resnet50_chunk{i}.ipynb")
    write_json(folder / "metrics.json", {"stage": "resnet50", "finished": False, "steps_done": 2})
    run = chain.run(["resnet50"])[0]
    assert [nb.name for nb in run.notebooks] == ["resnet50_chunk4.ipynb"]
    assert all((folder / f"resnet50_chunk{i}.ipynb").is_file() for i in (1, 2, 3, 4))


# ----------------------------------------------------------------- 8: messages naming the cause

def test_malformed_params_file_and_value_are_named(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("resnet50:\n  lr: [1, 2\n")
    with pytest.raises(ValueError, match=r"--params .*p\.yaml: not valid YAML .*line \d+, column \d+"):
        parse_overrides([], str(bad))
    with pytest.raises(ValueError, match=r"-p 'resnet50\.sites=\[1,': the value '\[1,' is not valid YAML"):
        parse_overrides(["resnet50.sites=[1,"])


@pytest.mark.parametrize("content,message", [("", "the file is empty"),
                                             ("id_code,experiment,plate,well,sirna\n", "has a header but no rows")])
def test_empty_train_csv_is_named(tmp_path, content, message):
    for name in ("test.csv", "train_controls.csv", "test_controls.csv"):
        shutil.copy(REAL / "metadata" / name, tmp_path / name)
    (tmp_path / "train.csv").write_text(content)
    with pytest.raises(ValueError, match=rf"train\.csv: {message}"):
        metadata.read_wells(tmp_path)


def test_selection_of_no_stage_is_an_error():
    with pytest.raises(ValueError, match="selects no stage"):
        select_stages(only="eda", start="merge")


def test_init_from_a_non_weights_file_names_the_path(tmp_path):
    from kernel_lib.loop_state import _load_weights

    path = tmp_path / "notes.txt"
    path.write_text("not weights")
    with pytest.raises(ValueError, match=r"init_from: .*notes\.txt is not a weights file"):
        _load_weights(torch.nn.Linear(2, 2), path)


def test_arch_and_val_fraction_are_checked_with_the_config(tmp_path):
    from kernel_lib import models, train_stage

    from kernel_lib.config import ARCHS
    assert ARCHS == models.SUPPORTED_ARCHS
    with pytest.raises(ValueError, match="stage resnet50: parameter 'arch' must be one of"):
        stage_params(get_stage("resnet50"), "smoke", {"resnet50": {"arch": "resnet51"}})
    # the notebook's config cell refuses it before reading any data (the data folder does not exist)
    with pytest.raises(ValueError, match="parameter 'arch'"):
        train_stage.training_config({"stage": "resnet50", "data_dir": str(tmp_path / "nope"),
                                     "output_dir": str(tmp_path / "o"), "arch": "resnet51"})
    with pytest.raises(ValueError, match="parameter 'val_fraction' must be in \\(0, 1\\) for split='random'"):
        TrainConfig(split="random", val_fraction=0.0)


# ----------------------------------------------------------------- 9: warnings on the console

def test_warnings_reach_the_console_and_the_summary(tmp_path, monkeypatch, capsys):
    def execute(self, stage, nb, params):
        _write_notebook(nb, stderr="/k/checkpoint.py:140: UserWarning: skipping checkpoint: /x/checkpoint.pt "
                                   "is truncated\n  warnings.warn(f\"skipping checkpoint: {err}\")\n")
        _write_stage_outputs(stage, params, metrics_warnings=["[base_cnn] reusing statistics of another run"])

    monkeypatch.setattr(Chain, "_execute", execute)
    chain = _chain(tmp_path)
    runs = chain.run(["base_cnn"])
    out = capsys.readouterr().out
    expected = ["skipping checkpoint: /x/checkpoint.pt is truncated", "reusing statistics of another run"]
    assert runs[0].warnings == expected
    for w in expected:
        assert f"[base_cnn] warning: {w}" in out
    table = summary_table(chain, runs)
    assert table.loc["base_cnn", "warnings"] == 2 and table.attrs["warnings"] == [("base_cnn", w) for w in expected]
    assert "skipping checkpoint" in write_index(chain, table).read_text()


# ----------------------------------------------------------------- 10: known-harmless noise

def test_papermill_unknown_parameter_is_silenced_only_for_config_fields(caplog):
    quiet = chain_mod._KnownParameters({"epochs", "lr"})
    logger = logging.getLogger("papermill")
    logger.addFilter(quiet)
    try:
        with caplog.at_level(logging.WARNING, logger="papermill"):
            logger.warning("Passed unknown parameter: epochs")
            logger.warning("Passed unknown parameter: learning_rate")
    finally:
        logger.removeFilter(quiet)
    assert [r.getMessage() for r in caplog.records] == ["Passed unknown parameter: learning_rate"]
    assert chain_mod._IpcKernelManager().transport == "ipc"


# ----------------------------------------------------------------- 11: re-running the setup cell

def test_notebook_params_reads_the_parameters_cells_on_a_rerun_of_the_setup_cell():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        # as a Jupyter kernel runs cells: each one enters the input history (In)
        shell.run_cell('stage = "base_cnn"  # identity\ndata_dir = ""\noutput_dir = "o"\ninput_dirs = []\n',
                       store_history=True)
        shell.run_cell("# Parameters\nepochs = 3\nlr = 0.001\ninput_dirs = [\"/in\"]\n", store_history=True)
        setup = "from kernel_lib.parameters import notebook_params\nparams = notebook_params(globals())\nn = 5\n"
        for _ in range(2):
            assert shell.run_cell(setup, store_history=True).success
        params = shell.user_ns["params"]
        assert params == {"stage": "base_cnn", "data_dir": "", "output_dir": "o", "input_dirs": ["/in"],
                          "epochs": 3, "lr": 0.001}
        assert TrainConfig.from_params(params).epochs == 3
    finally:
        InteractiveShell.clear_instance()
    # without an input history (a plain namespace) the flat literals are the parameters
    assert notebook_params({"a": 1, "b": object(), "_c": 2}) == {"a": 1}


# ----------------------------------------------------------------- 12: one well accuracy

def test_model_stages_and_the_merge_share_one_well_accuracy():
    from kernel_lib.inference import evaluate
    from kernel_lib.predictions import Predictions

    # softmax-averaging picks class 0 (peaked in one site), logit-averaging class 1 (the label)
    logits = torch.tensor([[6.0, 4.0, 0.0], [0.0, 4.0, 5.9]])
    labels = torch.tensor([1, 1])
    metrics = evaluate(logits, labels, ["W_1_A01", "W_1_A01"], ["A", "A"])
    assert logits.softmax(1).mean(0).argmax().item() == 0
    frame = pd.DataFrame(dict(id_code=["W_1_A01"] * 2, site=[1, 2], experiment="W", plate=1, well="A01",
                              cell_type="A", sirna="b"))
    _, log_probs = well_log_probs(Predictions(frame=frame, classes=["a", "b", "c"], logits=logits.numpy(), split="v"))
    assert log_probs.argmax(1).tolist() == [1]
    assert metrics["val_acc_well"] == 1.0


# ----------------------------------------------------------------- 2, 8, 14: the merge

@pytest.fixture(scope="module")
def merge_inputs(small_synthetic, tmp_path_factory):
    """Stage folders as the chain leaves them: four cell lines and resnet50, simulated logits of a
    strong classifier of the synthetic truth (test) and of the train labels (validation)."""
    data = small_synthetic
    root = tmp_path_factory.mktemp("merge_inputs")
    cell_types = metadata.cell_types(metadata.read_wells(data))
    wells = write_simulated_stages(data, root, [(f"cell_line_{ct.lower()}", [ct]) for ct in cell_types]
                                   + [("resnet50", cell_types)], top1=0.95)
    return data, root, wells


def _merge(data: Path, root: Path, out: Path):
    return merge_stage.merge_stage({"data_dir": str(data), "output_dir": str(out), "input_dirs": [str(root)]})


@pytest.mark.slow  # the merge or EDA stage, with its figures
def test_a_cell_line_folder_without_predictions_falls_back_with_a_warning(merge_inputs, tmp_path):
    data, root, _ = merge_inputs
    inputs = tmp_path / "in"
    shutil.copytree(root, inputs)
    (inputs / "cell_line_rpe" / "predictions_test.npz").unlink()
    write_json(inputs / "cell_line_rpe" / "metrics.json", {"stage": "cell_line_rpe", "finished": True})
    with pytest.warns(UserWarning, match="cell_line_rpe.*falls back to the fallback stage resnet50"):
        result = _merge(data, inputs, tmp_path / "merge")
    assert result.report.loc["RPE", "stage"] == "resnet50"
    assert result.report.loc["HEPG2", "stage"] == "cell_line_hepg2"
    warned = read_metrics(tmp_path / "merge")["warnings"]
    assert any("python run_all.py --only cell_line_rpe" in w for w in warned)


@pytest.mark.slow  # the merge or EDA stage, with its figures
def test_nan_in_one_validation_file_names_that_file_only(merge_inputs, tmp_path):
    from kernel_lib.predictions import load_predictions

    data, root, _ = merge_inputs
    inputs = tmp_path / "in"
    shutil.copytree(root, inputs)
    path = inputs / "cell_line_huvec" / "predictions_val.npz"
    pred = load_predictions(path)
    pred.logits[3, 0] = np.nan
    save_predictions(path, pred.frame, pred.classes, pred.logits, pred.split)
    with pytest.raises(ValueError) as err:
        _merge(data, inputs, tmp_path / "merge")
    assert str(path) in str(err.value) and "non-finite" in str(err.value)
    assert "cell_line_hepg2" not in str(err.value) and ";" not in str(err.value).split(":")[0]


@pytest.mark.slow  # the merge or EDA stage, with its figures
def test_test_plate_maps_show_the_inferred_groups_rotation_and_margin(merge_inputs, tmp_path):
    data, root, wells = merge_inputs
    out = tmp_path / "out"
    shutil.copytree(root, out)
    result = _merge(data, out, out / "merge")
    groups = infer_plate_groups(wells)
    truth = synthetic.read_test_truth(data).set_index("id_code")["sirna"]
    test_exps = sorted(wells.loc[wells["dataset"] == "test", "experiment"].unique())
    rotations = pd.read_csv(out / "merge" / "test_rotations.csv")
    assert rotations["experiment"].tolist() == test_exps
    assert ((rotations["margin"] > 0.5) & (rotations["margin"] <= 1)).all()
    assert np.allclose(rotations["margin"], rotations["mass"] / (rotations["mass"] + rotations["runner_up"]))
    # the inferred group of every test treatment well is the group of its true siRNA
    test_treat = wells[(wells["dataset"] == "test") & (wells["well_type"] == "treatment")]
    inferred = plate_maps.inferred_group_names(test_treat, groups, dict(zip(rotations["experiment"], rotations["rotation"])))
    true_groups = "group " + test_treat["id_code"].map(truth).map(groups.label_to_group).astype(str)
    assert (inferred == true_groups).all()
    for e in test_exps:
        assert (out / "merge" / f"test_plate_map_{e}.png").read_bytes()[:4] == b"\x89PNG"
    chain = Chain(data_dir=data, out=out)
    index = write_index(chain, summary_table(chain, [StageRun("merge")])).read_text()
    assert "inferred plate groups and rotations" in index
    for e in test_exps:
        assert f"merge/test_plate_map_{e}.png" in index and e in index
    assert result.rotations["rotation"].tolist() == rotations["rotation"].tolist()


# ----------------------------------------------------------------- 13: EDA without images

@pytest.mark.slow  # the merge or EDA stage, with its figures
def test_eda_with_images_off_draws_tables_and_plate_maps(small_synthetic, tmp_path):
    result = eda.run_eda(small_synthetic, tmp_path / "eda", experiments=["RPE-01"], images=False, progress=False)
    m = result["metrics"]
    assert m["finished"] and m["images"] is False
    assert set(m["figures"]) == {"plate_map_RPE-01_well_type.png", "plate_map_RPE-01_plate_group.png"}
    assert "channel_intensities" not in result["tables"] and (tmp_path / "eda" / "plates.csv").is_file()
    assert eda.eda_config({"output_dir": "o", "n_sites_per_experiment": 0}).n_sites_per_experiment == 0


@pytest.mark.slow
def test_eda_stage_on_the_real_metadata_without_images(tmp_path):
    result = eda.run_eda(REAL / "metadata", tmp_path / "eda", progress=False)
    m = result["metrics"]
    assert m["finished"] and m["n_experiments"] == 51 and m["images"] is True
    default = ["HEPG2-01", "HUVEC-01", "RPE-01", "U2OS-01", "HEPG2-08"]
    assert m["experiments"] == default
    assert set(m["figures"]) == {f"plate_map_{e}_{by}.png" for e in default for by in ("well_type", "plate_group")}
    assert any("no site images found" in n for n in m["notes"])
    plates = pd.read_csv(tmp_path / "eda" / "plates.csv")
    assert len(plates) == 51 * 4 and (plates.loc[plates["dataset"] == "test", "plate_group"] == "unknown").all()


@pytest.mark.slow
def test_eda_draws_image_figures_from_the_sites_that_exist(tmp_path, real_wells):
    data = tmp_path / "data"
    data.mkdir()
    for f in (REAL / "metadata").iterdir():
        (data / f.name).symlink_to(f)
    for part in ("train", "test"):
        (data / part).symlink_to(REAL / "images" / part)
    experiments = ["HEPG2-01", "HUVEC-01"]
    result = eda.run_eda(data, tmp_path / "eda", experiments=experiments, n_sites_per_experiment=3, seed=1,
                         progress=False)
    sites = metadata.expand_sites(real_wells, [1, 2])
    sample = eda.sample_sites(sites, 3, 1)
    present = sum(eda.site_exists(data, r) for r in sample.itertuples())
    m = result["metrics"]
    assert m["images_missing"] == len(sample) - present > 0 and m["n_sites_sampled"] == present
    assert any(f"{len(sample) - present} of {len(sample)} sampled sites have no PNGs" in n for n in m["notes"])
    # the composites: each experiment's B02 negative control exists in the fixture
    assert "rgb_composites.png" in m["figures"]


# ----------------------------------------------------------------- slow: real notebooks

TINY = synthetic.SyntheticSpec(image_size=16, sirnas_per_group=4, train_experiments=3, test_experiments=1,
                               positive_controls=2, seed=3)
TINY_PARAMS = {"all": {"num_workers": 0, "device": "cpu"}, "eda": {"n_sites_per_experiment": 1},
               "base_cnn": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "max_train_sites": 0}}


@pytest.fixture(scope="module")
def tiny_copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_faults")
    return synthetic.ensure(root, TINY, progress=False)


@pytest.mark.slow
def test_a_failed_prediction_step_resumes_at_prediction_locally_and_as_a_chunk(tiny_copy, tmp_path):
    from kernel_lib import train_stage

    wells = metadata.read_wells(tiny_copy)
    victim = wells[(wells["dataset"] == "test") & (wells["well_type"] == "treatment")].iloc[0]
    png = tiny_copy / "test" / victim["experiment"] / f"Plate{victim['plate']}" / f"{victim['well']}_s1_w3.png"
    hidden = png.with_name("hidden.bin")
    png.rename(hidden)
    # verify off: the PNG goes missing after training started (an OOM kill, a session ending), which
    # the pre-training check cannot see; with it on, the stage would stop before training
    overrides = {**TINY_PARAMS, "base_cnn": {**TINY_PARAMS.get("base_cnn", {}), "verify": "off"}}
    chain = Chain(data_dir=tiny_copy, out=tmp_path / "out", profile="smoke", overrides=overrides, progress=False)
    try:
        with pytest.raises(ChainError, match=r"base_cnn_chunk1\.ipynb.*" + png.name):
            chain.run(["base_cnn"])
    finally:
        hidden.rename(png)
    folder = chain.stage_dir("base_cnn")
    before = read_metrics(folder)
    assert before["finished"] is True and chain.state("base_cnn") == "trained"
    weights = torch.load(folder / "model.pt", weights_only=True)

    # a Kaggle chunk kernel whose input is the trained, unpredicted stage: predicts, no training
    cfg = train_stage.training_config({**chain.params_for(get_stage("base_cnn")),
                                       "output_dir": str(tmp_path / "chunk2"), "input_dirs": [str(folder)]})
    data = train_stage.load_data(cfg)
    model = train_stage.build_model(cfg, data)
    train_stage.train(cfg, model, data)
    train_stage.predict(cfg, model, data)
    assert stage_state(tmp_path / "chunk2", "train") == "done"
    assert read_metrics(tmp_path / "chunk2")["steps_done"] == before["steps_done"]
    chunk_weights = torch.load(tmp_path / "chunk2" / "model.pt", weights_only=True)
    assert all(torch.equal(weights[k], chunk_weights[k]) for k in weights)

    # the local rerun: not skipped, predicts from the finished checkpoint, numbered on
    run = chain.run(["base_cnn"])[0]
    assert not run.skipped and [nb.name for nb in run.notebooks] == ["base_cnn_chunk2.ipynb"]
    assert chain.state("base_cnn") == "done"
    after = read_metrics(folder)
    assert after["steps_done"] == before["steps_done"] and after["predicted"] is True
    again = torch.load(folder / "model.pt", weights_only=True)
    assert all(torch.equal(weights[k], again[k]) for k in weights), "the rerun retrained"
    assert (folder / "base_cnn_chunk1.ipynb").is_file()
    sub = pd.read_csv(folder / "submission.csv", dtype=str)
    assert victim["id_code"] in set(sub["id_code"])


@pytest.mark.slow
def test_a_killed_kernel_is_reported_like_a_failing_cell(tmp_path):
    nb_path = tmp_path / "killer.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")])
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    nbformat.write(nb, str(nb_path))
    stage = Stage("killer", str(nb_path), "eda")
    chain = Chain(data_dir=tmp_path, out=tmp_path / "out", progress=False, write_html=False)
    executed = tmp_path / "out" / "killer_chunk1.ipynb"
    executed.parent.mkdir()
    with pytest.raises(ChainError) as err:
        chain._execute(stage, executed, {})
    text = str(err.value)
    assert "stage killer" in text and str(executed) in text and "kernel died" in text and "rerun resumes" in text
    assert "Traceback" not in text


@pytest.mark.slow
def test_a_real_execution_prints_neither_known_harmless_message(tiny_copy, tmp_path, capfd, caplog):
    chain = Chain(data_dir=tiny_copy, out=tmp_path / "out", profile="smoke",
                  overrides={**TINY_PARAMS, "eda": {"images": False}}, progress=False)
    with caplog.at_level(logging.INFO, logger="papermill"):
        run = chain.run(["eda"])[0]
    console = "".join(capfd.readouterr())
    assert run.chunks == 1 and chain.state("eda") == "done"
    assert "without encryption" not in console
    assert not [r for r in caplog.records if "Passed unknown parameter" in r.getMessage()]
    assert [r for r in caplog.records if r.name.startswith("papermill")]  # papermill did log (so the check bites)
