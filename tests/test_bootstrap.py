"""The notebooks' bootstrap cell finds kernel_lib under /kaggle/input (KAGGLE_ROOT moves it): an
unpacked kernel_lib/ first, else the dataset's python.zip (zipimport), else, when kernel_lib is not
importable either, it stops with the listing of /kaggle/input to depth 4."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kernel_lib.registry import STAGES

REPO = Path(__file__).resolve().parent.parent
LIB = REPO / "kernel_lib"
NOTEBOOKS = sorted({s.notebook_path for s in STAGES})


def bootstrap_cell(path: Path) -> str:
    """The code cell after the parameters cell: the one that finds kernel_lib."""
    cells = json.loads(path.read_text())["cells"]
    index = next(i for i, c in enumerate(cells) if "parameters" in c["metadata"].get("tags", []))
    return "".join(cells[index + 1]["source"])


def finder(source: str) -> str:
    """The cell's lines before its first kernel_lib import: what runs before kernel_lib exists."""
    lines = source.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(("from kernel_lib", "import kernel_lib")))
    return "\n".join(lines[:first])


def test_every_notebook_has_the_same_finder():
    finders = {p.name: finder(bootstrap_cell(p)) for p in NOTEBOOKS}
    assert len(set(finders.values())) == 1, finders
    assert "python.zip" in next(iter(finders.values()))


def run_finder(root: Path, cwd: Path) -> subprocess.CompletedProcess:
    """The finder in a fresh interpreter that cannot import the repository's kernel_lib (-I: no
    PYTHONPATH, no current folder), then an import of kernel_lib and one of its modules."""
    code = finder(bootstrap_cell(NOTEBOOKS[0])) + (
        "\nimport kernel_lib, kernel_lib.outputs\nprint('FROM', kernel_lib.__file__)\n")
    return subprocess.run([sys.executable, "-I", "-c", code], cwd=cwd, capture_output=True, text=True,
                          env={"KAGGLE_ROOT": str(root), "PATH": "/usr/bin:/bin"})


def copy_lib(target: Path) -> None:
    shutil.copytree(LIB, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def zip_lib(path: Path) -> None:
    """python.zip as ``kaggle datasets create --dir-mode zip`` makes it: kernel_lib/... inside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(LIB.rglob("*.py")):
            z.write(f, f.relative_to(LIB.parent).as_posix())


def test_an_unpacked_copy_is_found_before_a_zip(tmp_path):
    root = tmp_path / "kaggle"
    copy_lib(root / "input" / "datasets" / "me" / "rxrx1-kernel-lib" / "python" / "kernel_lib")
    zip_lib(root / "input" / "aaa" / "python.zip")  # sorts first, but an unpacked copy wins
    (root / "input" / "recursion-cellular-image-classification").mkdir(parents=True)
    done = run_finder(root, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "FROM " + str(root / "input" / "datasets" / "me" / "rxrx1-kernel-lib" / "python"
                                                / "kernel_lib" / "__init__.py")


def test_only_a_zip_is_imported_from_the_zip(tmp_path):
    root = tmp_path / "kaggle"
    zipped = root / "input" / "rxrx1-kernel-lib" / "python.zip"
    zip_lib(zipped)
    done = run_finder(root, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "FROM " + str(zipped / "kernel_lib" / "__init__.py")


def test_nothing_found_stops_with_the_input_listing_to_depth_4(tmp_path):
    root = tmp_path / "kaggle"
    deep = root / "input" / "competitions" / "rxrx1" / "train" / "HEPG2-01" / "Plate1"
    deep.mkdir(parents=True)
    (deep / "B02_s1_w1.png").write_bytes(b"")
    (root / "input" / "rxrx1-kernel-lib" / "python").mkdir(parents=True)  # an empty dataset
    done = run_finder(root, tmp_path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    message = lines[next(i for i, line in enumerate(lines) if line.startswith("ModuleNotFoundError")):]
    assert message[0].startswith("ModuleNotFoundError: kernel_lib: no kernel_lib/__init__.py nor python.zip under "
                                 + str(root / "input"))
    listed = [line[len(str(root / "input")) + 1:] for line in message[1:]]
    # depth 5 (Plate1) and the PNG below it are not listed
    assert listed == ["competitions", "competitions/rxrx1", "competitions/rxrx1/train",
                      "competitions/rxrx1/train/HEPG2-01", "rxrx1-kernel-lib", "rxrx1-kernel-lib/python"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_locally_an_importable_kernel_lib_needs_no_input_folder(path, tmp_path):
    """run_all.py puts the repository on PYTHONPATH and there is no /kaggle/input: no error."""
    env_root = tmp_path / "nowhere"
    code = finder(bootstrap_cell(path)) + "\nimport kernel_lib\nprint('FROM', kernel_lib.__file__)\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={"KAGGLE_ROOT": str(env_root), "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "FROM " + str(LIB / "__init__.py")
