"""The stages' flat, typed configurations, built from a notebook's papermill parameters:
`TrainConfig` (training stages), `EdaConfig` and `MergeConfig`.

``from_params(params)`` rejects unknown keys (listing the valid ones), values of the
wrong type (naming parameter, expected and found type) and values out of range or outside their
choices. Papermill and JSON give lists, so list fields take lists or tuples; a string such as
"1,2" is never split into a list: it is an error. ``to_dict()`` is plain JSON data, stored in
checkpoints and as ``config.json`` beside a stage's outputs, and ``from_params(cfg.to_dict())``
gives the same config back.
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import Any, Mapping

DEVICES = ("auto", "cpu", "cuda")
AMP_MODES = ("auto", "off", "bf16", "fp16")
SPLITS = ("experiment", "random", "fold", "all")
NORMALIZATIONS = ("none", "image", "plate", "experiment")
NORM_SOURCES = ("controls", "all")
CONV1_INITS = ("repeat", "mean", "random")
HEADS = ("linear", "arcface", "combined")
PREDICT_WITH = ("best", "last")
CONTROLS = ("none", "train", "train+test")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine", "exponential")
VERIFY_MODES = ("off", "quick", "full")
# models.SUPPORTED_ARCHS, repeated here so that a config is checked without importing torch
# (tests/test_config.py checks that the two lists agree)
ARCHS = ("base_cnn", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
         "densenet121", "densenet161", "densenet169", "densenet201",
         "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4")
# Parameters that only shape how a stage runs, not what it computes: where its files go and come
# from, how long a chunk may take, how data is loaded. The local chain ignores them when it
# compares a finished stage's config.json with the parameters of a rerun (``data_dir`` is compared
# on its own, as a resolved path); every other parameter changes results.
CHUNK_PARAMS = ("time_budget_s", "resume", "checkpoint_every_steps", "chunk_steps", "num_workers", "device",
                "cache", "verify", "output_dir", "input_dirs", "data_dir")


class _Config:
    """Shared by the stage configs: building from parameters, checking types, plain data."""

    kind = "stage"

    @classmethod
    def from_params(cls, params: Mapping[str, Any]):
        """Build a config from papermill parameters; every error names the parameter."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise ValueError(f"unknown {cls.kind} parameter(s) {unknown}; valid parameters are {valid}")
        return cls(**params)

    def __post_init__(self) -> None:
        # Also runs for a config built in code, so a config is never out of range.
        hints = _type_hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        self.validate()

    def validate(self) -> None:
        pass

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data: tuples become lists."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class TrainConfig(_Config):
    """Everything a training stage needs; defaults are the seed's ResNet-50 settings."""

    # stage and files
    stage: str = "train"
    data_dir: str = ""
    output_dir: str = "out"
    input_dirs: tuple[str, ...] = ()  # upstream stage folders, or Kaggle input roots
    # runtime
    seed: int = 42
    device: str = "auto"
    num_workers: int = 0
    amp: str = "auto"
    channels_last: bool = True
    # data
    cell_type: str = ""  # "" = every cell type
    # "experiment": hold out val_experiments whole experiments per cell type; "fold": fold `fold` of
    # `folds` groups of whole experiments (metadata.split_train_val); "all": every train experiment,
    # no validation (a final fit: `validation_from` names the held-out run whose validation it reports)
    split: str = "experiment"
    val_experiments: int = 1  # per cell type, for split="experiment"
    folds: int = 3  # split="fold": folds of whole experiments per cell type
    fold: int = 0  # split="fold": the held-out fold, 0 .. folds - 1
    validation_from: str = ""  # split="all": the stage whose held-out validation metrics.json reports
    val_fraction: float = 0.025  # for split="random"
    image_size: int = 0  # 0 = native
    sites: tuple[int, ...] = (1, 2)
    normalization: str = "plate"
    norm_source: str = "controls"
    cache: bool = False
    max_train_sites: int = 0  # 0 = all; for smoke runs
    # pseudo-labels: also train on the test treatment wells that stage's merge assigned with a
    # probability >= pseudo_threshold (its pseudo_labels.csv; merge_stage.py defines the probability)
    pseudo_labels: str = ""
    pseudo_threshold: float = 0.9
    verify: str = "quick"  # check the PNGs the stage reads before training: "off" | "quick" | "full" (verify.py)
    # control wells as extra training classes: "train" those of the training experiments, "train+test"
    # those of every experiment (test_controls.csv labels are public; validation experiments are
    # treated like test ones); treatment wells are never predicted as controls
    controls: str = "none"
    # model
    arch: str = "resnet50"
    pretrained: str = ""
    conv1_init: str = "mean"
    head: str = "linear"  # "combined": softmax + ArcFace on the same features, predicted from the softmax
    arcface_margin: float = 0.1
    arcface_scale: float = 30.0
    arcface_weight: float = 0.2  # head="combined": loss = (1 - w) * softmax CE + w * ArcFace
    cell_type_dim: int = 0
    dropout: float = 0.0
    init_from: str = ""  # a stage name or the path of a model.pt
    # optimisation
    epochs: int = 15
    batch_size: int = 32  # per process; the global batch is batch_size * accum_steps * world size
    accum_steps: int = 1
    optimizer: str = "adam"
    lr: float = 3e-4
    weight_decay: float = 0.0
    schedule: str = "exponential"
    gamma: float = 0.95  # per-epoch decay of schedule="exponential"
    warmup_steps: int = 0
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    patience: int = 6  # epochs without a better validation accuracy; 0 = no early stopping
    freeze_epochs: int = 2  # train only the head for the first freeze_epochs epochs
    augment: bool = True  # the 8 dihedral views (flips, rot90s, transposes)
    crop_size: int = 0  # > 0: train on random crops of this size, predict at full size
    cutmix_prob: float = 0.0  # chance that an image gets a CutMix box from its partner
    cutmix_alpha: float = 1.0  # Beta(alpha, alpha) draws the kept area
    intensity_scale: float = 0.0  # std of the per-channel gain jitter, x * N(1, s) (normalised units)
    intensity_bias: float = 0.0  # std of the per-channel bias jitter, x + N(0, s)
    tta: bool = False
    predict_with: str = "best"  # weights that predict and that init_from hands on: best validation or last
    # chunking
    time_budget_s: float = 0.0  # 0 = no budget
    resume: str = "auto"  # "auto" | "never" | path of a checkpoint
    checkpoint_every_steps: int = 0  # 0 = at epoch ends and at stops only
    chunk_steps: int = 0  # > 0: a chunk stops after this many optimizer steps (deterministic cuts for tests)

    kind = "training"

    def validate(self) -> None:
        _validate(self)


