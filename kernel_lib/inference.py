"""Inference: logits of a dataset in its order (optionally summed over the TTA views), the
validation metrics computed from them, and the prediction files that hold them.

Owns `infer` (the loop's validation and probe use it too), `predict`, `write_predictions` and
`evaluate`. Normalisation is the training one (`runtime.device_batch`).

Classes a prediction may choose: a dataset whose head was trained on extra classes (the control
wells, TrainConfig.controls) names the predictable ones in ``target_classes``, a prefix of
``classes``; `infer` keeps only those logits, so validation, prediction files and submissions
never see a control class and a treatment well is never predicted as a control.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
# Plain text bars: papermill logs them line by line, and notebooks need no widget package.
from tqdm import tqdm

from .augment import dihedral, views_of
from .config import TrainConfig
from .predictions import save_predictions
from .runtime import autocast, device_batch, prepare_model, runtime


def target_classes(dataset: Dataset) -> list[str]:
    """The classes a prediction may choose: ``dataset.target_classes`` (a prefix of
    ``dataset.classes``), else every class. A torch Subset answers for its dataset."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    classes = [str(c) for c in dataset.classes]
    target = getattr(dataset, "target_classes", None)
    if target is None:
        return classes
    target = [str(c) for c in target]
    if classes[:len(target)] != target:
        raise ValueError(f"dataset.target_classes ({len(target)}) must be the first classes of dataset.classes")
    return target


def infer(model: nn.Module, dataset: Dataset, device: torch.device, amp_dtype: torch.dtype | None,
          channels_last: bool, batch_size: int, num_workers: int, tta: bool, desc: str,
          progress_interval_s: float, show: bool = True) -> tuple[Tensor, Tensor]:
    """Logits (N,C) float32 on the CPU in dataset order, and labels (N,) int64.

    With ``tta`` the logits are summed over every view of `views_of` (8 for square sites).
    Only the `target_classes` columns are kept; a label outside them becomes -1 (unknown).
    """
    n_target = len(target_classes(dataset))
    # Our own generator: a DataLoader iterator otherwise draws from the global RNG (dropout's).
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator())
    was_training = model.training
    model.eval()
    logits, labels = [], []
    channels_last = channels_last and device.type == "cuda"
    try:
        with torch.no_grad(), tqdm(total=len(dataset), desc=desc, unit="img", unit_scale=True,
                                   mininterval=progress_interval_s, disable=not show) as bar:
            for batch in loader:
                x, label, cell_type = device_batch(batch, device, channels_last)
                total = None
                for view in views_of(*x.shape[-2:]) if tta else [0]:
                    with autocast(device, amp_dtype):
                        out = model(dihedral(x, view), cell_type).float()
                    total = out if total is None else total + out
                logits.append(total[:, :n_target].cpu())
                labels.append(torch.where(label < n_target, label, -1).cpu())
                bar.update(len(label))
    finally:
        model.train(was_training)
    if not logits:
        return torch.zeros(0, n_target), torch.zeros(0, dtype=torch.int64)
    return torch.cat(logits), torch.cat(labels)


def predict(cfg: TrainConfig, model: nn.Module, dataset: Dataset, tta: bool, *, batch_size: int = 0,
            progress_interval_s: float = 5.0) -> np.ndarray:
    """Logits (N, C) float32 of every site of ``dataset``, in dataset order, on cfg's device.

    Normalisation as in training. ``tta``: the logits of the 8 flip/rot90 views (4 for
    rectangular sites) are summed, not averaged, so that sums over sites stay comparable.
    ``batch_size`` 0 = cfg.batch_size.
    """
    rt = runtime(cfg, distributed=False)
    model = prepare_model(model, rt.device, cfg.channels_last)
    logits, _ = infer(model, dataset, rt.device, rt.amp_dtype, cfg.channels_last, batch_size or cfg.batch_size,
                      cfg.num_workers, tta, "predict", progress_interval_s)
    return logits.numpy().astype(np.float32)


def write_predictions(path: str | os.PathLike, dataset: Dataset, logits: np.ndarray, split: str) -> Path:
    """Save ``predict``'s logits (N, C) with ``dataset.frame`` as a prediction file (kernel_lib.predictions)."""
    return save_predictions(path, dataset.frame, target_classes(dataset), logits, split)


def evaluate(logits: Tensor, labels: Tensor, id_codes: Sequence[str], cell_types: Sequence[str]) -> dict[str, float]:
    """Validation metrics from per-site logits (N,C) and labels (N,) (-1 = unknown, ignored).

    Well accuracy: a well's prediction is the argmax of log_softmax(mean of its sites' logits)
    (id_code), the one definition the merge uses too (submission.well_log_probs); per-cell-type
    accuracies are well-level, keyed ``val_acc_well_<cell type>``.
    """
    known = (labels >= 0).nonzero().squeeze(1)
    if len(known) == 0:
        return {"val_loss": math.nan, "val_acc_site": math.nan, "val_acc_well": math.nan}
    logits, labels = logits[known].float(), labels[known]
    id_codes = np.asarray(id_codes, dtype=str)[known.numpy()]
    cell_types = np.asarray(cell_types, dtype=str)[known.numpy()]
    wells, first, inverse = np.unique(id_codes, return_index=True, return_inverse=True)
    index = torch.from_numpy(inverse)
    sums = torch.zeros(len(wells), logits.shape[1], dtype=torch.float64).index_add_(0, index, logits.double())
    counts = torch.bincount(index, minlength=len(wells)).to(torch.float64)
    well_log_probs = (sums / counts[:, None]).log_softmax(1)
    well_correct = (well_log_probs.argmax(1) == labels[first]).numpy()
    metrics = {"val_loss": F.cross_entropy(logits, labels).item(),
               "val_acc_site": (logits.argmax(1) == labels).float().mean().item(),
               "val_acc_well": float(well_correct.mean())}
    well_cell_types = cell_types[first]
    for cell_type in sorted(set(well_cell_types)):
        metrics[f"val_acc_well_{cell_type}"] = float(well_correct[well_cell_types == cell_type].mean())
    return metrics

