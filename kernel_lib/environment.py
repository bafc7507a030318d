"""What ran where: the versions and GPUs of the machine a stage ran on, in its metrics.json.

Kaggle's image is not this project's requirements.txt: `record_environment` writes
``environment`` (python, torch, torchvision, numpy, pandas, CUDA, cuDNN, the GPU count and names)
into a stage folder's metrics.json and warns (in the notebook's output, and in metrics.json
``warnings``) for each package whose major version differs from the pin. The pins come from the
requirements.txt beside kernel_lib (the repository's), or the copy the Kaggle build puts inside the
kernel_lib dataset (`kaggle_build.build_lib_dataset`), read as package data so that a zipimported
kernel_lib finds it too.
"""
from __future__ import annotations

import importlib.metadata
import importlib.resources
import os
import platform
import re
import sys
import warnings
from pathlib import Path
from typing import Mapping

from .outputs import read_metrics, update_metrics

REQUIREMENTS = "requirements.txt"
CHECKED = ("torch", "torchvision", "numpy", "pandas")  # the packages whose major version is compared
_PIN = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)")


def parse_pins(text: str) -> dict[str, str]:
    """``name==version`` lines of a requirements file (names lower-cased), comments ignored."""
    return {m.group(1).lower(): m.group(2) for line in text.splitlines() if (m := _PIN.match(line))}


def pinned_versions() -> dict[str, str]:
    """The pins of the requirements.txt inside kernel_lib (the Kaggle dataset's copy), else the
    repository's; {} when neither is there."""
    try:
        packaged = importlib.resources.files(__package__) / REQUIREMENTS
        if packaged.is_file():
            return parse_pins(packaged.read_text())
    except (OSError, ModuleNotFoundError):
        pass
    repo = Path(__file__).resolve().parent.parent / REQUIREMENTS
    return parse_pins(repo.read_text()) if repo.is_file() else {}


def collect() -> dict:
    """The versions and devices of this process. torch is probed only when the stage has imported
    it (training and inference): the EDA and the merge never use it, and importing torch and
    torchvision only to name them cost those stages ~7 s each. Without it the versions are the
    installed distributions' (importlib.metadata, without a local suffix such as ``+cu130``) and
    ``cuda``, ``cudnn``, ``gpu_count`` are None (not probed)."""
    import numpy
    import pandas

    env = {"python": platform.python_version(), "numpy": numpy.__version__, "pandas": pandas.__version__,
           "cpu_count": os.cpu_count()}
    if "torch" not in sys.modules:
        return {**env, "torch": _installed("torch"), "torchvision": _installed("torchvision"), "cuda": None,
                "cudnn": None, "gpu_count": None, "gpus": []}
    import torch
    import torchvision

    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    return {**env, "torch": torch.__version__, "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None, "gpu_count": len(gpus), "gpus": gpus}


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _major(version: str) -> str:
    return version.split("+")[0].split(".")[0]


def version_warnings(env: Mapping[str, object], pins: Mapping[str, str]) -> list[str]:
    """One message per checked package whose major version differs from its pin."""
    found = []
    for name in CHECKED:
        have, pinned = env.get(name), pins.get(name)
        if isinstance(have, str) and pinned and _major(have) != _major(pinned):
            found.append(f"{name} {have} differs in major version from requirements.txt's {name}=={pinned}: "
                         "results and checkpoints may not match a run on the pinned versions")
    return found


def record_environment(output_dir: str | os.PathLike, env: Mapping[str, object] | None = None,
                       pins: Mapping[str, str] | None = None) -> dict:
    """Write ``environment`` into output_dir's metrics.json, warn of major-version differences
    (warnings.warn, and appended once each to metrics.json ``warnings``); returns the environment."""
    env = dict(collect() if env is None else env)
    print(f"environment: {describe(env)}", flush=True)
    found = version_warnings(env, pinned_versions() if pins is None else pins)
    for message in found:
        warnings.warn(message)
    known = list(read_metrics(output_dir).get("warnings") or [])
    update_metrics(output_dir, environment=env, warnings=known + [m for m in found if m not in known])
    return env


def describe(env: Mapping[str, object]) -> str:
    """One line: python, torch, CUDA and the GPUs."""
    gpus = env.get("gpus") or []
    if env.get("gpu_count") is None:
        where = "devices not probed (torch not imported)"
    else:
        where = f"{env.get('gpu_count')} GPU(s): {', '.join(map(str, gpus))}" if gpus else "CPU only"
    return (f"python {env.get('python')}, torch {env.get('torch')}, torchvision {env.get('torchvision')}, "
            f"numpy {env.get('numpy')}, pandas {env.get('pandas')}, CUDA {env.get('cuda')}; {where}")
