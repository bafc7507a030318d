"""The training loop: resumable to the bit, cut into session-sized chunks by a time budget.

Owns `fit` and its run (`_Run`: the optimizer steps, validation, early stopping, when to stop),
`learning_rate`, `epoch_order`, the stop signals and the freezing of the backbone. Elsewhere:
starting fresh or resuming, saving and ending a run (loop_state.py, `_Run`'s base class), device
and DDP setup (runtime.py), augmentation views (augment.py), inference and metrics
(inference.py), report files (reports.py), the time budget (budget.py).

A Kaggle session ends at a hard limit, and a ResNet-50 on RxRx1 needs several. `fit` therefore
makes everything that shapes the trajectory a pure function of (seed, epoch, global step):

* each epoch's order is ``randperm`` from a generator seeded by (seed, epoch); a resumed chunk
  skips the consumed prefix without loading it;
* augmentation (augment.py: dihedral views, random crops, intensity jitter, CutMix, on the
  device batch) draws from generators seeded by (seed, epoch, step);
* the learning rate is a function of the global step (`learning_rate`);
* checkpoints are taken at optimizer-step boundaries only and hold model, optimizer, scaler,
  position, early-stopping state, history and every RNG state (dropout).

So a run cut into any number of chunks ends, on the CPU, bitwise where one uninterrupted run
ends. The last incomplete global batch of an epoch is dropped, so every epoch has
``len(train_set) // (batch_size * accum_steps * world_size)`` optimizer steps.

A chunk stops before an optimizer step (or a validation) when the session's `SessionBudget`
would not cover it plus a checkpoint save, all measured on this machine. The stage's remaining
inference is reserved only when this chunk can finish training (the remaining steps, their
validations, a save and the inference fit) or when the work may end training; otherwise the
chunk trains to its last affordable step. SIGTERM and SIGINT stop it at the next step boundary,
and ``chunk_steps`` > 0 after that many steps (deterministic cuts, for tests and rehearsals). It
then saves and returns ``finished=False``; the next session's `fit` (resume="auto") carries on.

Outputs (rank 0 only) in ``cfg.output_dir``: checkpoint.pt (+ checkpoint.prev.pt), model.pt
(plain state dict), best_model.pt (the best validation epoch's weights), metrics.json,
history.csv, config.json, loss.png, accuracy.png. While training, model.pt holds the latest
weights. When training ends, ``predict_with="best"`` (the default) makes model.pt the best
validation epoch's weights (the latest go to last_model.pt) and leaves them in the model, so
the stage predicts, and ``init_from`` downstream starts, from them; metrics.json says which
(``predicted_with``, ``predict_epoch``). Without a validation epoch the last weights are used
and metrics say so. A resumed chunk copies best_model.pt from its checkpoint's folder.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
# Plain text bars: papermill logs them line by line, and notebooks need no widget package.
from tqdm import tqdm

from . import augment
from .budget import SessionBudget
from .checkpoint import atomic_torch_save
from .config import TrainConfig
from .inference import evaluate, infer
from .loop_state import BEST_MODEL_NAME, FitResult, _LoopState, _RunState
from .models import margin_cross_entropy, set_backbone_trainable
from .runtime import Runtime, autocast, device_batch, mix_seed, prepare_model, runtime

@dataclass
class Progress:
    """What callbacks see: the position after the step or epoch that just ended."""

    epoch: int
    step: int
    steps_per_epoch: int
    total_steps: int
    loss: float
    lr: float


class Callback:
    """Override what you need. Called on every rank, after the step's or epoch's work."""

    def on_step_end(self, progress: Progress) -> None:
        pass

    def on_epoch_end(self, progress: Progress, record: dict) -> None:
        pass


# ---------------------------------------------------------------- pure pieces

def learning_rate(cfg: TrainConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """The learning rate of global optimizer step ``step`` (0-based): nothing to rebuild on resume.

    Linear warm-up over ``warmup_steps`` scales the schedule: constant; cosine from lr to
    min_lr over the steps after warm-up; exponential ``lr * gamma ** epoch`` (the seed's
    per-epoch ExponentialLR), floored at min_lr.
    """
    if cfg.schedule == "constant":
        lr = cfg.lr
    elif cfg.schedule == "exponential":
        lr = max(cfg.min_lr, cfg.lr * cfg.gamma ** (step // max(1, steps_per_epoch)))
    else:
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, max(0, step - cfg.warmup_steps) / span)
        lr = cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if step < cfg.warmup_steps:
        lr *= (step + 1) / cfg.warmup_steps
    return lr


def epoch_order(seed: int, epoch: int, n: int) -> Tensor:
    """(n,) int64: the order in which epoch ``epoch`` visits the training items."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))


