import json

import pytest

from kernel_lib.config import TrainConfig


def test_defaults_are_the_seeds_resnet50_settings():
    cfg = TrainConfig()
    assert (cfg.arch, cfg.optimizer, cfg.lr, cfg.batch_size, cfg.gamma, cfg.epochs, cfg.patience,
            cfg.freeze_epochs) == ("resnet50", "adam", 3e-4, 32, 0.95, 15, 6, 2)


def test_from_params_sets_values_and_converts_lists():
    cfg = TrainConfig.from_params({"stage": "resnet50", "sites": [1], "input_dirs": ["/kaggle/input"], "lr": 6e-4})
    assert cfg.stage == "resnet50"
    assert cfg.sites == (1,)
    assert cfg.input_dirs == ("/kaggle/input",)
    assert cfg.lr == 6e-4


def test_int_is_accepted_for_float_and_becomes_float():
    cfg = TrainConfig.from_params({"time_budget_s": 3600, "lr": 1})
    assert isinstance(cfg.time_budget_s, float) and cfg.time_budget_s == 3600.0
    assert isinstance(cfg.lr, float)


def test_unknown_keys_are_named_and_valid_ones_listed():
    with pytest.raises(ValueError) as err:
        TrainConfig.from_params({"learning_rate": 0.1, "epochs": 2})
    message = str(err.value)
    assert "learning_rate" in message and "'lr'" in message and "'epochs'" in message


@pytest.mark.parametrize("name, value, expected", [
    ("sites", "1,2", "a list of int"),  # never split a string into a list
    ("sites", [1, "2"], "int"),
    ("batch_size", 32.0, "int"),
    ("batch_size", True, "int"),  # bool is an int in Python, but not a batch size
    ("lr", "3e-4", "float"),
    ("augment", 1, "bool"),
    ("stage", 5, "str"),
])
def test_wrong_types_name_the_parameter_and_both_types(name, value, expected):
    with pytest.raises(TypeError) as err:
        TrainConfig.from_params({name: value})
    message = str(err.value)
    assert repr(name) in message or f"'{name}[" in message
    assert f"expected {expected}" in message
    assert type(value).__name__ in message or "str" in message


@pytest.mark.parametrize("name, value", [
    ("amp", "fp8"), ("schedule", "step"), ("head", "softmax"), ("split", "plate"), ("device", "tpu"),
    ("batch_size", 0), ("epochs", 0), ("accum_steps", 0), ("lr", 0.0), ("gamma", 1.5), ("gamma", 0.0),
    ("val_fraction", 1.0), ("label_smoothing", -0.1), ("patience", -1), ("time_budget_s", -5.0),
    ("sites", []), ("sites", [1, 1]), ("sites", [0]), ("min_lr", 1.0), ("stage", ""),
    ("folds", 1), ("fold", 3), ("pseudo_threshold", 0.0), ("pseudo_threshold", 1.5),
])
def test_out_of_range_values_name_the_parameter(name, value):
    with pytest.raises(ValueError, match=repr(name)):
        TrainConfig.from_params({name: value})


def test_a_final_fit_without_validation_cannot_choose_best_weights_or_stop_early():
    with pytest.raises(ValueError, match="'predict_with' must be 'last' with split='all'"):
        TrainConfig.from_params({"split": "all", "patience": 0})
    with pytest.raises(ValueError, match="'patience' must be 0 with split='all'"):
        TrainConfig.from_params({"split": "all", "predict_with": "last"})
    assert TrainConfig.from_params({"split": "all", "predict_with": "last", "patience": 0}).split == "all"


def test_direct_construction_is_validated_too():
    with pytest.raises(ValueError, match="'optimizer'"):
        TrainConfig(optimizer="sgd")


def test_to_dict_is_json_and_round_trips():
    cfg = TrainConfig.from_params({"stage": "cell_line_hepg2", "cell_type": "HEPG2", "sites": [2, 1],
                                   "input_dirs": ["a", "b/c"], "time_budget_s": 30000})
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["sites"] == [2, 1] and data["input_dirs"] == ["a", "b/c"]
    assert TrainConfig.from_params(data) == cfg


def test_config_is_immutable():
    cfg = TrainConfig()
    with pytest.raises(Exception):
        cfg.lr = 1.0
