"""Where a training run is, and how it survives the end of a session: the other half of train.py.

Owns `_LoopState` (the position a checkpoint carries besides weights and RNG states), `FitResult`,
and `_RunState`, the part of the run (`train._Run` derives from it) that starts fresh or resumes
from the newest checkpoint (`begin`: ``init_from`` weights, or every state of the checkpoint),
writes the checkpoint, model.pt and the report files (`persist`, `write_reports`), and ends
training (`end`: which weights predict, best_model.pt / last_model.pt). The file names and what a
checkpoint holds: checkpoint.py; the report files: reports.py.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import (CHECKPOINT_NAME, MODEL_NAME, atomic_torch_save, capture_rng_state, check_compatible,
                         find_latest_checkpoint, load_checkpoint, restore_rng_state, save_checkpoint)
from .paths import find_stage_dir
from .reports import write_reports
from .runtime import seed_everything

BEST_MODEL_NAME = "best_model.pt"
# Config keys that may change between the chunks of one run without changing its trajectory.
_CHUNK_KEYS = {"time_budget_s", "resume", "output_dir", "input_dirs", "data_dir", "num_workers", "device",
               "checkpoint_every_steps", "chunk_steps", "cache", "tta", "predict_with"}
LAST_MODEL_NAME = "last_model.pt"


@dataclass
class FitResult:
    finished: bool
    stopped_reason: str  # "finished" | "early_stopping" | "time_budget" | "signal" | "chunk_steps"
    epochs_done: int
    steps_done: int
    best_val_acc: float  # best well-level validation accuracy (NaN without validation)
    history: list[dict]


@dataclass
class _LoopState:
    """Everything about the run's position that a checkpoint carries besides weights and RNGs."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch consumed (a multiple of accum_steps)
    best_metric: float = -math.inf  # best well-level validation accuracy
    best_val_acc_site: float = -math.inf
    best_epoch: int = 0  # 1-based epoch of best_metric; 0 = none yet
    epochs_without_improvement: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_steps: int = 0
    wall_time_total_s: float = 0.0  # of the chunks before this one
    history: list[dict] = field(default_factory=list)
    finished: bool = False
    stopped_reason: str = ""


def _resolve_init_from(init_from: str, dirs: Sequence[str]) -> Path:
    """A model.pt path, or the model.pt of stage ``init_from``'s output folder under ``dirs``."""
    path = Path(init_from)
    if path.is_file():
        return path
    model = find_stage_dir(init_from, dirs) / MODEL_NAME
    if not model.is_file():
        raise FileNotFoundError(f"init_from={init_from!r}: the stage's folder {model.parent} has no {MODEL_NAME}")
    return model


