"""Shared fixtures: the real RxRx1 metadata (tests/fixtures/rxrx1/metadata, a copy of the
competition's CSVs) and a copy of it relabelled in the re-release's string vocabulary."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# plain `pytest` (not only `python -m pytest`) must import the repository's kernel_lib
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# Where PYTHONDONTWRITEBYTECODE is set (this project's 2-core machine sets it), every run would compile
# kernel_lib and the tests again and redo pytest's assertion rewriting: ~8 s of a ~50 s fast loop
# there. This process keeps its bytecode (__pycache__/ is git-ignored; kaggle_build leaves it out);
# the notebook kernels and Kaggle sandboxes it starts keep the variable.
sys.dont_write_bytecode = False

import numpy as np
import pandas as pd
import pytest

from kernel_lib import metadata



def pytest_configure(config: pytest.Config) -> None:
    # `python -m pytest -m "not slow"` is the developers' fast loop (under a minute); CI runs all
    config.addinivalue_line("markers", "slow: executes notebooks, the chain, torchrun/DDP or several fits; starts "
                            "processes; or computes at the real data's scale (GPU plans, real-layout merges)")


FIXTURES = Path(__file__).resolve().parent / "fixtures" / "rxrx1"
METADATA_FILES = ("train.csv", "test.csv", "train_controls.csv", "test_controls.csv", "sample_submission.csv")


@pytest.fixture(scope="session")
def real_metadata_dir() -> Path:
    return FIXTURES / "metadata"


@pytest.fixture(scope="session")
def real_wells(real_metadata_dir: Path) -> pd.DataFrame:
    return metadata.read_wells(real_metadata_dir)


@pytest.fixture(scope="session")
def string_vocabulary(real_metadata_dir: Path, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(folder, numeric -> string label map): the real CSVs with every siRNA renamed
    ``sirna_<k>`` under a shuffled numbering and the negative control ``UNTREATED``."""
    frames = {name: pd.read_csv(real_metadata_dir / name, dtype=str, keep_default_na=False)
              for name in METADATA_FILES}
    labels = sorted({l for f in frames.values() if "sirna" in f.columns for l in f["sirna"]} - {"1138"}, key=int)
    numbers = np.random.default_rng(7).permutation(len(labels)) + 1
    mapping = {l: f"sirna_{k}" for l, k in zip(labels, numbers)} | {"1138": "UNTREATED"}
    folder = tmp_path_factory.mktemp("rxrx1_string_vocabulary")
    for name, frame in frames.items():
        if name != "test.csv":
            frame = frame.assign(sirna=frame["sirna"].map(mapping))
        frame.to_csv(folder / name, index=False)
    return folder, mapping


# --- synthetic datasets for the data layer tests (test_synthetic.py, test_data.py) ---

@pytest.fixture(scope="session")
def small_synthetic_spec():
    """4 cell types x 3 experiments (2 train, 1 test) x 4 plates, 3 siRNAs per plate group, 16x16 sites."""
    from kernel_lib import synthetic

    return synthetic.SyntheticSpec(image_size=16, sirnas_per_group=3, train_experiments=2)


@pytest.fixture(scope="session")
def small_synthetic(small_synthetic_spec, tmp_path_factory) -> Path:
    """The data folder of ``small_synthetic_spec``, generated once per session (about a second)."""
    from kernel_lib import synthetic

    return synthetic.ensure(tmp_path_factory.mktemp("synthetic"), small_synthetic_spec, progress=False)


@pytest.fixture
def small_synthetic_copy(small_synthetic, tmp_path) -> Path:
    """A copy of ``small_synthetic`` to break (tmp_path/"data"): CSVs copied, PNGs hard-linked (4,472
    files: 0.15 s instead of 1-3 s for a copy). Unlink a PNG before writing a new one in its place:
    writing into a link would change the session's dataset too."""
    data = tmp_path / "data"
    shutil.copytree(small_synthetic, data, copy_function=_copy_csv_link_png)
    return data


@pytest.fixture
def small_synthetic_csvs(small_synthetic, tmp_path) -> Path:
    """``small_synthetic`` with CSVs of its own to edit (tmp_path/"data"); its PNG trees train/ and
    test/ are symlinks to the session's (the readers follow them; nothing here may write there)."""
    data = tmp_path / "data"
    data.mkdir()
    for entry in small_synthetic.iterdir():
        if entry.is_dir():
            (data / entry.name).symlink_to(entry, target_is_directory=True)
        else:
            shutil.copy2(entry, data / entry.name)
    return data


def _copy_csv_link_png(src: str, dst: str) -> None:
    if src.endswith(".png"):
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)
