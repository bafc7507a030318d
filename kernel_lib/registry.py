"""The stage registry: the one place that knows every stage of the chain.

Each stage has a name, a notebook, a kind (``eda``, ``train`` or ``merge``: which config validates
its parameters), a group (the four per-cell-line runs of one notebook form group ``cell_line``),
its upstream stages, its fixed parameters, and its parameters per profile. The local chain, the
Kaggle build, ``--list`` and the merge's default list of per-cell-line stages all read it.

Optional stages (``optional=True``) run only when enabled: by their profile (``PROFILE_EXTRAS``) or
by the user (``--with NAME``, a stage or a group; `enabled_stages`). They are the winners' uses of the
held-out data and of the test wells: ``final_fit`` (the main stage's settings on every train
experiment), group ``fold`` (``FOLDS`` folds grouped by experiment), ``pseudo_label`` (fine-tuned on
the merge's confident test wells) and ``merge_pseudo`` (the final submission with it). The stages
marked ``averaged`` predict every cell type; a merge averages the enabled ones among its upstream
with each cell type's stage.

Profiles: ``full`` holds the stages' real-data defaults (the seed's settings at real scale);
``synthetic`` fits the embedded dataset into minutes on 2 CPU cores; ``smoke`` is tiny, for
checking that a chain runs on any data. Every other profile is applied on top of ``full``. A
profile entry is keyed by stage name or group.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
CELL_TYPES = ("HEPG2", "HUVEC", "RPE", "U2OS")
KINDS = ("eda", "train", "merge")
CELL_LINE = "cell_line"


@dataclass(frozen=True)
class Stage:
    """One notebook run. Training stages run in chunks under a time budget until finished."""

    name: str
    notebook: str
    kind: str
    group: str = ""
    upstream: tuple[str, ...] = ()
    params: dict = field(default_factory=dict)  # fixed: the stage's identity (e.g. its cell type)
    like: str = ""  # takes the profile parameters of this stage (final_fit and the folds: resnet50's)
    optional: bool = False  # in a chain only when enabled (enabled_stages)
    averaged: bool = False  # predicts every cell type: a merge downstream averages it in when enabled

    @property
    def trains(self) -> bool:
        return self.kind == "train"

    @property
    def notebook_path(self) -> Path:
        return NOTEBOOK_DIR / self.notebook

    @property
    def profile_key(self) -> str:
        """The key of this stage's entry in a profile: ``like``, else its group, else its name."""
        return self.like or self.group or self.name


def _cell_line_stage(cell_type: str) -> Stage:
    return Stage(f"{CELL_LINE}_{cell_type.lower()}", "04_cell_line.ipynb", "train", group=CELL_LINE,
                 upstream=("resnet50",), params={"cell_type": cell_type})


# K folds grouped by experiment (split="fold"): 3, because the real data has 3 U2OS train
# experiments, so that every fold validates on every cell type (the 1st place used 6)
FOLDS = 3
FOLD = "fold"


def _fold_stage(k: int) -> Stage:
    return Stage(f"{FOLD}_{k}", "03_resnet50.ipynb", "train", group=FOLD, like="resnet50", optional=True,
                 averaged=True, params={"split": "fold", "folds": FOLDS, "fold": k})


