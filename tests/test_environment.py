"""What ran where (environment.py): versions and GPUs in metrics.json, a warning for each major
version that differs from requirements.txt's pin, the pins found inside a zipped kernel_lib."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy
import pandas
import pytest
import torch
import torchvision

from kernel_lib import environment, eda
from kernel_lib.outputs import read_metrics, write_json

REPO = Path(__file__).resolve().parent.parent


def test_pins_are_read_from_requirements_txt():
    pins = environment.parse_pins((REPO / "requirements.txt").read_text())
    line = next(l for l in (REPO / "requirements.txt").read_text().splitlines() if l.startswith("torch=="))
    assert pins["torch"] == line.split("==")[1]
    assert set(environment.CHECKED) <= set(pins)
    assert environment.pinned_versions() == pins
    assert environment.parse_pins("# c\nFoo_Bar==1.2 ; python_version>'3'\nbaz>=2\n") == {"foo_bar": "1.2"}


def test_only_a_different_major_version_warns():
    pins = {"torch": "2.14.1", "torchvision": "0.29.1", "numpy": "2.4.6", "pandas": "3.1.1"}
    same_major = {"torch": "2.5.1+cu121", "torchvision": "0.20.1+cu121", "numpy": "2.0.0", "pandas": "3.0.0"}
    assert environment.version_warnings(same_major, pins) == []
    kaggle = {**same_major, "numpy": "1.26.4", "pandas": "2.2.3"}
    found = environment.version_warnings(kaggle, pins)
    assert [m.split()[0] for m in found] == ["numpy", "pandas"]
    assert "numpy 1.26.4 differs in major version from requirements.txt's numpy==2.4.6" in found[0]


def test_record_environment_writes_versions_and_gpus_and_warns_once(tmp_path):
    write_json(tmp_path / "metrics.json", {"stage": "x", "warnings": ["earlier"]})
    pins = {"torch": "1.0.0"}
    with pytest.warns(UserWarning, match="torch .* differs in major version"):
        environment.record_environment(tmp_path, pins=pins)
    with pytest.warns(UserWarning):
        environment.record_environment(tmp_path, pins=pins)  # a second chunk: the warning is not repeated
    m = read_metrics(tmp_path)
    env = m["environment"]
    assert (env["python"], env["torch"], env["torchvision"], env["numpy"], env["pandas"]) == (
        platform.python_version(), torch.__version__, torchvision.__version__, numpy.__version__, pandas.__version__)
    assert env["cuda"] == torch.version.cuda
    assert env["gpu_count"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0) == len(env["gpus"])
    assert m["stage"] == "x" and m["warnings"][0] == "earlier" and len(m["warnings"]) == 2
    assert m["warnings"][1].startswith(f"torch {torch.__version__} differs")


@pytest.mark.slow  # a fresh interpreter
def test_a_stage_without_torch_records_installed_versions_without_importing_it(tmp_path):
    """The EDA and the merge never import torch: their environment names the installed torch and
    torchvision distributions and leaves the devices unprobed (None), not 0 GPUs."""
    code = ("import json, sys; from kernel_lib import environment, eda, merge_stage; "
            "env = environment.collect(); print(json.dumps([env, environment.describe(env), 'torch' in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    env, line, imported = json.loads(done.stdout.splitlines()[-1])
    assert imported is False
    assert env["torch"] == torch.__version__.split("+")[0] and env["torchvision"] == torchvision.__version__.split("+")[0]
    assert env["gpu_count"] is None and env["cuda"] is None and env["gpus"] == []
    assert env["numpy"] == numpy.__version__ and line.endswith("devices not probed (torch not imported)")


def test_a_zipped_kernel_lib_reads_the_requirements_inside_it(tmp_path):
    """The Kaggle dataset carries requirements.txt inside kernel_lib/ (kaggle_build); zipimported,
    it is package data."""
    archive = tmp_path / "python.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted((REPO / "kernel_lib").glob("*.py")):
            z.write(f, f"kernel_lib/{f.name}")
        z.writestr("kernel_lib/requirements.txt", "torch==7.0.0\nnumpy==9.1\n")
    code = (f"import sys; sys.path.insert(0, {str(archive)!r}); from kernel_lib import environment; "
            "import json; print(json.dumps(environment.pinned_versions()))")
    done = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"torch": "7.0.0", "numpy": "9.1"}


@pytest.mark.slow  # draws every plate map (about 40 s on 2 cores)
def test_the_eda_stage_records_its_environment(small_synthetic, tmp_path):
    eda.run_eda(small_synthetic, tmp_path, images=False, progress=False)
    m = read_metrics(tmp_path)
    assert m["finished"] is True and m["environment"]["torch"] == torch.__version__