def data_warnings(train_set: Dataset, val_set: Dataset, expect_validation: bool = True) -> list[str]:
    """Problems worth recording but not worth a crash: empty splits, classes never trained on.
    ``expect_validation=False`` (split="all", a final fit): no validation is the plan, not a problem."""
    found = []
    if len(train_set) == 0:
        found.append("empty training split: nothing to train")
    if len(val_set) == 0 and expect_validation:
        found.append("empty validation split: no validation metrics and no early stopping")
    seen = set(train_set.frame["sirna"].fillna("").astype(str)) - {""}
    unseen = sorted(set(val_set.frame["sirna"].fillna("").astype(str)) - {""} - seen)
    found += [f"class {c} in validation never seen in training" for c in unseen[:10]]
    if len(unseen) > 10:
        found.append(f"... and {len(unseen) - 10} more classes in validation never seen in training")
    return found


def _check_dataset(dataset: Dataset, name: str, columns: Sequence[str]) -> None:
    for attribute in ("frame", "classes", "cell_types"):
        if not hasattr(dataset, attribute):
            raise TypeError(f"{name} lacks the attribute {attribute!r} of the dataset contract")
    missing = [c for c in columns if c not in dataset.frame.columns]
    if missing:
        raise ValueError(f"{name}.frame lacks columns {missing}")
    if len(dataset.frame) != len(dataset):
        raise ValueError(f"{name}.frame has {len(dataset.frame)} rows for {len(dataset)} items")


# ---------------------------------------------------------------- the parts of the loop

class _StopSignals:
    """Turns SIGTERM/SIGINT into a flag while installed; the old handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        else:
            warnings.warn("fit runs outside the main thread: SIGTERM/SIGINT will not stop it cleanly")
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze everything but the head: models.Classifier's own hook, else a ``head`` attribute."""
    if hasattr(model, "backbone") and hasattr(model, "head"):
        set_backbone_trainable(model, trainable)
        return
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        warnings.warn(f"{type(model).__name__} has no 'head' module: freeze_epochs ignored")
        return
    in_head = {id(p) for p in head.parameters()}
    for p in model.parameters():
        if id(p) not in in_head:
            p.requires_grad_(trainable)


# ---------------------------------------------------------------- the loop

