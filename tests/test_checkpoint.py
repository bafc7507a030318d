import os
import random
import time

import numpy as np
import pytest
import torch

from kernel_lib import checkpoint as ck


def make_state(step: int, stage: str = "resnet50", arch: str = "resnet50", classes=("a", "b")) -> dict:
    model = torch.nn.Linear(3, len(classes))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return {"stage": stage, "arch": arch, "classes": list(classes), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": None, "step": step, "epoch": 0, "batch_in_epoch": step,
            "best_metric": -float("inf"), "epochs_without_improvement": 0, "config": {"lr": 0.1, "sites": [1, 2]},
            "rng": ck.capture_rng_state(), "history": [{"epoch": 1, "val_acc_well": 0.5}], "finished": False}


def test_saved_checkpoint_loads_with_weights_only(tmp_path):
    state = make_state(7)
    path = ck.save_checkpoint(tmp_path / "checkpoint.pt", state)
    plain = torch.load(path, weights_only=True)  # no pickled objects of any kind
    assert plain["format_version"] == ck.FORMAT_VERSION
    loaded = ck.load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["history"] == [{"epoch": 1, "val_acc_well": 0.5}]
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])


def test_second_save_keeps_the_first_as_prev(tmp_path):
    ck.save_checkpoint(tmp_path / "checkpoint.pt", make_state(1))
    ck.save_checkpoint(tmp_path / "checkpoint.pt", make_state(2))
    assert ck.load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2
    assert ck.load_checkpoint(tmp_path / "checkpoint.prev.pt")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]


def test_a_save_that_fails_midway_leaves_the_good_copy(tmp_path, monkeypatch):
    path = ck.save_checkpoint(tmp_path / "checkpoint.pt", make_state(1))

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(path, make_state(2))
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left


def test_non_plain_content_is_refused_at_save_naming_the_entry(tmp_path):
    state = make_state(1)
    state["history"] = [{"epoch": 1, "val_acc_well": np.float64(0.5)}]
    with pytest.raises(TypeError, match=r"\['history'\]\[0\]\['val_acc_well'\] is a float64"):
        ck.save_checkpoint(tmp_path / "checkpoint.pt", state)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_truncated_checkpoint_error_names_the_file(tmp_path):
    path = ck.save_checkpoint(tmp_path / "checkpoint.pt", make_state(1))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="checkpoint.pt.*truncated or corrupt"):
        ck.load_checkpoint(path)


def test_other_format_version_is_named(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({**make_state(1), "format_version": 0}, path)
    with pytest.raises(ValueError, match="format version 0.*reads version 1"):
        ck.load_checkpoint(path)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        ck.load_checkpoint(tmp_path / "nothere.pt")


def test_find_latest_searches_nested_inputs_skips_corrupt_and_other_stages(tmp_path):
    out = tmp_path / "working" / "resnet50"
    ck.save_checkpoint(out / "checkpoint.pt", make_state(3))
    nested = tmp_path / "input" / "notebooks" / "user" / "rxrx-resnet50-chunk-2"
    ck.save_checkpoint(nested / "checkpoint.pt", make_state(7))
    truncated = tmp_path / "input" / "broken" / "checkpoint.pt"
    ck.save_checkpoint(truncated, make_state(9))
    truncated.write_bytes(truncated.read_bytes()[:100])
    ck.save_checkpoint(tmp_path / "input" / "other" / "checkpoint.pt", make_state(20, stage="base_cnn"))
    with pytest.warns(UserWarning, match="broken"):
        found = ck.find_latest_checkpoint("resnet50", [out, tmp_path / "input", tmp_path / "absent"])
    assert found == (nested / "checkpoint.pt").resolve()
    assert ck.find_latest_checkpoint("cell_line_rpe", [tmp_path]) is None


def test_find_latest_looks_at_prev_and_breaks_step_ties_by_mtime(tmp_path):
    ck.save_checkpoint(tmp_path / "a" / "checkpoint.pt", make_state(5))
    ck.save_checkpoint(tmp_path / "a" / "checkpoint.pt", make_state(4))  # step 5 is now the .prev
    assert ck.find_latest_checkpoint("resnet50", [tmp_path]).name == "checkpoint.prev.pt"
    ck.save_checkpoint(tmp_path / "b" / "checkpoint.pt", make_state(5))
    later = time.time() + 100
    os.utime(tmp_path / "b" / "checkpoint.pt", (later, later))
    assert ck.find_latest_checkpoint("resnet50", [tmp_path]) == (tmp_path / "b" / "checkpoint.pt").resolve()


def test_check_compatible_refuses_other_arch_and_classes(tmp_path):
    state = make_state(1, arch="resnet50", classes=("a", "b"))
    ck.check_compatible(state, path="x.pt", arch="resnet50", classes=["a", "b"])
    with pytest.raises(ValueError, match="x.pt.*arch 'resnet50'.*'densenet161'"):
        ck.check_compatible(state, path="x.pt", arch="densenet161", classes=["a", "b"])
    with pytest.raises(ValueError, match="class list"):
        ck.check_compatible(state, path="x.pt", arch="resnet50", classes=["a", "c"])
    with pytest.raises(ValueError, match="other order"):
        ck.check_compatible(state, path="x.pt", arch="resnet50", classes=["b", "a"])


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    torch.save(ck.capture_rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.standard_normal(3), np.random.rand(2), random.random(), random.gauss(0, 1))
    ck.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.standard_normal(3), np.random.rand(2), random.random(), random.gauss(0, 1))
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and np.array_equal(expected[2], again[2])
    assert expected[3:] == again[3:]


def test_find_latest_refuses_to_skip_this_stages_checkpoint_of_another_version(tmp_path):
    ck.save_checkpoint(tmp_path / "a" / "checkpoint.pt", make_state(3))
    (tmp_path / "b").mkdir()
    torch.save({**make_state(9), "format_version": 2}, tmp_path / "b" / "checkpoint.pt")
    with pytest.raises(ValueError, match="b/checkpoint.pt: checkpoint format version 2"):
        ck.find_latest_checkpoint("resnet50", [tmp_path])
    torch.save({**make_state(9, stage="base_cnn"), "format_version": 2}, tmp_path / "b" / "checkpoint.pt")
    assert ck.find_latest_checkpoint("resnet50", [tmp_path]) == (tmp_path / "a" / "checkpoint.pt").resolve()
