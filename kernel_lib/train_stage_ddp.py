"""A training stage on every GPU of the session: `fit` under torchrun, launched from the notebook.

A Kaggle T4 session may hold two GPUs. When a training notebook sees more than one CUDA device
(`processes`), `train_stage.train` runs `launch`: ``python -m torch.distributed.run --standalone
--nproc_per_node N -m kernel_lib.train_stage_ddp SPEC.json``, one process per GPU, whose output
(rank 0's progress) is streamed into the notebook's line by line. Each rank rebuilds the data and
the model from the stage's config (`main`) and calls `train.fit`, which runs
DistributedDataParallel (``batch_size`` per process) and writes, from rank 0, the same checkpoint,
model, metrics and reports as one process. The notebook process then loads the written
``model.pt`` and predicts on one device, as the in-process path does. One GPU or the CPU keeps the
in-process path.

The session's time budget counts from the notebook's `start_session`: SPEC.json carries its start
(wall clock), so the ranks stop where the notebook would have. SIGTERM or an interrupt of the
notebook is forwarded to torchrun, which forwards it to the ranks: they end with a checkpoint.

``KERNEL_LIB_DDP_PROCS=N`` forces N processes (N > 1: torchrun, on the CPU with gloo; 1: in
process); the tests run the notebook path with 2 gloo CPU ranks this way.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import kernel_lib

from . import train as loop
from .budget import SessionBudget
from .checkpoint import MODEL_NAME
from .config import TrainConfig
from .outputs import read_metrics
from .loop_state import FitResult

PROCS_ENV = "KERNEL_LIB_DDP_PROCS"
MODULE = "kernel_lib.train_stage_ddp"


def processes(cfg: TrainConfig, env: dict | None = None) -> int:
    """How many training processes: ``KERNEL_LIB_DDP_PROCS`` if set, else the CUDA devices when the
    stage may use them (device auto or cuda) and more than one is visible, else 1. Inside a
    torchrun rank (WORLD_SIZE set) always 1: no nested launch."""
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE", "1")) > 1:
        return 1
    forced = env.get(PROCS_ENV, "").strip()
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise ValueError(f"{PROCS_ENV}={forced!r}: expected a number of processes >= 1")
        return int(forced)
    if cfg.device == "cpu":
        return 1
    return torch.cuda.device_count() if torch.cuda.is_available() and torch.cuda.device_count() > 1 else 1


def torchrun_command(n: int, spec_path: str | os.PathLike) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            "-m", MODULE, str(spec_path)]


def _child_env(n: int, cpu: bool) -> dict[str, str]:
    """The ranks import the same kernel_lib as the notebook (on Kaggle found by the bootstrap glob,
    perhaps inside python.zip), unbuffered so that progress streams."""

    lib_parent = os.path.dirname(os.path.dirname(os.path.abspath(kernel_lib.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (lib_parent, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if cpu:
        # gloo on the loopback interface: the sandboxes and tests have no other; threads shared out
        env.setdefault("GLOO_SOCKET_IFNAME", "lo" if sys.platform.startswith("linux") else "lo0")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    return env


def launch(cfg: TrainConfig, n: int, budget: SessionBudget | None, n_predict: int,
           echo=print, tail_lines: int = 40):
    """Run `fit` under torchrun with ``n`` processes, streaming its output; returns rank 0's
    FitResult (the same as `train.fit` returns in process)."""

    budget = SessionBudget.start() if budget is None else budget
    with tempfile.TemporaryDirectory(prefix="kernel_lib_ddp_") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps({"config": cfg.to_dict(), "started_wall": time.time() - budget.elapsed(),
                                         "n_predict": n_predict, "result": str(result_path)}))
        command = torchrun_command(n, spec_path)
        echo(f"[{cfg.stage}] {n} training processes under torchrun (DistributedDataParallel): "
             f"{' '.join(command[1:])}")
        tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=_child_env(n, cpu=cfg.device == "cpu" or not _cuda()))
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # text mode: tqdm's carriage returns end lines too
                line = line.rstrip("\n")
                if line.strip():
                    tail.append(line)
                    echo(line)
            rc = proc.wait()
        except BaseException:
            proc.send_signal(signal.SIGTERM)  # torchrun forwards it: the ranks save a checkpoint
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if rc != 0 or not result_path.is_file():
            raise RuntimeError(f"stage {cfg.stage}: training under torchrun with {n} processes failed (exit status "
                               f"{rc}); its last lines:\n" + "\n".join(tail))
        return FitResult(**json.loads(result_path.read_text()))


def _cuda() -> bool:
    return torch.cuda.is_available()


def load_final_weights(cfg: TrainConfig, model) -> bool:
    """Load the model.pt the ranks wrote into ``model`` (the notebook's) when training finished:
    the weights `fit` leaves in its model in process. Returns whether it did."""

    path = Path(cfg.output_dir) / MODEL_NAME
    if not read_metrics(cfg.output_dir).get("finished") or not path.is_file():
        return False
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return True


def main(argv: list[str] | None = None) -> None:
    """One torchrun rank: the stage's data and model from SPEC.json's config, then `fit`."""
    from .train_stage import build_model, load_data  # here: train_stage imports this module

    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    cfg = TrainConfig.from_params(spec["config"])
    budget = SessionBudget.start()
    budget.started_at -= time.time() - spec["started_wall"]  # the notebook's session, not this process's
    if cfg.device == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    data = load_data(cfg)
    model = build_model(cfg, data)
    result = loop.fit(cfg, model, data.train, data.val, n_predict=spec["n_predict"], budget=budget)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(spec["result"]).write_text(json.dumps(dataclasses.asdict(result)))  # NaN as JSON's NaN


if __name__ == "__main__":
    main()
