"""The chain of stages: names, notebooks, upstream stages. One list serves run_all.py and the
Kaggle builder, so local runs and Kaggle kernels cannot drift apart."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
CELL_TYPES = ("HEPG2", "HUVEC", "RPE", "U2OS")


@dataclass(frozen=True)
class Stage:
    """One notebook run. ``trains``: runs in chunks under a time budget until finished."""

    name: str
    notebook: str
    upstream: tuple[str, ...] = ()
    trains: bool = False
    params: dict = field(default_factory=dict)

    @property
    def notebook_path(self) -> Path:
        return NOTEBOOK_DIR / self.notebook


STAGES: tuple[Stage, ...] = (
    Stage("eda", "01_eda.ipynb"),
    Stage("base_cnn", "02_base_cnn.ipynb", trains=True),
    Stage("resnet50", "03_resnet50.ipynb", trains=True),
    *(Stage(f"cell_line_{ct.lower()}", "04_cell_line.ipynb", upstream=("resnet50",), trains=True,
            params={"cell_type": ct}) for ct in CELL_TYPES),
    Stage("merge", "05_merge.ipynb",
          upstream=("resnet50", *(f"cell_line_{ct.lower()}" for ct in CELL_TYPES))),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def get_stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"unknown stage {name!r}; stages are {', '.join(STAGE_NAMES)}")