@dataclass(frozen=True)
class EdaConfig(_Config):
    """The EDA stage (01_eda.ipynb)."""

    kind = "eda"
    data_dir: str = ""
    output_dir: str = "out/eda"
    input_dirs: tuple[str, ...] = ()  # accepted for the notebook convention; EDA has no upstream stage
    seed: int = 42  # seeds the sample of sites read per experiment
    experiments: tuple[str, ...] = ()  # plate maps and composites of these; empty: see eda.default_experiments
    n_sites_per_experiment: int = 8  # sites read per experiment for the channel statistics; 0: no images
    image_size: int = 0  # resize sites before the statistics; 0: native
    images: bool = True  # False: tables and plate maps only (the CSVs are enough), no image is read

    def validate(self) -> None:
        for name in ("seed", "n_sites_per_experiment", "image_size"):
            _check(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        _check(self.output_dir != "", "output_dir", "a non-empty string", self.output_dir)


POSTPROCESS_MODES = ("argmax", "plate_groups", "assignment")


@dataclass(frozen=True)
class MergeConfig(_Config):
    """The merge stage (05_merge.ipynb)."""

    kind = "merge"
    stage: str = "merge"
    data_dir: str = ""
    output_dir: str = "out/merge"
    input_dirs: tuple[str, ...] = ()
    stages: tuple[str, ...] = ()  # per-cell-line stages; empty: the registry's cell_line group
    # stages predicting every cell type (final fit, folds, pseudo-labelled) whose test logits are
    # averaged with each cell type's stage: their site rows are pooled, so a well's logits are the
    # mean over its sites and these models
    average_with: tuple[str, ...] = ()
    fallback_stage: str = "resnet50"  # for a cell type none of ``stages`` predicts; "": none
    postprocess: str = "assignment"

    def validate(self) -> None:
        _check(self.postprocess in POSTPROCESS_MODES, "postprocess", f"one of {POSTPROCESS_MODES}", self.postprocess)
        _check(self.output_dir != "", "output_dir", "a non-empty string", self.output_dir)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """A config class's resolved annotations (resolving them costs ~1.6 ms; configs are built often)."""
    return typing.get_type_hints(cls)


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", str(t))


def _coerce(name: str, value: Any, expected: Any) -> Any:
    """Check value against the annotation; ints widen to floats, lists become tuples."""
    if typing.get_origin(expected) is tuple:
        item_type = typing.get_args(expected)[0]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"parameter {name!r}: expected a list of {_type_name(item_type)}, "
                            f"got {type(value).__name__} {value!r}")
        return tuple(_coerce(f"{name}[{i}]", v, item_type) for i, v in enumerate(value))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # bool is an int in Python, but True for batch_size is a mistake, not a number.
    if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
        raise TypeError(f"parameter {name!r}: expected {_type_name(expected)}, "
                        f"got {type(value).__name__} {value!r}")
    return value


