"""A training notebook on more than one device runs `fit` under torchrun (train_stage_ddp.py):
which path is chosen, and the notebook path itself with 2 gloo CPU ranks (KERNEL_LIB_DDP_PROCS=2)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from kernel_lib import inference, synthetic, train_stage, train_stage_ddp as ddp
from kernel_lib.chain import Chain
from kernel_lib.config import TrainConfig
from kernel_lib.predictions import load_predictions
from kernel_lib.registry import get_stage


def test_more_than_one_cuda_device_chooses_torchrun(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert ddp.processes(TrainConfig(device="auto"), env={}) == 2
    assert ddp.processes(TrainConfig(device="cuda"), env={}) == 2
    assert ddp.processes(TrainConfig(device="cpu"), env={}) == 1  # the CPU keeps the in-process path
    assert ddp.processes(TrainConfig(device="auto"), env={"WORLD_SIZE": "2"}) == 1  # inside a rank: no nesting
    assert ddp.processes(TrainConfig(device="auto"), env={ddp.PROCS_ENV: "1"}) == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert ddp.processes(TrainConfig(device="auto"), env={}) == 1
    assert ddp.processes(TrainConfig(device="cpu"), env={ddp.PROCS_ENV: "2"}) == 2
    with pytest.raises(ValueError, match="KERNEL_LIB_DDP_PROCS='two'"):
        ddp.processes(TrainConfig(), env={ddp.PROCS_ENV: "two"})


def test_the_launch_command_is_torchrun_of_the_module():
    assert ddp.torchrun_command(2, "/tmp/spec.json") == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "kernel_lib.train_stage_ddp", "/tmp/spec.json"]


def test_a_failing_launch_names_the_stage_and_shows_the_last_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(ddp, "torchrun_command", lambda n, spec: [sys.executable, "-c",
                                                                  "print('rank 0 says hello'); raise SystemExit(3)"])
    shown = []
    with pytest.raises(RuntimeError, match=r"stage s: training under torchrun with 2 processes failed \(exit status "
                                           r"3\); its last lines:\nrank 0 says hello"):
        ddp.launch(TrainConfig(stage="s", output_dir=str(tmp_path), device="cpu"), 2, None, 0, echo=shown.append)
    assert shown[-1] == "rank 0 says hello"  # streamed into the notebook as it came


TINY = synthetic.SyntheticSpec(image_size=16, sirnas_per_group=4, train_experiments=3, test_experiments=1,
                               positive_controls=2, seed=3)
BATCH, SITES = 4, 32


@pytest.mark.slow
def test_the_training_notebook_runs_two_gloo_ranks_under_torchrun(tmp_path_factory, monkeypatch):
    data = synthetic.ensure(tmp_path_factory.mktemp("tiny"), TINY, progress=False)
    out = tmp_path_factory.mktemp("ddp_chain")
    monkeypatch.setenv(ddp.PROCS_ENV, "2")
    over = {"base_cnn": {"epochs": 2, "batch_size": BATCH, "lr": 1e-3, "image_size": 16, "max_train_sites": SITES,
                         "num_workers": 0, "device": "cpu"}}
    chain = Chain(data_dir=data, out=out, profile="smoke", overrides=over, write_html=False, progress=False)
    run = chain.run(["base_cnn"])[0]
    folder = chain.stage_dir("base_cnn")
    m = json.loads((folder / "metrics.json").read_text())
    # 2 ranks x 4 sites: a global batch of 8, so 32 sites give 4 steps per epoch (8 in one process)
    assert m["processes"] == 2 and m["finished"] is True and m["predicted"] is True
    assert m["steps_done"] == 2 * (SITES // (2 * BATCH)) == 8
    saved = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert saved["global_batch"] == 2 * BATCH and saved["step"] == 8
    assert m["environment"]["torch"] == torch.__version__
    # the notebook streamed the ranks' progress and predicted from the weights they wrote
    nb = json.loads(run.notebooks[0].read_text())
    text = "".join(o.get("text", "") if isinstance(o.get("text", ""), str) else "".join(o["text"])
                   for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert "2 training processes under torchrun" in text
    assert "[base_cnn] no checkpoint of this stage: starting fresh" in text  # printed by rank 0
    assert "[base_cnn] finished: epoch 2/2, step 8/8" in text
    cfg = train_stage.training_config(chain.params_for(get_stage("base_cnn")))
    d = train_stage.load_data(cfg)
    model = train_stage.build_model(cfg, d)
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    expected = inference.predict(cfg, model, d.test, tta=False)
    written = load_predictions(folder / "predictions_test.npz")
    np.testing.assert_allclose(written.logits.astype(np.float32), expected, rtol=1e-3, atol=1e-3)
    untrained = inference.predict(cfg, train_stage.build_model(cfg, d), d.test, tta=False)
    assert not np.allclose(untrained, expected, atol=1e-3)