def _load_weights(model: nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises unpickling, zip and EOF errors that do not name the file
        raise ValueError(f"init_from: {path} is not a weights file (a state dict saved with torch.save, "
                         f"e.g. a stage's model.pt): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                         ) from None
    if not isinstance(state, dict):
        raise ValueError(f"init_from: {path} holds a {type(state).__name__}, not a state dict of weights")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit this model:\n{err}") from err


# ---------------------------------------------------------------- the run's state and files

class _RunState:
    """Starting, saving and ending a run; `train._Run` holds the attributes these methods use
    (cfg, rt, model, optimizer, scaler, state, budget, out, classes, ...)."""

    # -------------------------------------------------------- start: fresh or resumed
    def begin(self) -> None:
        cfg = self.cfg
        path = None
        if cfg.resume == "auto":
            path = find_latest_checkpoint(cfg.stage, [cfg.output_dir, *cfg.input_dirs])
        elif cfg.resume != "never":
            path = Path(cfg.resume)
        if path is None:
            self.log("no checkpoint of this stage: starting fresh")
            seed_everything(cfg.seed)
            if cfg.init_from:
                source = _resolve_init_from(cfg.init_from, cfg.input_dirs)
                _load_weights(self.model, source)
                self.log(f"initial weights from {source}")
            return
        saved = load_checkpoint(path)
        best = path.parent / BEST_MODEL_NAME
        if self.is_main and best.is_file() and best.resolve() != (self.out / BEST_MODEL_NAME).resolve():
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(torch.load(best, map_location="cpu", weights_only=True), self.out / BEST_MODEL_NAME)
        check_compatible(saved, path=path, arch=cfg.arch, classes=self.classes)
        if saved["n_train"] != len(self.train_set) or saved["global_batch"] != self.global_batch:
            raise ValueError(f"{path}: checkpoint was made with {saved['n_train']} training sites and a global batch "
                             f"of {saved['global_batch']}; this run has {len(self.train_set)} and "
                             f"{self.global_batch}: its position in the epoch would mean nothing")
        changed = sorted(k for k, v in cfg.to_dict().items()
                         if k not in _CHUNK_KEYS and saved["config"].get(k) != v)
        if changed:
            warnings.warn(f"{path}: resuming with changed parameters {changed}; the run is no longer "
                          f"the one the checkpoint started")
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scaler is not None and saved["scaler"] is not None:
            self.scaler.load_state_dict(saved["scaler"])
        restore_rng_state(saved["rng"])
        names = {f.name for f in dataclasses.fields(_LoopState)}
        self.state = _LoopState(**{k: saved[k] for k in names if k in saved})
        self.log(f"resumed from {path}: step {self.state.step}/{self.total_steps}, epoch {self.state.epoch}")

    # -------------------------------------------------------- saving
    def checkpoint_state(self) -> dict:
        s = self.state
        return {**dataclasses.asdict(s), "wall_time_total_s": self.wall_time_total(),
                "stage": self.cfg.stage, "arch": self.cfg.arch, "classes": self.classes,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
                "config": self.cfg.to_dict(), "rng": capture_rng_state(),
                "n_train": len(self.train_set), "global_batch": self.global_batch}

    def wall_time_total(self) -> float:
        return self.state.wall_time_total_s + self.budget.elapsed()

    def persist(self, plots: bool) -> None:
        """Write every output; the duration feeds the time budget."""
        if self.is_main:
            t = self.clock()
            position = (self.state.step, self.state.epoch)
            if self.saved_at != position:
                save_checkpoint(self.out / CHECKPOINT_NAME, self.checkpoint_state())
                atomic_torch_save(self.model.state_dict(), self.out / MODEL_NAME)
                self.saved_at = position
            self.write_reports(plots)
            self.budget.record_save(self.clock() - t)
        if self.rt.world_size > 1:
            dist.barrier()

    def write_reports(self, plots: bool) -> None:
        s, last = self.state, (self.state.history[-1] if self.state.history else {})
        metrics = {
            "stage": self.cfg.stage, "finished": s.finished, "stopped_reason": s.stopped_reason,
            "epochs_done": s.epoch, "steps_done": s.step, "steps_total": self.total_steps,
            "wall_time_s": {"chunk": self.budget.elapsed(), "total": self.wall_time_total()},
            "split": self.split, "best_val_acc_site": s.best_val_acc_site, "best_val_acc_well": s.best_metric,
            "val_acc_site": last.get("val_acc_site", math.nan), "val_acc_well": last.get("val_acc_well", math.nan),
            "val_acc_well_by_cell_type": {k.removeprefix("val_acc_well_"): v for k, v in last.items()
                                          if k.startswith("val_acc_well_")},
            "n_train": len(self.train_set), "n_val": len(self.val_set), "n_classes": len(self.classes),
            "warnings": self.warnings,
            "predict_with": self.cfg.predict_with, "best_epoch": s.best_epoch or None,
            "predicted_with": self.final.get("predicted_with"), "predict_epoch": self.final.get("predict_epoch"),
            "pretrained": getattr(self.model, "pretrained_source", None),
            # measured in this chunk: seconds from the kernel's start to its first optimizer step, and
            # training images per second (all processes), which `run_all.py kaggle plan` reads back
            "first_step_s": getattr(self, "first_step_s", None),
            "train_images_per_s": (self.train_images / self.train_s) if getattr(self, "train_s", 0) else None,
        }
        write_reports(self.out, metrics, self.cfg.to_dict(), s.history, plots)

    def end(self, reason: str) -> FitResult:
        s = self.state
        s.stopped_reason = reason
        s.finished = reason in ("finished", "early_stopping")
        best = self.out / BEST_MODEL_NAME
        if s.finished:
            use_best = self.cfg.predict_with == "best" and s.best_epoch > 0 and best.is_file()
            if self.rt.world_size > 1:  # rank 0 alone validated (best_epoch): its decision holds for all
                flag = torch.tensor([int(use_best), s.best_epoch], device=self.rt.device)
                dist.broadcast(flag, src=0)
                use_best, s.best_epoch = bool(flag[0].item()), int(flag[1].item())
            self.final = {"predicted_with": "best" if use_best else "last",
                          "predict_epoch": s.best_epoch if use_best else s.epoch}
            if self.cfg.predict_with == "best" and not use_best:
                self.warnings.append("predict_with='best' but no validation epoch chose weights: "
                                     "predicting with the last ones")
        self.persist(plots=True)  # the checkpoint and model.pt hold the last weights
        if self.final.get("predicted_with") == "best":
            if self.is_main:
                atomic_torch_save(self.model.state_dict(), self.out / LAST_MODEL_NAME)
            self.model.load_state_dict(torch.load(best, map_location="cpu", weights_only=True))
            if self.is_main:
                atomic_torch_save(self.model.state_dict(), self.out / MODEL_NAME)
            if self.rt.world_size > 1:
                dist.barrier()
            self.log(f"model.pt and the model hold the best validation epoch's weights (epoch {s.best_epoch})")
        self.log(f"{reason}: epoch {s.epoch}/{self.cfg.epochs}, step {s.step}/{self.total_steps}, "
                 f"{self.budget.elapsed():.0f} s in this chunk")
        return FitResult(s.finished, reason, s.epoch, s.step, s.best_metric if s.best_metric >= 0 else math.nan,
                         list(s.history))