def _check(ok: bool, name: str, requirement: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"parameter {name!r} must be {requirement}, got {value!r}")


def check_stage_arch(cfg: TrainConfig) -> None:
    """A training *stage* builds its model with models.build_model, so ``arch`` must be one it
    knows. Checked where a stage's parameters are checked (the chain, the notebook's config cell),
    before any data is read; the training loop itself takes any model, whatever its arch name."""
    _check(cfg.arch in ARCHS, "arch", f"one of {ARCHS}", cfg.arch)


def _validate(cfg: TrainConfig) -> None:
    choices = {"device": DEVICES, "amp": AMP_MODES, "split": SPLITS, "normalization": NORMALIZATIONS,
               "norm_source": NORM_SOURCES, "conv1_init": CONV1_INITS, "head": HEADS,
               "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "verify": VERIFY_MODES,
               "predict_with": PREDICT_WITH, "controls": CONTROLS}
    for name, allowed in choices.items():
        value = getattr(cfg, name)
        _check(value in allowed, name, f"one of {allowed}", value)
    if cfg.split == "random":
        _check(0 < cfg.val_fraction < 1, "val_fraction", "in (0, 1) for split='random'", cfg.val_fraction)
    _check(cfg.folds >= 2, "folds", ">= 2", cfg.folds)
    _check(0 <= cfg.fold < cfg.folds, "fold", f"in 0 .. folds - 1 = {cfg.folds - 1}", cfg.fold)
    if cfg.split == "all":  # no validation: nothing can choose an epoch's weights or stop early
        _check(cfg.predict_with == "last", "predict_with", "'last' with split='all' (no validation)", cfg.predict_with)
        _check(cfg.patience == 0, "patience", "0 with split='all' (no validation)", cfg.patience)
    _check(0 < cfg.pseudo_threshold <= 1, "pseudo_threshold", "in (0, 1]", cfg.pseudo_threshold)
    for name in ("stage", "output_dir", "arch", "resume"):
        _check(getattr(cfg, name) != "", name, "a non-empty string", getattr(cfg, name))
    for name in ("epochs", "batch_size", "accum_steps"):
        _check(getattr(cfg, name) >= 1, name, ">= 1", getattr(cfg, name))
    for name in ("seed", "num_workers", "val_experiments", "image_size", "max_train_sites", "cell_type_dim",
                 "warmup_steps", "patience", "freeze_epochs", "checkpoint_every_steps", "chunk_steps", "weight_decay",
                 "min_lr", "arcface_margin", "time_budget_s", "crop_size", "intensity_scale", "intensity_bias"):
        _check(getattr(cfg, name) >= 0, name, ">= 0", getattr(cfg, name))
    for name in ("lr", "arcface_scale", "cutmix_alpha"):
        _check(getattr(cfg, name) > 0, name, "> 0", getattr(cfg, name))
    for name in ("val_fraction", "label_smoothing", "dropout"):
        _check(0 <= getattr(cfg, name) < 1, name, "in [0, 1)", getattr(cfg, name))
    for name in ("cutmix_prob", "arcface_weight"):
        _check(0 <= getattr(cfg, name) <= 1, name, "in [0, 1]", getattr(cfg, name))
    _check(0 < cfg.gamma <= 1, "gamma", "in (0, 1]", cfg.gamma)
    _check(cfg.min_lr <= cfg.lr, "min_lr", f"<= lr ({cfg.lr})", cfg.min_lr)
    _check(len(cfg.sites) > 0 and all(s >= 1 for s in cfg.sites) and len(set(cfg.sites)) == len(cfg.sites),
           "sites", "a non-empty list of distinct site numbers >= 1", list(cfg.sites))