class _Run(_RunState):
    def __init__(self, cfg: TrainConfig, rt: Runtime, model: nn.Module, train_set: Dataset, val_set: Dataset,
                 callbacks: Sequence[Callback], n_predict: int, budget: SessionBudget,
                 progress_interval_s: float, signals: _StopSignals):
        self.cfg, self.rt, self.train_set, self.val_set = cfg, rt, train_set, val_set
        self.callbacks, self.n_predict, self.budget, self.clock = callbacks, n_predict, budget, budget.clock
        self.progress_interval_s, self.signals = progress_interval_s, signals
        self.is_main = self.rt.rank == 0
        self.out = Path(cfg.output_dir)
        self.classes = [str(c) for c in train_set.classes]
        self.split = str(getattr(val_set, "split_name", "") or cfg.split)
        self.global_batch = cfg.batch_size * cfg.accum_steps * self.rt.world_size
        self.steps_per_epoch = len(train_set) // self.global_batch
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warnings = data_warnings(train_set, val_set, expect_validation=cfg.split != "all")
        if len(train_set) and not self.steps_per_epoch:
            self.warnings.append(f"training split of {len(train_set)} sites is smaller than one global batch "
                                 f"({self.global_batch}): no step can run")
        self.model = prepare_model(model, self.rt.device, cfg.channels_last)
        if cfg.head == "combined" and getattr(model, "head_kind", None) != "combined":
            raise ValueError(f"head='combined' needs a models.Classifier built with head='combined'; "
                             f"{type(model).__name__} is not one")
        self.aug_spec = augment.AugmentSpec.from_config(cfg)
        self.final: dict[str, Any] = {}  # which weights predict, once training has ended
        self.optimizer = (torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam)(  # fused: RESULTS.md
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=self.rt.device.type in ("cpu", "cuda"))
        self.scaler = torch.amp.GradScaler("cuda") if self.rt.amp_dtype == torch.float16 else None
        self.state = _LoopState()
        self.saved_at: tuple[int, int] | None = None
        self.first_step = 0  # the global step this chunk started at
        self.train_model = model
        if self.rt.world_size > 1:
            # Frozen epochs leave backbone parameters without gradients: DDP must be told.
            self.train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.rt.device.index] if self.rt.device.type == "cuda" else None,
                find_unused_parameters=cfg.freeze_epochs > 0)
        if self.rt.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def log(self, message: str) -> None:
        if self.is_main:
            print(f"[{self.cfg.stage}] {message}", flush=True)

    # -------------------------------------------------------- stopping
    def stop_reason(self, work_s: float, before_step: bool, ends_training: bool = False) -> str:
        """Why to stop before work_s seconds of work ("" = go on); agreed by all ranks.

        ``ends_training``: the work may end training, so the stage's inference must fit after it.
        """
        code = 0
        if before_step and self.cfg.chunk_steps and self.state.step - self.first_step >= self.cfg.chunk_steps:
            code = 3
        elif self.signals.received is not None:
            code = 2
        elif self.budget.out_of_time(work_s, self.remaining_training_estimate(),
                                     self.inference_estimate(self.n_predict), ends_training):
            code = 1
        if self.rt.world_size > 1:
            flag = torch.tensor([code], device=self.rt.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
        return ["", "time_budget", "signal", "chunk_steps"][code]

    def inference_estimate(self, n_images: int) -> float:
        return self.budget.inference_estimate(n_images) * (8 if self.cfg.tta else 1)

    def remaining_training_estimate(self) -> float:
        """Seconds the steps left and the validations of the epochs left should take."""
        s = self.state
        steps_left = self.total_steps - s.step
        return steps_left * self.budget.step_estimate() + (self.cfg.epochs - s.epoch) * self.validation_estimate()

    def validation_may_end_training(self) -> bool:
        """Whether the coming epoch-end validation may end the run (last epoch, or early stopping)."""
        s, cfg = self.state, self.cfg
        return s.epoch + 1 >= cfg.epochs or (cfg.patience > 0 and s.epochs_without_improvement + 1 >= cfg.patience)

    def probe_inference(self) -> None:
        """Time one eval batch (the second pass: the first pays for warm-up) for the budget."""
        dataset = self.val_set if len(self.val_set) else self.train_set
        n = min(self.cfg.batch_size, len(dataset))
        if n == 0 or self.budget.budget_s <= 0:
            return
        probe = torch.utils.data.Subset(dataset, range(n))
        for _ in range(2):
            t = self.clock()
            infer(self.model, probe, self.rt.device, self.rt.amp_dtype, self.cfg.channels_last, n, 0, False,
                  "probe", self.progress_interval_s, show=False)
            seconds = self.clock() - t
        self.budget.record_inference(seconds, n)

    # -------------------------------------------------------- training
    def epoch_loader(self) -> DataLoader:
        """This rank's remaining micro-batches of the current epoch, the consumed prefix skipped."""
        cfg, s = self.cfg, self.state
        order = epoch_order(cfg.seed, s.epoch, len(self.train_set)).tolist()
        micro = cfg.batch_size * self.rt.world_size
        batches = [order[m * micro + self.rt.rank * cfg.batch_size:m * micro + (self.rt.rank + 1) * cfg.batch_size]
                   for m in range(s.batch_in_epoch, self.steps_per_epoch * cfg.accum_steps)]
        return DataLoader(self.train_set, batch_sampler=batches, num_workers=cfg.num_workers,
                          pin_memory=self.rt.device.type == "cuda", generator=torch.Generator())

    def sample_loss(self, out: Tensor, target: Tensor) -> Tensor:
        """(B,) loss of each image: softmax CE, ArcFace, or (combined) (1 - w) softmax + w ArcFace."""
        cfg = self.cfg
        if cfg.head == "combined":
            n = out.shape[1] // 2
            softmax = F.cross_entropy(out[:, :n], target, label_smoothing=cfg.label_smoothing, reduction="none")
            arcface = margin_cross_entropy(out[:, n:], target, cfg.arcface_margin, cfg.arcface_scale,
                                           cfg.label_smoothing, reduction="none")
            return (1 - cfg.arcface_weight) * softmax + cfg.arcface_weight * arcface
        if cfg.head == "arcface":
            return margin_cross_entropy(out, target, cfg.arcface_margin, cfg.arcface_scale, cfg.label_smoothing,
                                        reduction="none")
        return F.cross_entropy(out, target, label_smoothing=cfg.label_smoothing, reduction="none")

    def loss(self, out: Tensor, target: Tensor, lam: Tensor | None = None, partner: Tensor | None = None) -> Tensor:
        """Mean loss of a micro-batch; with CutMix, lam * loss(own label) + (1 - lam) * loss(partner's)."""
        loss = self.sample_loss(out, target)
        if lam is not None:
            loss = lam * loss + (1 - lam) * self.sample_loss(out, target[partner])
        return loss.mean()

    def train_step(self, batches: Any) -> tuple[float, float]:
        """One optimizer step over accum_steps micro-batches; returns (mean loss, lr)."""
        cfg, s, rt = self.cfg, self.state, self.rt
        lr = learning_rate(cfg, s.step, self.steps_per_epoch, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        micro = cfg.batch_size * rt.world_size
        step_aug = None
        loss_sum = torch.zeros((), device=rt.device)
        channels_last = cfg.channels_last and rt.device.type == "cuda"
        for a in range(cfg.accum_steps):
            batch = next(batches)
            x, target, cell_type = device_batch(batch, rt.device, False)
            lam = partner = None
            if self.aug_spec.active:
                # Drawn for the whole global batch, then sliced: the same image gets the same
                # views, crop and jitter whatever the number of ranks (a CutMix partner is in its micro-batch).
                if step_aug is None:
                    step_aug = augment.draw(self.aug_spec, cfg.seed, s.epoch, s.step, self.global_batch,
                                            *batch["image"].shape[-3:], micro_batch=cfg.batch_size)
                start = a * micro + rt.rank * cfg.batch_size
                x, lam, partner = augment.apply(x, step_aug.part(start, start + cfg.batch_size))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            last = a == cfg.accum_steps - 1
            no_sync = self.train_model.no_sync if rt.world_size > 1 and not last else contextlib.nullcontext
            with no_sync():
                with autocast(rt.device, rt.amp_dtype):
                    out = (self.train_model(x, cell_type, all_heads=True) if cfg.head == "combined"
                           else self.train_model(x, cell_type))
                    loss = self.loss(out.float(), target, lam, partner)
                scaled = loss / cfg.accum_steps
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += loss.detach()
        if rt.world_size > 1:
            dist.all_reduce(loss_sum)  # every rank sees a NaN anywhere, so all stop together
            loss_sum /= rt.world_size
        mean_loss = loss_sum.item() / cfg.accum_steps  # the one CPU-GPU sync of a step
        if not math.isfinite(mean_loss):
            raise FloatingPointError(
                f"[{cfg.stage}] training loss is {mean_loss} at step {s.step} (epoch {s.epoch}); nothing saved, "
                f"the last good checkpoint in {self.out} is kept. Lower lr or check the input normalisation.")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return mean_loss, lr

    def validate(self) -> dict[str, float]:
        """Metrics of the epoch on rank 0 (NaN elsewhere); its duration feeds the budget."""
        if not self.is_main or len(self.val_set) == 0:
            return {"val_loss": math.nan, "val_acc_site": math.nan, "val_acc_well": math.nan}
        t = self.clock()
        logits, labels = infer(self.model, self.val_set, self.rt.device, self.rt.amp_dtype, self.cfg.channels_last,
                               self.cfg.batch_size, self.cfg.num_workers, False, f"validate ({self.split})",
                               self.progress_interval_s)
        self.budget.record_inference(self.clock() - t, len(self.val_set))
        frame = self.val_set.frame
        return evaluate(logits, labels, frame["id_code"].astype(str).tolist(), frame["cell_type"].astype(str).tolist())

    def validation_estimate(self) -> float:
        return self.budget.inference_estimate(len(self.val_set)) if self.is_main else 0.0

    def end_epoch(self) -> bool:
        """Validate, record, update early stopping; True if the run should stop early."""
        cfg, s = self.cfg, self.state
        lr = learning_rate(cfg, max(0, s.step - 1), self.steps_per_epoch, self.total_steps)  # of the last step
        metrics = self.validate()
        record = {"epoch": s.epoch + 1, "step": s.step, "lr": lr,
                  "train_loss": s.epoch_loss_sum / max(1, s.epoch_loss_steps), **metrics,
                  "wall_time_s": self.wall_time_total()}
        s.history.append(record)
        accuracy = metrics["val_acc_well"]
        if math.isfinite(accuracy) and accuracy > s.best_metric:
            s.best_metric, s.epochs_without_improvement, s.best_epoch = accuracy, 0, s.epoch + 1
            if self.is_main:
                atomic_torch_save(self.model.state_dict(), self.out / BEST_MODEL_NAME)
        elif math.isfinite(accuracy):
            s.epochs_without_improvement += 1
        if math.isfinite(metrics["val_acc_site"]):
            s.best_val_acc_site = max(s.best_val_acc_site, metrics["val_acc_site"])
        stop = cfg.patience > 0 and s.epochs_without_improvement >= cfg.patience
        if self.rt.world_size > 1:  # rank 0 alone validated: its decision holds for all
            flag = torch.tensor([int(stop)], device=self.rt.device)
            dist.broadcast(flag, src=0)
            stop = bool(flag.item())
        s.epoch, s.batch_in_epoch, s.epoch_loss_sum, s.epoch_loss_steps = s.epoch + 1, 0, 0.0, 0
        self.log(f"epoch {s.epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                  if isinstance(v, float) and k != "wall_time_s"))
        for callback in self.callbacks:
            callback.on_epoch_end(self.progress(record["train_loss"], lr), record)
        return stop

    def progress(self, loss: float, lr: float) -> Progress:
        s = self.state
        return Progress(s.epoch, s.step, self.steps_per_epoch, self.total_steps, loss, lr)

    def run(self) -> FitResult:
        cfg, s = self.cfg, self.state
        if s.finished:
            return self.end(s.stopped_reason or "finished")
        if not self.steps_per_epoch:
            return self.end("finished")
        self.first_step = s.step
        self.first_step_s, self.train_s, self.train_images = None, 0.0, 0
        if self.budget.infer_s_per_image is None:
            self.probe_inference()
        images_per_step = self.global_batch
        with tqdm(total=self.total_steps * images_per_step, initial=s.step * images_per_step, unit="img",
                  unit_scale=True, desc=f"{cfg.stage} train", mininterval=self.progress_interval_s,
                  disable=not self.is_main) as bar:
            while s.epoch < cfg.epochs:
                _set_backbone_trainable(self.model, s.epoch >= cfg.freeze_epochs)
                batches = iter(self.epoch_loader())
                for i in range(s.batch_in_epoch // cfg.accum_steps, self.steps_per_epoch):
                    last = i == self.steps_per_epoch - 1
                    work = self.budget.step_estimate() + (self.validation_estimate() if last else 0.0)
                    reason = self.stop_reason(work, before_step=True)
                    if reason:
                        return self.end(reason)
                    t = self.clock()
                    loss, lr = self.train_step(batches)
                    self.budget.record_step(self.clock() - t)
                    self.train_s += self.clock() - t
                    self.train_images += images_per_step
                    if self.first_step_s is None:  # the resume cost a user waits through, per chunk
                        self.first_step_s = self.budget.elapsed()
                    s.step, s.batch_in_epoch = s.step + 1, s.batch_in_epoch + cfg.accum_steps
                    s.epoch_loss_sum, s.epoch_loss_steps = s.epoch_loss_sum + loss, s.epoch_loss_steps + 1
                    bar.update(images_per_step)
                    bar.set_postfix(epoch=s.epoch + 1, loss=f"{loss:.4f}", refresh=False)
                    for callback in self.callbacks:
                        callback.on_step_end(self.progress(loss, lr))
                    if cfg.checkpoint_every_steps and s.step % cfg.checkpoint_every_steps == 0:
                        self.persist(plots=False)
                del batches  # let DataLoader workers go before validation
                reason = self.stop_reason(self.validation_estimate(), before_step=False,
                                          ends_training=self.validation_may_end_training())
                if reason:
                    return self.end(reason)
                if self.end_epoch():
                    return self.end("early_stopping")
                if s.epoch < cfg.epochs:
                    self.persist(plots=False)  # plotting costs about a second: chunk ends only
        return self.end("finished")


def fit(cfg: TrainConfig, model: nn.Module, train_set: Dataset, val_set: Dataset, *,
        callbacks: Sequence[Callback] | None = None, n_predict: int = 0, budget: SessionBudget | None = None,
        clock: Callable[[], float] = time.monotonic, progress_interval_s: float = 5.0) -> FitResult:
    """Train ``model`` (built by the caller) for one chunk: until finished, out of time, or signalled.

    train_set/val_set follow the dataset contract (items: image uint8 (C,H,W), mean/std (C,),
    label, cell_type, index; attributes frame, classes, cell_types). ``n_predict``: images the
    stage still predicts after training (x8 with cfg.tta), kept inside the time budget of the
    chunk that finishes training. ``budget``: the session's (created when the kernel started, so
    that setup time counts); without one, fit starts one on ``clock`` (injectable for tests);
    cfg.time_budget_s > 0 sets its limit. Under torchrun (WORLD_SIZE > 1) runs
    DistributedDataParallel: each rank takes its slice of every global batch and only rank 0
    validates and writes files.
    """
    budget = SessionBudget.start(clock=clock) if budget is None else budget
    if cfg.time_budget_s > 0:
        budget.budget_s = cfg.time_budget_s
    _check_dataset(train_set, "train_set", ["id_code", "sirna"])
    _check_dataset(val_set, "val_set", ["id_code", "cell_type", "sirna"])
    if list(val_set.classes) != list(train_set.classes):
        raise ValueError(f"val_set.classes ({len(val_set.classes)}) differ from train_set.classes "
                         f"({len(train_set.classes)}): both splits must share one class vocabulary")
    unlabelled = train_set.frame["sirna"].fillna("").astype(str) == ""
    if unlabelled.any():
        raise ValueError(f"train_set has {int(unlabelled.sum())} sites without a sirna label, e.g. "
                         f"{train_set.frame.loc[unlabelled, 'id_code'].iloc[0]}")
    rt = runtime(cfg, distributed=True)
    try:
        with _StopSignals() as signals:
            run = _Run(cfg, rt, model, train_set, val_set, list(callbacks or []), n_predict, budget,
                       progress_interval_s, signals)
            for message in run.warnings:
                warnings.warn(f"[{cfg.stage}] {message}")
            run.begin()
            return run.run()
    finally:
        if rt.owns_process_group:
            dist.destroy_process_group()
