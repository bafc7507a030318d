"""Where the loop and inference run: device, mixed precision, the DDP process group, seeds, and
the move of a collated batch onto the device (normalised, augmented, channels_last).

Owns `Runtime` / `runtime` (device, AMP dtype, world size and rank; under torchrun it initialises
the process group), `seed_everything`, `mix_seed`, `device_batch`, `autocast` and `prepare_model`.
Nothing here trains or writes files.
"""
from __future__ import annotations

import contextlib
import os
import random
import warnings
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .augment import apply_views
from .config import TrainConfig
from .data import normalize_batch


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative ints, e.g. (seed, epoch, step)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and random, as a fresh run starts."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None
    world_size: int = 1
    rank: int = 0
    owns_process_group: bool = False


def runtime(cfg: TrainConfig, distributed: bool) -> Runtime:
    """Device, mixed precision and (with ``distributed`` under torchrun) the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if distributed else 1
    rank = int(os.environ.get("RANK", "0")) if world > 1 else 0
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("parameter 'device' is 'cuda' but no CUDA device is visible")
    on_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device()) if on_cuda \
        else torch.device("cpu")
    if not on_cuda:
        if cfg.amp in ("bf16", "fp16"):
            warnings.warn(f"amp={cfg.amp!r} ignored on the CPU: training in fp32")
        amp_dtype = None
    elif cfg.amp == "off":
        amp_dtype = None
    elif cfg.amp == "fp16" or (cfg.amp == "auto" and not torch.cuda.is_bf16_supported()):
        amp_dtype = torch.float16
    else:
        amp_dtype = torch.bfloat16
    owns = False
    if world > 1 and not dist.is_initialized():
        if on_cuda:
            torch.cuda.set_device(device)
        # A long timeout: the other ranks wait in a collective while rank 0 validates and saves.
        dist.init_process_group("nccl" if on_cuda else "gloo", timeout=timedelta(hours=1))
        owns = True
    return Runtime(device, amp_dtype, world, rank, owns)


def device_batch(batch: dict, device: torch.device, channels_last: bool,
                  codes: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """A collated uint8 batch -> normalised float images (B,C,H,W), labels (B,), cell types (B,) on device."""
    images = batch["image"].to(device, non_blocking=True)
    if codes is not None:
        images = apply_views(images, codes)
    x = normalize_batch(images, batch["mean"].to(device, non_blocking=True), batch["std"].to(device, non_blocking=True))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, batch["label"].to(device, non_blocking=True), batch["cell_type"].to(device, non_blocking=True)


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if amp_dtype is None else torch.autocast(device.type, dtype=amp_dtype)


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model.to(device)
    if channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model

