"""Post-processing and the merge: hand-made cases, simulated classifiers on the real layout,
and every bad input the merge must refuse."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kernel_lib import metadata
from kernel_lib.plates import infer_plate_groups
from kernel_lib.predictions import Predictions, load_predictions, save_predictions
from benchmarks.simulate import calibrate_signal, simulated_labels, simulated_predictions
from kernel_lib.submission import (check_submission, choose_rotations, label_probability, merge_predictions,
                                   pool_predictions,
                                   postprocess, step_accuracy_table, well_log_probs, write_submission)

MERGE_EXPERIMENTS = ["HEPG2-08", "HUVEC-17", "RPE-08", "U2OS-04"]


def _site_rows(ids: list[str], sites: list[int], cell_type: str = "A", plate: int = 1) -> pd.DataFrame:
    return pd.DataFrame(dict(id_code=ids, site=sites, experiment=[i.rsplit("_", 2)[0] for i in ids],
                             plate=[int(i.rsplit("_", 2)[1]) for i in ids], well=[i.rsplit("_", 1)[1] for i in ids],
                             cell_type=cell_type, sirna=""))


def test_well_log_probs_is_log_softmax_of_the_mean_site_logits():
    frame = _site_rows(["E-01_1_B03", "E-01_1_B02", "E-01_1_B03"], [1, 1, 2])
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 5.0, 1.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    wells, log_probs = well_log_probs(Predictions(frame, ["a", "b", "c"], logits, "test"))
    assert wells["id_code"].tolist() == ["E-01_1_B02", "E-01_1_B03"]
    assert wells["n_sites"].tolist() == [1, 2]
    e = np.e
    np.testing.assert_allclose(np.exp(log_probs[1]), [e / (e + 2), 1 / (e + 2), 1 / (e + 2)], rtol=1e-12)
    np.testing.assert_allclose(np.exp(log_probs[0]).sum(), 1.0, rtol=1e-12)
    assert log_probs[0].argmax() == 1


def test_pooled_files_are_chunks_or_an_ensemble_in_the_first_file_class_order():
    frame = _site_rows(["E-01_1_B03", "E-01_1_B04"], [1, 1])
    a = Predictions(frame.iloc[:1], ["a", "b", "c"], np.array([[3.0, 0.0, 0.0]]), "test", "a.npz")
    b = Predictions(frame.iloc[1:], ["c", "a", "b"], np.array([[1.0, 0.0, 2.0]]), "test", "b.npz")
    chunks = pool_predictions([a, b])
    assert chunks.classes == ["a", "b", "c"] and chunks.path == "a.npz; b.npz"
    np.testing.assert_array_equal(chunks.logits, [[3.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
    again = Predictions(frame.iloc[:1], ["a", "b", "c"], np.array([[1.0, 0.0, 2.0]]), "test", "c.npz")
    _, log_probs = well_log_probs(pool_predictions([a, again]))
    np.testing.assert_allclose(log_probs, _log_softmax([[2.0, 0.0, 1.0]]), rtol=1e-12)
    other = Predictions(frame.iloc[1:], ["a", "b", "x"], np.zeros((1, 3)), "test", "x.npz")
    with pytest.raises(ValueError, match=r"differ between a\.npz .* and x\.npz .*'c' only in the first"):
        pool_predictions([a, other])


def test_nan_logits_name_the_file_and_id_code(tmp_path):
    frame = _site_rows(["E-01_1_B03", "E-01_1_B04"], [1, 1])
    logits = np.zeros((2, 3), dtype=np.float32)
    logits[1, 2] = np.nan
    path = save_predictions(tmp_path / "p.npz", frame, ["a", "b", "c"], logits, "test")
    with pytest.raises(ValueError, match=r"p\.npz: non-finite logits .* id_code 'E-01_1_B04'"):
        well_log_probs(load_predictions(path))


# ------------------------------------------------------------- a hand-made plate layout

@pytest.fixture(scope="module")
def tiny():
    """Two groups {a1,a2,a3} / {b1,b2,b3} on plates 1/2 (rotation 0) or 2/1 (rotation 1),
    plus a control class; inferred from two train experiments."""
    rows = []
    for experiment, groups_on_plates in (("T-01", ("a", "b")), ("T-02", ("b", "a"))):
        for plate, g in enumerate(groups_on_plates, start=1):
            for i in (1, 2, 3):
                rows.append(dict(id_code=f"{experiment}_{plate}_W0{i}", experiment=experiment, plate=plate,
                                 well=f"W0{i}", sirna=f"{g}{i}", well_type="treatment", cell_type="T",
                                 dataset="train"))
    groups = infer_plate_groups(pd.DataFrame(rows))
    classes = ["ctrl", "a1", "a2", "a3", "b1", "b2", "b3"]
    return groups, classes


def _wells(experiment: str, plates: list[int]) -> pd.DataFrame:
    return pd.DataFrame(dict(experiment=experiment, plate=plates))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_each_step_on_a_hand_made_plate(tiny):
    groups, classes = tiny
    # experiment X holds group b on plate 1 (rotation 1); well 3 prefers the control, then a1
    wells = _wells("X-01", [1, 1, 1, 2])
    log_probs = _log_softmax([[0, 0, 0, 0, 3.0, 1.0, 0],   # b1
                              [0, 0, 0, 0, 2.5, 2.0, 0],   # b1 again, then b2
                              [9, 4, 0, 0, 0, 0, 1.0],     # ctrl, a1, then b3
                              [0, 2.0, 0, 0, 0, 0, 0]])    # a1, on plate 2 (group a)
    assert postprocess(wells, log_probs, classes, groups, "argmax").tolist() == ["b1", "b1", "a1", "a1"]
    rotation = choose_rotations(wells, log_probs, classes, groups)
    assert rotation["rotation"].tolist() == [1] and rotation["mass"].iloc[0] > rotation["runner_up"].iloc[0]
    assert postprocess(wells, log_probs, classes, groups, "plate_groups").tolist() == ["b1", "b1", "b3", "a1"]
    assert postprocess(wells, log_probs, classes, groups, "assignment").tolist() == ["b1", "b2", "b3", "a1"]
    forced = postprocess(wells, log_probs, classes, groups, "plate_groups", rotations={"X-01": 0})
    assert forced.tolist() == ["a1", "a1", "a1", "b1"]


def test_a_plate_with_more_wells_than_its_group_keeps_every_label_in_the_group(tiny):
    groups, classes = tiny
    wells = _wells("X-01", [1] * 5)
    rng = np.random.default_rng(0)
    log_probs = _log_softmax(rng.normal(size=(5, 7)) + np.array([0, 0, 0, 0, 3, 3, 3]))
    labels = postprocess(wells, log_probs, classes, groups, "assignment")
    assert set(labels) == {"b1", "b2", "b3"} and len(labels) == 5


def test_bad_mode_and_foreign_vocabulary_are_errors(tiny):
    groups, classes = tiny
    wells = _wells("X-01", [1])
    with pytest.raises(ValueError, match="parameter mode must be one of"):
        postprocess(wells, np.zeros((1, 7)), classes, groups, "hungarian")
    with pytest.raises(ValueError, match=r"no class is a siRNA of the plate groups; classes look numeric"):
        postprocess(wells, np.zeros((1, 2)), ["1", "2"], groups, "argmax")


# ------------------------------------------------------------- simulated classifiers, real layout

@pytest.fixture(scope="module")
def held_out(real_wells):
    """Groups from the training experiments; treatment wells of one held-out experiment per cell type."""
    train, val, _ = metadata.split_train_val(real_wells, "experiment", val_experiments=1)
    val = val[val["well_type"] == "treatment"].reset_index(drop=True)
    return infer_plate_groups(train), val, metadata.class_list(real_wells)


@pytest.mark.slow  # several merges of the real layout's 19,897 test wells
@pytest.mark.parametrize("top1, min_masked, min_assigned", [(0.12, 0.19, 0.18), (0.40, 0.52, 0.56),
                                                           (0.76, 0.84, 0.93)])
def test_simulated_classifier_gains_from_inferred_groups_and_rotations(held_out, real_wells, top1,
                                                                       min_masked, min_assigned):
    groups, val, classes = held_out
    assert not set(val["experiment"]) & set(groups.rotation)  # rotations must come from predictions
    pred = simulated_predictions(val, classes, calibrate_signal(len(classes), top1), seed=1)
    table = step_accuracy_table(pred, groups)
    overall = table.loc["overall"]
    assert overall["n_wells"] == len(val)
    assert abs(overall["argmax"] - top1) < 0.03
    assert overall["plate_groups"] >= min_masked and overall["assignment"] >= min_assigned
    assert set(table.index) == {"HEPG2", "HUVEC", "RPE", "U2OS", "overall"}
    wells, log_probs = well_log_probs(pred)
    chosen = choose_rotations(wells, log_probs, classes, groups).set_index("experiment")["rotation"]
    truth = infer_plate_groups(real_wells)
    for experiment, r in chosen.items():  # the same canonical ids, so the rotations must agree
        assert r == truth.rotation[experiment]


def test_assignment_on_plates_with_removed_wells_uses_each_sirna_once(held_out):
    groups, val, classes = held_out
    val = val[val["experiment"] == val["experiment"].iloc[0]]
    val = val.drop(val.index[::50])  # ~5 wells removed per plate, as on real plates: rectangular costs
    assert (val.groupby("plate").size() < 277).all()
    pred = simulated_predictions(val, classes, calibrate_signal(len(classes), 0.76), seed=2)
    wells, log_probs = well_log_probs(pred)
    accuracy = {}
    for mode in ("plate_groups", "assignment"):
        labels = postprocess(wells, log_probs, classes, groups, mode)
        accuracy[mode] = (labels == wells["sirna"].to_numpy()).mean()
    per_plate = pd.DataFrame({"plate": wells["plate"], "label": labels})
    assert not per_plate.duplicated().any()
    assert accuracy["assignment"] >= max(0.92, accuracy["plate_groups"] + 0.05)


def test_step_accuracy_table_needs_labelled_treatment_wells(held_out):
    groups, val, classes = held_out
    pred = simulated_predictions(val.head(20), classes, 3.0, seed=0)
    pred.frame["sirna"] = ""
    with pytest.raises(ValueError, match="no well has a treatment siRNA in its 'sirna' column"):
        step_accuracy_table(pred, groups)


# ------------------------------------------------------------- the merge, on real test wells

@pytest.fixture(scope="module")
def merge_case(real_wells, tmp_path_factory):
    """Groups from all train wells; four test experiments with a simulated hidden truth; one
    prediction file per cell type (test controls included, to be ignored)."""
    groups = infer_plate_groups(real_wells)
    classes = metadata.class_list(real_wells)
    test = real_wells[(real_wells["dataset"] == "test") & real_wells["experiment"].isin(MERGE_EXPERIMENTS)]
    treat = test[test["well_type"] == "treatment"]
    labels, rotations = simulated_labels(treat, groups, seed=3)
    truth = treat.assign(sirna=labels)
    signal = calibrate_signal(len(classes), 0.9)
    folder = tmp_path_factory.mktemp("merge")
    stage_files = {}
    for ct in sorted(truth["cell_type"].unique()):
        wells = truth[truth["cell_type"] == ct]
        controls = test[(test["cell_type"] == ct) & (test["well_type"] != "treatment")]
        pred = simulated_predictions(pd.concat([wells, controls.assign(sirna=classes[0])]), classes, signal,
                                     seed=4, split="test")
        pred.frame["sirna"] = ""
        stage_files[f"cell_line_{ct.lower()}"] = save_predictions(
            folder / ct / "predictions_test.npz", pred.frame, classes, pred.logits, "test")
    return dict(groups=groups, test=test, truth=truth, rotations=rotations, stage_files=stage_files,
                folder=folder, classes=classes)


@pytest.fixture(scope="module")
def fallback(merge_case) -> Path:
    """A weak (top-1 0.3) resnet50 prediction file over every test treatment well of ``merge_case``."""
    c = merge_case
    weak = simulated_predictions(c["truth"], c["classes"], calibrate_signal(len(c["classes"]), 0.3), seed=5,
                                 split="test")
    return save_predictions(c["folder"] / "resnet50.npz", weak.frame.assign(sirna=""), c["classes"], weak.logits,
                            "test")


@pytest.fixture(scope="module")
def merged(merge_case):
    c = merge_case
    return merge_predictions(c["stage_files"], c["test"], c["groups"])


def test_merge_of_four_cell_lines_recovers_the_hidden_truth_in_test_order(merge_case, merged, tmp_path):
    c = merge_case
    frame, report = merged
    assert frame["id_code"].tolist() == c["truth"]["id_code"].tolist()
    assert (frame["sirna"].to_numpy() == c["truth"]["sirna"].to_numpy()).mean() >= 0.99
    assert report.sources == {"HEPG2": "cell_line_hepg2", "HUVEC": "cell_line_huvec",
                              "RPE": "cell_line_rpe", "U2OS": "cell_line_u2os"}
    assert dict(zip(report.rotations["experiment"], report.rotations["rotation"])) == c["rotations"]
    assert report.warnings == []
    path = write_submission(tmp_path / "submission.csv", frame)
    assert path.read_text().splitlines()[0] == "id_code,sirna"
    assert pd.read_csv(path, dtype=str).equals(frame.astype(str))
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]


@pytest.mark.slow  # several merges of the real layout's 19,897 test wells
def test_a_stage_in_two_chunk_files_with_shuffled_classes_merges_the_same(merge_case, merged, tmp_path):
    c = merge_case
    pred = load_predictions(c["stage_files"]["cell_line_u2os"])
    shuffled = np.random.default_rng(0).permutation(len(pred.classes))
    files = []
    for k, plates in enumerate([(1, 2), (3, 4)]):
        rows = pred.frame["plate"].isin(plates).to_numpy()
        columns = shuffled if k else np.arange(len(pred.classes))
        files.append(save_predictions(tmp_path / f"chunk{k}.npz", pred.frame[rows], [pred.classes[j] for j in columns],
                                      pred.logits[rows][:, columns], "test"))
    frame, report = merge_predictions(c["stage_files"] | {"cell_line_u2os": files}, c["test"], c["groups"])
    assert frame.equals(merged[0])
    assert report.files["cell_line_u2os"] == [str(f) for f in files]


@pytest.mark.slow  # several merges of the real layout's 19,897 test wells
def test_merge_modes_order_by_accuracy(merge_case, merged):
    c = merge_case
    accuracy = {"assignment": (merged[0]["sirna"].to_numpy() == c["truth"]["sirna"].to_numpy()).mean()}
    for mode in ("argmax", "plate_groups"):
        frame, _ = merge_predictions(c["stage_files"], c["test"], c["groups"], mode=mode)
        accuracy[mode] = (frame["sirna"].to_numpy() == c["truth"]["sirna"].to_numpy()).mean()
    assert accuracy["argmax"] < accuracy["plate_groups"] < accuracy["assignment"]


@pytest.mark.slow  # several merges of the real layout's 19,897 test wells
def test_merge_follows_the_sample_submission_order(merge_case, tmp_path):
    c = merge_case
    sample = c["truth"][["id_code"]].sample(frac=1.0, random_state=0).assign(sirna="0")
    sample.to_csv(tmp_path / "sample_submission.csv", index=False)
    frame, _ = merge_predictions(c["stage_files"], c["test"], c["groups"],
                                 sample_submission=tmp_path / "sample_submission.csv")
    assert frame["id_code"].tolist() == sample["id_code"].tolist()
    expected = c["truth"].set_index("id_code")["sirna"].loc[sample["id_code"]]
    assert (frame["sirna"].to_numpy() == expected.to_numpy()).mean() >= 0.99
    sample.iloc[:-1].to_csv(tmp_path / "short.csv", index=False)
    last = sample["id_code"].iloc[-1]
    with pytest.raises(ValueError, match=rf"short\.csv: lacks 1 test treatment wells, e.g. id_code '{last}'"):
        merge_predictions(c["stage_files"], c["test"], c["groups"], sample_submission=tmp_path / "short.csv")


@pytest.mark.slow  # several merges of the real layout's 19,897 test wells
def test_a_missing_cell_type_falls_back_with_a_warning(merge_case, fallback):
    c = merge_case
    stages = {k: v for k, v in c["stage_files"].items() if k != "cell_line_rpe"}
    with pytest.warns(UserWarning, match=r"cell type RPE: no stage predicts its \d+ test wells; using resnet50"):
        frame, report = merge_predictions(stages, c["test"], c["groups"], fallback=fallback,
                                          fallback_name="resnet50")
    assert report.sources["RPE"] == "resnet50" and report.sources["HUVEC"] == "cell_line_huvec"
    assert len(report.warnings) == 1 and str(fallback) in report.warnings[0]
    # the RPE labels are the weak fallback's: worse than the stage's but far above chance
    rpe = (c["truth"]["cell_type"] == "RPE").to_numpy()
    correct = frame["sirna"].to_numpy() == c["truth"]["sirna"].to_numpy()
    assert 0.3 < correct[rpe].mean() < 0.95 and correct[~rpe].mean() >= 0.99
    with pytest.raises(ValueError, match="cell type RPE: no stage predicts its .* and no fallback"):
        merge_predictions(stages, c["test"], c["groups"])


def _edited(path, folder, edit) -> str:
    """A copy of a prediction file with ``edit(frame, logits)`` applied (in place)."""
    pred = load_predictions(path)
    logits = np.array(pred.logits)
    frame = pred.frame.copy()
    classes = edit(frame, logits) or pred.classes
    return str(save_predictions(folder / "edited.npz", frame, classes, logits, pred.split))


def test_bad_inputs_are_refused_naming_the_file_and_id_code(merge_case, tmp_path):
    c = merge_case
    stages = dict(c["stage_files"])
    hepg2 = stages["cell_line_hepg2"]
    first_id = load_predictions(hepg2).frame["id_code"].iloc[0]

    def nan_logits(frame, logits):
        logits[3, 7] = np.nan
    bad = _edited(hepg2, tmp_path, nan_logits)
    with pytest.raises(ValueError, match=r"edited\.npz: non-finite logits .* first at id_code 'HEPG2-08_"):
        merge_predictions(stages | {"cell_line_hepg2": bad}, c["test"], c["groups"])

    def foreign_well(frame, logits):
        frame.loc[0, ["id_code", "experiment"]] = ["HEPG2-01_1_B03", "HEPG2-01"]
    bad = _edited(hepg2, tmp_path, foreign_well)
    with pytest.raises(ValueError, match=r"edited\.npz: id_code 'HEPG2-01_1_B03' \(1 rows\) is not a test well"):
        merge_predictions(stages | {"cell_line_hepg2": bad}, c["test"], c["groups"])

    pred = load_predictions(hepg2)
    keep = (pred.frame["id_code"] != first_id).to_numpy()
    short = save_predictions(tmp_path / "short.npz", pred.frame[keep], pred.classes, pred.logits[keep], "test")
    with pytest.raises(ValueError, match=rf"short\.npz \(stage cell_line_hepg2\) lacks 1 of the \d+ HEPG2 test "
                                         rf"wells, e.g. id_code '{first_id}'"):
        merge_predictions(stages | {"cell_line_hepg2": short}, c["test"], c["groups"])

    def rename_class(frame, logits):
        classes = list(load_predictions(hepg2).classes)
        classes[5] = "9999"
        return classes
    bad = _edited(hepg2, tmp_path, rename_class)
    with pytest.raises(ValueError, match=r"class vocabularies differ between .*edited\.npz"):
        merge_predictions(stages | {"cell_line_hepg2": bad}, c["test"], c["groups"])

    with pytest.raises(ValueError, match=r"cell type HEPG2 is predicted by stages \['cell_line_hepg2', 'extra'\]"):
        merge_predictions(stages | {"extra": hepg2}, c["test"], c["groups"])

    val = load_predictions(hepg2)
    val_path = save_predictions(tmp_path / "val.npz", val.frame, val.classes, val.logits, "val:experiment:HEPG2-02")
    with pytest.raises(ValueError, match=r"val\.npz: split is 'val:experiment:HEPG2-02', the merge needs test"):
        merge_predictions(stages | {"cell_line_hepg2": val_path}, c["test"], c["groups"])


def test_check_submission_refuses_duplicates_and_foreign_labels(merge_case, merged):
    c = merge_case
    frame, _ = merged
    vocabulary = c["classes"]
    check_submission(frame, c["truth"]["id_code"], vocabulary)
    twice = pd.concat([frame, frame.iloc[[4]]], ignore_index=True)
    with pytest.raises(ValueError, match=rf"id_code '{frame['id_code'].iloc[4]}' appears twice"):
        check_submission(twice, c["truth"]["id_code"], vocabulary)
    wrong = frame.assign(sirna=frame["sirna"].where(frame.index != 2, "1138"))
    with pytest.raises(ValueError, match=rf"'1138' at id_code '{frame['id_code'].iloc[2]}' is not a treatment siRNA"):
        check_submission(wrong, c["truth"]["id_code"], vocabulary)
    with pytest.raises(ValueError, match=r"columns \['id_code', 'label'\]"):
        write_submission("unused.csv", frame.rename(columns={"sirna": "label"}))


@pytest.mark.slow  # several merges of the real layout's 19,897 test wells
def test_string_vocabulary_merge_writes_the_same_submission_relabelled(merge_case, merged, string_vocabulary,
                                                                      tmp_path):
    c = merge_case
    folder, mapping = string_vocabulary
    string_wells = metadata.read_wells(folder)
    groups = infer_plate_groups(string_wells)
    test = string_wells[string_wells["id_code"].isin(c["test"]["id_code"])]
    stages = {}
    for name, path in c["stage_files"].items():
        pred = load_predictions(path)
        stages[name] = save_predictions(tmp_path / f"{name}.npz", pred.frame, [mapping[x] for x in pred.classes],
                                        pred.logits, "test")
    frame, _ = merge_predictions(stages, test, groups)
    numeric, _ = merged
    assert frame["sirna"].str.startswith("sirna_").all()
    assert frame["sirna"].tolist() == numeric["sirna"].map(mapping).tolist()
    with pytest.raises(ValueError, match=r"no class is a siRNA of the plate groups; classes look string"):
        merge_predictions(stages, c["test"], c["groups"])


# ------------------------------------------------------------- averaged stages, pseudo-label confidence

def test_label_probability_renormalises_over_the_plate_group_or_every_treatment(tiny):
    groups, classes = tiny
    wells = _wells("X-01", [1, 1, 1, 2])
    logits = np.array([[0, 0, 0, 0, 3.0, 1.0, 0], [0, 0, 0, 0, 2.5, 2.0, 0], [9, 4, 0, 0, 0, 0, 1.0],
                       [0, 2.0, 0, 0, 0, 0, 0]])
    log_probs = _log_softmax(logits)
    labels = postprocess(wells, log_probs, classes, groups, "plate_groups")  # b1 b1 b3 a1, rotation 1
    got = label_probability(wells, log_probs, classes, groups, labels, {"X-01": 1})
    e = np.exp
    # plate 1 holds group b (columns 4..6), plate 2 group a (columns 1..3): the control never counts
    assert got == pytest.approx([e(3) / (e(3) + e(1) + 1), e(2.5) / (e(2.5) + e(2) + 1),
                                 e(1) / (1 + 1 + e(1)), e(2) / (e(2) + 2)])
    argmax = postprocess(wells, log_probs, classes, groups, "argmax")
    every = label_probability(wells, log_probs, classes, groups, argmax, None)
    assert every[2] == pytest.approx(e(4) / (e(4) + 4 + e(1)))  # a1 among the 6 treatments


@pytest.mark.slow  # several merges of the real layout's 19,897 test wells
def test_averaged_stages_pool_with_each_cell_types_stage_as_a_mean_of_logits(merge_case, fallback, tmp_path):
    """Averaging a stage in equals merging one file whose site logits are the two models' mean;
    the report's labels carry the probability the pseudo-label stage thresholds."""
    c = merge_case
    weak = load_predictions(fallback)
    mean_files = {}
    for name, path in c["stage_files"].items():
        pred = load_predictions(path)
        keep = pred.frame["id_code"].isin(set(weak.frame["id_code"])).to_numpy()  # treatment rows
        frame = pred.frame[keep].reset_index(drop=True)
        position = pd.Series(np.arange(len(weak.frame)), index=pd.MultiIndex.from_frame(weak.frame[["id_code", "site"]]))
        rows = position.loc[pd.MultiIndex.from_frame(frame[["id_code", "site"]])].to_numpy()
        mean_files[name] = save_predictions(tmp_path / f"{name}.npz", frame, pred.classes,
                                            (pred.logits[keep] + weak.logits[rows]) / 2, "test")
    frame, report = merge_predictions(c["stage_files"], c["test"], c["groups"], average_with={"final_fit": fallback})
    expected, expected_report = merge_predictions(mean_files, c["test"], c["groups"])
    assert report.averaged == ["final_fit"]
    assert frame.equals(expected)
    assert np.allclose(report.labels["probability"], expected_report.labels["probability"])
    assert report.labels["sirna"].tolist() == frame["sirna"].tolist()
    assert report.labels["probability"].between(0, 1).all()
    # the simulated models' errors are independent, so even the weak one lifts the strong cell lines
    alone, _ = merge_predictions(c["stage_files"], c["test"], c["groups"], mode="argmax")
    mixed, _ = merge_predictions(c["stage_files"], c["test"], c["groups"], mode="argmax",
                                 average_with={"final_fit": fallback})
    truth = c["truth"]["sirna"].to_numpy()
    assert (mixed["sirna"].to_numpy() == truth).mean() > (alone["sirna"].to_numpy() == truth).mean() + 0.02


@pytest.mark.slow  # several merges of the real layout's 19,897 test wells
def test_an_averaged_stage_lacking_wells_is_named(merge_case, fallback, tmp_path):
    c = merge_case
    weak = load_predictions(fallback)
    keep = (weak.frame["cell_type"] != "RPE").to_numpy()
    partial = save_predictions(tmp_path / "fold_0.npz", weak.frame[keep], weak.classes, weak.logits[keep], "test")
    with pytest.raises(ValueError, match=r"stage fold_0\) lacks \d+ of the \d+ RPE test wells"):
        merge_predictions(c["stage_files"], c["test"], c["groups"], average_with={"fold_0": partial})
