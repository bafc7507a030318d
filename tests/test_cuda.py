"""The CUDA paths, run where a GPU is present (skipped elsewhere): chunked == uninterrupted on the
GPU, AMP with GradScaler resuming its scale, and checkpoints saved on CUDA loading on the CPU.

Bitwise equality on CUDA needs deterministic algorithms (``torch.use_deterministic_algorithms`` and
``CUBLAS_WORKSPACE_CONFIG``): the tests set both, and then require exact equality. Without them,
cuDNN's autotuned kernels would only give agreement to about 1e-6 relative.
"""
from __future__ import annotations

import os

import pytest
import torch

from kernel_lib import train as tr
from kernel_lib.checkpoint import load_checkpoint
from tiny_loop import datasets, fresh_model, tiny_cfg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def deterministic():
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    yield
    torch.use_deterministic_algorithms(before)


def _weights(folder):
    return torch.load(folder / "model.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_chunked_run_on_cuda_equals_one_run(tmp_path, amp):
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this card")
    train_set, val_set = datasets()
    one = tr.fit(tiny_cfg(tmp_path / "one", device="cuda", amp=amp), fresh_model(), train_set, val_set)
    chunks = [tr.fit(tiny_cfg(tmp_path / "cut", device="cuda", amp=amp, chunk_steps=4), fresh_model(),
                     train_set, val_set) for _ in range(4)]
    assert one.finished and chunks[-1].finished and chunks[0].stopped_reason == "chunk_steps"
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_gradscaler_scale_is_saved_and_resumed(tmp_path):
    train_set, val_set = datasets()
    tr.fit(tiny_cfg(tmp_path, device="cuda", amp="fp16", chunk_steps=3), fresh_model(), train_set, val_set)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["scaler"] and float(state["scaler"]["scale"]) > 0
    scale, growth = float(state["scaler"]["scale"]), int(state["scaler"]["_growth_tracker"])
    tr.fit(tiny_cfg(tmp_path, device="cuda", amp="fp16", chunk_steps=3), fresh_model(), train_set, val_set)
    after = load_checkpoint(tmp_path / "checkpoint.pt")
    assert after["step"] == 6
    if float(after["scaler"]["scale"]) == scale:
        # no overflow: the resumed chunk counted on from the saved tracker instead of restarting at 0
        assert int(after["scaler"]["_growth_tracker"]) == growth + 3
    else:
        assert float(after["scaler"]["scale"]) < scale  # an overflow backed the restored scale off


def test_cuda_checkpoint_loads_on_cpu(tmp_path):
    train_set, val_set = datasets()
    tr.fit(tiny_cfg(tmp_path, device="cuda", chunk_steps=3), fresh_model(), train_set, val_set)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert all(t.device.type == "cpu" for t in state["model"].values())
    resumed = tr.fit(tiny_cfg(tmp_path, device="cpu"), fresh_model(), train_set, val_set)
    assert resumed.finished and resumed.steps_done == 12