_CELL_LINES = tuple(f"{CELL_LINE}_{ct.lower()}" for ct in CELL_TYPES)
_AVERAGED = ("final_fit", *(f"{FOLD}_{k}" for k in range(FOLDS)))
# eda and base_cnn: not merged (the merge takes the cell lines and the resnet50 fallback), read for
# the index page the merge writes, so that on Kaggle its kernel's output holds the whole result
_MERGE_UPSTREAM = ("eda", "base_cnn", "resnet50", *_AVERAGED, *_CELL_LINES)
STAGES: tuple[Stage, ...] = (
    Stage("eda", "01_eda.ipynb", "eda"),
    Stage("base_cnn", "02_base_cnn.ipynb", "train"),
    Stage("resnet50", "03_resnet50.ipynb", "train"),
    # the main stage's settings on every train experiment; its metrics report resnet50's validation
    Stage("final_fit", "03_resnet50.ipynb", "train", upstream=("resnet50",), like="resnet50", optional=True,
          averaged=True, params={"split": "all", "predict_with": "last", "patience": 0,
                                 "validation_from": "resnet50"}),
    *(_fold_stage(k) for k in range(FOLDS)),
    *(_cell_line_stage(ct) for ct in CELL_TYPES),
    Stage("merge", "05_merge.ipynb", "merge", upstream=_MERGE_UPSTREAM),
    # fine-tuned from resnet50 on the train split plus the merge's confident test wells
    Stage("pseudo_label", "06_pseudo_label.ipynb", "train", upstream=("resnet50", "merge"), optional=True,
          averaged=True, params={"pseudo_labels": "merge"}),
    # merge too: its row and figures on the index page this final merge writes
    Stage("merge_pseudo", "05_merge.ipynb", "merge", upstream=(*_MERGE_UPSTREAM, "merge", "pseudo_label"), optional=True),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
# optional stages a profile runs without --with
PROFILE_EXTRAS: dict[str, tuple[str, ...]] = {"winners": ("pseudo_label", "merge_pseudo")}

# The seed's real-scale settings; anything not named is TrainConfig's default (the seed's ResNet-50).
_FULL_TRAIN = {"device": "auto", "num_workers": 2, "image_size": 512, "normalization": "plate", "split": "experiment"}
_FAST_TRAIN = {"device": "cpu", "num_workers": 0, "image_size": 0, "batch_size": 32, "freeze_epochs": 0,
               "patience": 0}
# The 2019 1st place's ingredients: DenseNet-161 at 512 px (trained on 384-px crops,
# predicted whole), a new random 6-channel first conv over ImageNet weights when a file is found
# (pretrained="auto": the hub cache or any Kaggle input; else from scratch, said in metrics.json),
# controls of train and test experiments as classes, 0.8 softmax + 0.2 ArcFace, CutMix, dihedral views,
# per-channel scale/bias jitter, Adam with warm-up and cosine decay, fp16 on a T4, best-validation
# weights, 8-view TTA. Batch 16 x 2 accumulation steps (DenseNet-161 at 384 px in 16 GB).
_WINNERS_TRAIN = {**_FULL_TRAIN, "arch": "densenet161", "pretrained": "auto", "conv1_init": "random",
                  "controls": "train+test", "head": "combined", "arcface_weight": 0.2, "arcface_margin": 0.1,
                  "crop_size": 384, "cutmix_prob": 0.5, "cutmix_alpha": 1.0, "intensity_scale": 0.1,
                  "intensity_bias": 0.1, "augment": True, "optimizer": "adam", "schedule": "cosine",
                  "min_lr": 1e-6, "batch_size": 16, "accum_steps": 2, "freeze_epochs": 0, "patience": 0,
                  "predict_with": "best", "tta": True, "amp": "auto"}
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "eda": {"n_sites_per_experiment": 8},
        "base_cnn": {**_FULL_TRAIN, "arch": "base_cnn", "epochs": 2, "lr": 3e-4, "schedule": "constant",
                     "freeze_epochs": 0, "patience": 0},
        "resnet50": {**_FULL_TRAIN, "arch": "resnet50", "epochs": 15, "lr": 3e-4, "schedule": "exponential",
                     "gamma": 0.95, "freeze_epochs": 2, "patience": 6},
        CELL_LINE: {**_FULL_TRAIN, "arch": "resnet50", "init_from": "resnet50", "epochs": 15, "lr": 4e-4,
                    "schedule": "exponential", "gamma": 0.95, "freeze_epochs": 0, "patience": 6},
        "pseudo_label": {**_FULL_TRAIN, "arch": "resnet50", "init_from": "resnet50", "epochs": 5, "lr": 1e-4,
                         "schedule": "exponential", "gamma": 0.95, "freeze_epochs": 0, "patience": 3,
                         "pseudo_threshold": 0.9},
    },
    "synthetic": {
        "eda": {"n_sites_per_experiment": 4},
        "base_cnn": {**_FAST_TRAIN, "epochs": 2, "lr": 3e-4},
        # The ingredients that helped in the ablation (benchmarks/RESULTS.md): the controls of train and
        # test experiments as classes, the combined head, dihedral views (on by default), best-validation
        # weights (the default). To fit them in the 5-minute chain the ResNet stages train a ResNet-18 (a
        # 2-core CPU step at 32 px costs half a ResNet-50's; the real-data profiles keep ResNet-50) and the
        # cell lines fine-tune one epoch. CutMix, crops and jitter hurt at a few epochs: off.
        "resnet50": {**_FAST_TRAIN, "arch": "resnet18", "image_size": 32, "epochs": 4, "lr": 2e-3,
                     "schedule": "cosine", "warmup_steps": 5, "head": "combined", "controls": "train+test"},
        CELL_LINE: {**_FAST_TRAIN, "arch": "resnet18", "image_size": 32, "epochs": 1, "lr": 5e-4,
                    "schedule": "cosine", "head": "combined", "controls": "train+test"},
        "pseudo_label": {**_FAST_TRAIN, "arch": "resnet18", "image_size": 32, "epochs": 2, "lr": 5e-4,
                         "schedule": "cosine", "head": "combined", "controls": "train+test"},
    },
    "smoke": {
        "eda": {"n_sites_per_experiment": 1},
        "base_cnn": {**_FAST_TRAIN, "epochs": 1, "image_size": 32, "batch_size": 8, "max_train_sites": 64},
        "resnet50": {**_FAST_TRAIN, "arch": "resnet18", "epochs": 1, "image_size": 32, "batch_size": 8,
                     "max_train_sites": 64},
        CELL_LINE: {**_FAST_TRAIN, "arch": "resnet18", "epochs": 1, "image_size": 32, "batch_size": 8,
                    "max_train_sites": 32},
        "pseudo_label": {**_FAST_TRAIN, "arch": "resnet18", "epochs": 1, "image_size": 32, "batch_size": 8,
                         "max_train_sites": 32},
    },
    # The 2019 winners' recipe on the real data, every ingredient switchable by -p; its T4 hours:
    # `python run_all.py kaggle plan --profile winners` (gpu_plan.py).
    "winners": {
        "resnet50": {**_WINNERS_TRAIN, "epochs": 55, "lr": 3e-4, "warmup_steps": 2000},
        CELL_LINE: {**_WINNERS_TRAIN, "init_from": "resnet50", "epochs": 8, "lr": 1e-4, "warmup_steps": 100},
        # a short fine-tune of the main model on train + confident test wells (the 1st place's last step)
        "pseudo_label": {**_WINNERS_TRAIN, "init_from": "resnet50", "epochs": 3, "lr": 5e-5, "warmup_steps": 100,
                         "pseudo_threshold": 0.9},
    },
}


