"""The training loop on tiny CPU models: exact resume across chunks, signals, outputs, resume rules."""
import json
import math
import os
import shutil
import signal
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_loop import FakeClock, TickPerStep, TinyNet, TinySites, datasets, fresh_model, tiny_cfg  # noqa: E402

from kernel_lib import train as tr  # noqa: E402
from kernel_lib.checkpoint import load_checkpoint  # noqa: E402
from kernel_lib.config import TrainConfig  # noqa: E402


class SigtermAfter(tr.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, progress):
        if progress.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)




def final_state(out):
    return torch.load(out / "model.pt", weights_only=True), load_checkpoint(out / "checkpoint.pt")


def assert_tree_equal(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_tree_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def without_wall_time(history):
    return [{k: v for k, v in record.items() if k != "wall_time_s"} for record in history]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    train_set, val_set = datasets()
    result = tr.fit(tiny_cfg(out), fresh_model(), train_set, val_set)
    return out, result


def assert_same_run(out, reference_out):
    weights, ckpt = final_state(out)
    ref_weights, ref_ckpt = final_state(reference_out)
    assert_tree_equal(weights, ref_weights, "model")
    assert_tree_equal(ckpt["optimizer"], ref_ckpt["optimizer"], "optimizer")
    assert without_wall_time(ckpt["history"]) == without_wall_time(ref_ckpt["history"])
    assert (ckpt["step"], ckpt["epoch"], ckpt["finished"]) == (ref_ckpt["step"], ref_ckpt["epoch"], True)


def test_uninterrupted_run_trains(uninterrupted):
    out, result = uninterrupted
    assert (result.finished, result.stopped_reason, result.epochs_done, result.steps_done) == (True, "finished", 2, 12)
    initial = fresh_model().state_dict()
    weights, ckpt = final_state(out)
    # the last weights (checkpoint, last_model.pt) trained the conv in epoch 2; model.pt holds the best
    # validation epoch's (epoch 1 here: epoch 2 did not beat it), whose conv was still frozen
    assert not torch.equal(ckpt["model"]["conv.weight"], initial["conv.weight"])
    assert_tree_equal(torch.load(out / "last_model.pt", weights_only=True), ckpt["model"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["predicted_with"], metrics["predict_epoch"], metrics["best_epoch"]) == ("best", 1, 1)
    assert torch.equal(weights["conv.weight"], initial["conv.weight"])
    assert_tree_equal(weights, torch.load(out / "best_model.pt", weights_only=True))
    assert [r["epoch"] for r in result.history] == [1, 2]
    # freeze_epochs=1: the conv had no gradient in epoch 1, so Adam's state for it started in epoch 2
    conv_state = ckpt["optimizer"]["state"][0]
    head_state = ckpt["optimizer"]["state"][2]
    assert (float(conv_state["step"]), float(head_state["step"])) == (6.0, 12.0)


@pytest.mark.slow
def test_time_budget_chunks_end_bitwise_where_one_run_ends(tmp_path, uninterrupted):
    train_set, val_set = datasets()
    results = []
    for _ in range(3):
        clock = FakeClock()
        results.append(tr.fit(tiny_cfg(tmp_path, time_budget_s=4.5), fresh_model(), train_set, val_set,
                              callbacks=[TickPerStep(clock)], clock=clock))
    # 5 steps fit in 4.5 fake seconds (a step is only refused once elapsed exceeds the budget)
    assert [(r.steps_done, r.finished, r.stopped_reason) for r in results] == [
        (5, False, "time_budget"), (10, False, "time_budget"), (12, True, "finished")]
    assert_same_run(tmp_path, uninterrupted[0])


@pytest.mark.slow
def test_chunk_steps_cuts_chunks_deterministically_and_exactly(tmp_path, uninterrupted):
    train_set, val_set = datasets()
    results = [tr.fit(tiny_cfg(tmp_path, chunk_steps=6), fresh_model(), train_set, val_set) for _ in range(3)]
    # a chunk that reaches its step limit still validates and finishes the epoch it completed
    assert [(r.steps_done, r.epochs_done, r.stopped_reason) for r in results] == [
        (6, 1, "chunk_steps"), (12, 2, "finished"), (12, 2, "finished")]
    assert_same_run(tmp_path, uninterrupted[0])


@pytest.mark.slow
def test_sigterm_ends_with_a_checkpoint_and_the_resumed_run_is_exact(tmp_path, uninterrupted):
    train_set, val_set = datasets()
    before = signal.getsignal(signal.SIGTERM)
    first = tr.fit(tiny_cfg(tmp_path), fresh_model(), train_set, val_set, callbacks=[SigtermAfter(6)])
    assert signal.getsignal(signal.SIGTERM) is before
    # stopped after the epoch's last step, before its validation: the resumed chunk validates first
    assert (first.finished, first.stopped_reason, first.steps_done, first.epochs_done) == (False, "signal", 6, 0)
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert (saved["step"], saved["epoch"], saved["batch_in_epoch"], saved["history"]) == (6, 0, 12, [])
    assert json.loads((tmp_path / "metrics.json").read_text())["stopped_reason"] == "signal"
    second = tr.fit(tiny_cfg(tmp_path), fresh_model(), train_set, val_set)
    assert (second.finished, second.steps_done) == (True, 12)
    assert_same_run(tmp_path, uninterrupted[0])


def test_resume_auto_finds_a_checkpoint_nested_in_input_dirs(tmp_path):
    train_set, val_set = datasets()
    clock = FakeClock()
    tr.fit(tiny_cfg(tmp_path / "chunk1", time_budget_s=2.5), fresh_model(), train_set, val_set,
           callbacks=[TickPerStep(clock)], clock=clock)
    kaggle_input = tmp_path / "input"
    shutil.copytree(tmp_path / "chunk1", kaggle_input / "notebooks" / "someone" / "rxrx-tiny")
    cfg = tiny_cfg(tmp_path / "chunk2", input_dirs=[str(kaggle_input)], epochs=2)
    result = tr.fit(cfg, fresh_model(), train_set, val_set, callbacks=[SigtermAfter(4)])
    assert result.steps_done == 4  # resumed at step 3, stopped after one more step
    assert load_checkpoint(tmp_path / "chunk2" / "checkpoint.pt")["step"] == 4


def test_resume_refuses_a_checkpoint_of_another_arch_or_class_list(tmp_path):
    train_set, val_set = datasets()
    tr.fit(tiny_cfg(tmp_path, epochs=1), fresh_model(), train_set, val_set)
    with pytest.raises(ValueError, match="arch 'tinynet'.*'othernet'"):
        tr.fit(tiny_cfg(tmp_path, arch="othernet"), fresh_model(), train_set, val_set)
    other = ["sirna_7", "sirna_2", "sirna_9"]
    with pytest.raises(ValueError, match="class list"):
        tr.fit(tiny_cfg(tmp_path), fresh_model(), TinySites(12, classes=other), TinySites(4, classes=other))


@pytest.mark.slow
def test_resume_never_starts_fresh(tmp_path, uninterrupted):
    train_set, val_set = datasets()
    tr.fit(tiny_cfg(tmp_path, epochs=1, lr=0.5), fresh_model(), train_set, val_set)
    result = tr.fit(tiny_cfg(tmp_path, resume="never"), fresh_model(), train_set, val_set)
    assert result.steps_done == 12
    assert_same_run(tmp_path, uninterrupted[0])


def test_resuming_a_finished_run_returns_at_once(tmp_path, uninterrupted):
    train_set, val_set = datasets()
    model = fresh_model()
    result = tr.fit(tiny_cfg(tmp_path, input_dirs=[str(uninterrupted[0])]), model, train_set, val_set)
    assert (result.finished, result.steps_done) == (True, 12)
    assert torch.equal(model.state_dict()["head.weight"], final_state(uninterrupted[0])[0]["head.weight"])
    assert (tmp_path / "model.pt").is_file()  # the finished weights are copied to this output folder



def test_nan_loss_stops_with_step_and_epoch_and_keeps_the_last_good_checkpoint(tmp_path):
    class GoesNan(TinyNet):
        calls = 0

        def forward(self, x, cell_type=None):
            out = super().forward(x, cell_type)
            if self.training:
                GoesNan.calls += 1
                if GoesNan.calls == 4:
                    out = out * float("nan")
            return out

    train_set, val_set = datasets()
    torch.manual_seed(0)
    cfg = tiny_cfg(tmp_path, accum_steps=1, batch_size=4, checkpoint_every_steps=1)
    with pytest.raises(FloatingPointError, match=r"nan at step 3 \(epoch 0\)"):
        tr.fit(cfg, GoesNan(), train_set, val_set)
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["step"] == 3
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


@pytest.mark.slow
def test_early_stopping_by_validation_accuracy(tmp_path):
    class ConstantInEval(TinyNet):
        def forward(self, x, cell_type=None):
            out = super().forward(x, cell_type)
            return out if self.training else torch.zeros_like(out)

    train_set, val_set = datasets()
    torch.manual_seed(0)
    result = tr.fit(tiny_cfg(tmp_path, epochs=5, patience=2), ConstantInEval(), train_set, val_set)
    # epoch 1 sets the best accuracy, epochs 2 and 3 fail to beat it
    assert (result.finished, result.stopped_reason, result.epochs_done) == (True, "early_stopping", 3)
    assert json.loads((tmp_path / "metrics.json").read_text())["stopped_reason"] == "early_stopping"


def test_outputs(tmp_path, uninterrupted):
    out, _ = uninterrupted
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["finished"], metrics["epochs_done"], metrics["steps_done"], metrics["n_train"],
            metrics["n_val"], metrics["n_classes"], metrics["split"]) == (True, 2, 12, 24, 8, 3, "experiment")
    assert set(metrics["val_acc_well_by_cell_type"]) == {"HEPG2", "RPE"}
    assert metrics["wall_time_s"]["total"] >= metrics["wall_time_s"]["chunk"] > 0
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2] and list(history["step"]) == [6, 12]
    assert {"lr", "train_loss", "val_loss", "val_acc_site", "val_acc_well", "val_acc_well_HEPG2"} <= set(history)
    assert metrics["best_val_acc_well"] == max(history["val_acc_well"])
    assert TrainConfig.from_params(json.loads((out / "config.json").read_text())) == tiny_cfg(out)
    for name in ("loss.png", "accuracy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    weights = torch.load(out / "model.pt", weights_only=True)
    assert set(weights) == set(TinyNet().state_dict())
    assert (out / "best_model.pt").is_file()


def test_empty_training_split_finishes_with_a_warning(tmp_path):
    _, val_set = datasets()
    with pytest.warns(UserWarning, match="empty training split"):
        result = tr.fit(tiny_cfg(tmp_path), fresh_model(), TinySites(0), val_set)
    assert (result.finished, result.steps_done) == (True, 0)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["finished"] and "empty training split: nothing to train" in metrics["warnings"]


def test_class_only_in_validation_is_a_recorded_warning(tmp_path):
    train_set = TinySites(12, labels=[0, 1] * 6, seed=1)
    val_set = TinySites(4, labels=[0, 1, 2, 2], seed=2)
    with pytest.warns(UserWarning):
        tr.fit(tiny_cfg(tmp_path, epochs=1), fresh_model(), train_set, val_set)
    assert json.loads((tmp_path / "metrics.json").read_text())["warnings"] == [
        "class UNTREATED in validation never seen in training"]


def test_unlabelled_training_sites_are_an_error_naming_a_site(tmp_path):
    with pytest.raises(ValueError, match="2 sites without a sirna label, e.g. HEPG2-01_1_W01"):
        tr.fit(tiny_cfg(tmp_path), fresh_model(), TinySites(3, labels=[0, -1, 1]), TinySites(2))


def test_learning_rate_is_a_function_of_the_step():
    cfg = tiny_cfg("x", schedule="exponential", lr=1.0, gamma=0.5, warmup_steps=0)
    assert [tr.learning_rate(cfg, s, 10, 100) for s in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    cfg = tiny_cfg("x", schedule="cosine", lr=1.0, min_lr=0.2, warmup_steps=4)
    assert tr.learning_rate(cfg, 0, 10, 104) == 0.25  # warm-up: (step + 1) / warmup_steps
    assert tr.learning_rate(cfg, 4, 10, 104) == 1.0
    assert math.isclose(tr.learning_rate(cfg, 54, 10, 104), 0.6)
    assert math.isclose(tr.learning_rate(cfg, 104, 10, 104), 0.2)
    assert tr.learning_rate(tiny_cfg("x", schedule="constant", lr=0.3, warmup_steps=0), 77, 10, 100) == 0.3


def test_epoch_order_depends_on_seed_and_epoch_only():
    a = tr.epoch_order(1, 0, 50)
    assert torch.equal(a, tr.epoch_order(1, 0, 50))
    assert sorted(a.tolist()) == list(range(50))
    assert not torch.equal(a, tr.epoch_order(1, 1, 50)) and not torch.equal(a, tr.epoch_order(2, 0, 50))


@pytest.mark.slow
def test_old_checkpoint_format_is_a_clear_error(tmp_path):
    train_set, val_set = datasets()
    tr.fit(tiny_cfg(tmp_path, epochs=1), fresh_model(), train_set, val_set)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    torch.save({**state, "format_version": 0}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="old.pt: checkpoint format version 0"):
        tr.fit(tiny_cfg(tmp_path, resume=str(tmp_path / "old.pt")), fresh_model(), train_set, val_set)


def test_init_from_a_stage_name_loads_that_stages_model(tmp_path, uninterrupted):
    out, _ = uninterrupted
    inputs = tmp_path / "input"
    shutil.copytree(out, inputs / "datasets" / "someone" / "tiny-weights")
    empty, val_set = TinySites(0), datasets()[1]
    cfg = tiny_cfg(tmp_path / "ft", stage="tiny_ft", init_from="tiny", input_dirs=[str(inputs)])
    with pytest.warns(UserWarning, match="empty training split"):
        tr.fit(cfg, fresh_model(), empty, val_set)  # nothing to train: model.pt holds the initial weights
    assert_tree_equal(torch.load(tmp_path / "ft" / "model.pt", weights_only=True),
                      torch.load(out / "model.pt", weights_only=True))
    with pytest.raises(FileNotFoundError, match="no output of stage 'resnet50'"):
        tr.fit(tiny_cfg(tmp_path / "ft2", stage="x", init_from="resnet50", input_dirs=[str(inputs)]),
               fresh_model(), empty, val_set)


class SigintAfter(tr.Callback):
    def on_step_end(self, progress):
        if progress.step == 2:
            os.kill(os.getpid(), signal.SIGINT)


def test_sigint_also_stops_at_the_next_step_boundary(tmp_path):
    train_set, val_set = datasets()
    before = signal.getsignal(signal.SIGINT)
    result = tr.fit(tiny_cfg(tmp_path, epochs=1), fresh_model(), train_set, val_set, callbacks=[SigintAfter()])
    assert (result.stopped_reason, result.steps_done) == ("signal", 2)
    assert signal.getsignal(signal.SIGINT) is before
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2


def test_splits_with_different_class_lists_are_refused(tmp_path):
    with pytest.raises(ValueError, match="one class vocabulary"):
        tr.fit(tiny_cfg(tmp_path), fresh_model(), TinySites(4), TinySites(2, classes=["x", "y", "z"]))


# ---------------------------------------------------------------- every augmentation on; best or last weights

ALL_AUGMENTATIONS = dict(augment=True, crop_size=4, cutmix_prob=0.7, cutmix_alpha=1.0, intensity_scale=0.2,
                         intensity_bias=0.2)


@pytest.fixture(scope="module")
def uninterrupted_augmented(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted_augmented")
    train_set, val_set = datasets()
    return out, tr.fit(tiny_cfg(out, **ALL_AUGMENTATIONS), fresh_model(), train_set, val_set)


@pytest.mark.slow  # four fits
def test_chunks_with_every_augmentation_end_bitwise_where_one_run_ends(tmp_path, uninterrupted, uninterrupted_augmented):
    out, result = uninterrupted_augmented
    assert (result.finished, result.steps_done) == (True, 12)
    # the augmentations changed the trajectory (crops, jitter and CutMix are not no-ops) ...
    assert not torch.equal(load_checkpoint(out / "checkpoint.pt")["model"]["head.weight"],
                           load_checkpoint(uninterrupted[0] / "checkpoint.pt")["model"]["head.weight"])
    # ... and cutting the run at steps that are not epoch ends (5, 10) changes nothing, bitwise
    train_set, val_set = datasets()
    results = [tr.fit(tiny_cfg(tmp_path, chunk_steps=5, **ALL_AUGMENTATIONS), fresh_model(), train_set, val_set)
               for _ in range(3)]
    assert [r.steps_done for r in results] == [5, 10, 12]
    assert_same_run(tmp_path, out)


class PeaksInEpochOne(TinyNet):
    """Validation (in dataset order) sees the true labels' one-hot logits in epoch 1 only, zeros after."""

    def __init__(self, answers):
        super().__init__()
        self.answers, self.phase, self.seen = answers, 0, 0

    def forward(self, x, cell_type=None):
        out = super().forward(x, cell_type)
        if self.training:
            return out
        if self.phase:
            return torch.zeros_like(out)
        labels = self.answers[self.seen:self.seen + len(x)]
        self.seen += len(x)
        return torch.nn.functional.one_hot(labels, out.shape[1]).float()


class Snapshots(tr.Callback):
    def __init__(self, model):
        self.model, self.states = model, {}

    def on_epoch_end(self, progress, record):
        self.states[record["epoch"]] = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.model.phase = record["epoch"]


@pytest.mark.slow  # two fits per case
@pytest.mark.parametrize("predict_with", ["best", "last"])
def test_prediction_weights_are_the_best_validation_epochs_unless_last_is_asked(tmp_path, predict_with):
    train_set, val_set = datasets()
    torch.manual_seed(0)
    model = PeaksInEpochOne(torch.tensor(val_set.frame["label"].to_numpy()))
    snapshots = Snapshots(model)
    result = tr.fit(tiny_cfg(tmp_path, epochs=3, freeze_epochs=0, predict_with=predict_with), model, train_set,
                    val_set, callbacks=[snapshots])
    accuracies = [r["val_acc_well"] for r in result.history]
    assert accuracies[0] == 1.0 and max(accuracies[1:]) < 1.0
    chosen = snapshots.states[1 if predict_with == "best" else 3]
    assert not torch.equal(snapshots.states[1]["head.weight"], snapshots.states[3]["head.weight"])
    # the weights the stage predicts with (the model object) and hands downstream (model.pt)
    assert_tree_equal(model.state_dict(), chosen, "model in memory")
    assert_tree_equal(torch.load(tmp_path / "model.pt", weights_only=True), chosen, "model.pt")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["predict_with"], metrics["predicted_with"], metrics["predict_epoch"], metrics["best_epoch"]) == (
        predict_with, predict_with, 1 if predict_with == "best" else 3, 1)
    # the checkpoint keeps the last weights either way; resuming the finished run predicts with the same ones
    assert_tree_equal(load_checkpoint(tmp_path / "checkpoint.pt")["model"], snapshots.states[3], "checkpoint")
    again = fresh_model()
    tr.fit(tiny_cfg(tmp_path / "next_chunk", epochs=3, freeze_epochs=0, predict_with=predict_with,
                    input_dirs=[str(tmp_path)]), again, train_set, val_set)
    assert_tree_equal(again.state_dict(), chosen, "resumed in another folder")