def split_names(text: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``: the comma-separated lists of ``--only``, ``--with``, ``--chunks``."""
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def get_stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"unknown stage {name!r}; stages are {', '.join(STAGE_NAMES)}")


def group_members(group: str) -> list[str]:
    """The stages of a group, in chain order (``cell_line``: the four per-cell-line stages)."""
    return [s.name for s in STAGES if s.group == group]


def enabled_stages(profile: str, extra: Sequence[str] = ()) -> list[str]:
    """The stages a chain of ``profile`` runs, in chain order: every stage that is not optional,
    the profile's ``PROFILE_EXTRAS`` and ``extra`` (stage or group names; ``--with``)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; profiles are {sorted(PROFILES)}")
    wanted = set(PROFILE_EXTRAS.get(profile, ()))
    groups = {s.group for s in STAGES if s.group}
    for name in extra:
        if name in groups:
            wanted.update(group_members(name))
        elif name in STAGE_NAMES:
            wanted.add(name)
        else:
            optional = [s.name for s in STAGES if s.optional]
            raise ValueError(f"--with {name!r}: not a stage or group; the optional stages are {', '.join(optional)} "
                             f"(group {FOLD}: {', '.join(group_members(FOLD))})")
    if "merge_pseudo" in wanted:  # it reads pseudo_label; asking for either runs both
        wanted.add("pseudo_label")
    if "pseudo_label" in wanted:
        wanted.add("merge_pseudo")
    return [s.name for s in STAGES if not s.optional or s.name in wanted]


def final_merge(enabled: Sequence[str]) -> str:
    """The merge stage whose submission.csv is the chain's: the last enabled merge."""
    return [n for n in enabled if get_stage(n).kind == "merge"][-1]


def profile_params(profile: str, stage: Stage) -> dict[str, Any]:
    """A stage's parameters in a profile (on top of ``full``), before its fixed ones and the user's."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; profiles are {sorted(PROFILES)}")
    return {**PROFILES["full"].get(stage.profile_key, {}), **PROFILES[profile].get(stage.profile_key, {})}
