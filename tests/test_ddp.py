"""DistributedDataParallel on 2 CPU processes (gloo, 127.0.0.1 only) against 1 process.

2 ranks x batch 2 must train like 1 process x batch 4: each rank takes its slice of the same
(seed, epoch) order and augmentation draws are made for the global batch. The weights agree
to float tolerance, not bitwise: the all-reduce sums gradients in another order.
"""
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_loop import TinyNet, datasets, tiny_cfg  # noqa: E402

from kernel_lib import train as tr  # noqa: E402

WORLD = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_cfg(out, batch_size):
    # dropout 0: each rank has its own dropout RNG stream, which one process cannot reproduce;
    # the last weights: the comparison is of where training ended, not of the best epoch's choice
    return tiny_cfg(out, batch_size=batch_size, accum_steps=2, epochs=2, freeze_epochs=1, predict_with="last")


def rank_main(rank: int, port: int, tmp: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyNet(dropout=0.0)
    train_set, val_set = datasets()
    result = tr.fit(ddp_cfg(Path(tmp) / "ddp", batch_size=2), model, train_set, val_set)
    torch.save({"weights": model.state_dict(), "steps": result.steps_done}, Path(tmp) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_gloo_ranks_train_like_one_process_with_the_same_global_batch(tmp_path):
    mp.start_processes(rank_main, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    # 24 sites / (2 per rank x 2 ranks x 2 accumulation) = 3 steps per epoch, 2 epochs
    assert [r["steps"] for r in ranks] == [6, 6]
    assert {"checkpoint.pt", "model.pt", "metrics.json"} <= {p.name for p in (tmp_path / "ddp").iterdir()}

    torch.manual_seed(0)
    model = TinyNet(dropout=0.0)
    train_set, val_set = datasets()
    single = tr.fit(ddp_cfg(tmp_path / "single", batch_size=4), model, train_set, val_set)
    assert single.steps_done == 6
    initial = (torch.manual_seed(0), TinyNet(dropout=0.0))[1].state_dict()
    for name, expected in model.state_dict().items():
        assert not torch.equal(expected, initial[name]), f"{name} did not train"
        for r in ranks:
            torch.testing.assert_close(r["weights"][name], expected, rtol=1e-5, atol=1e-6)
    saved = torch.load(tmp_path / "ddp" / "model.pt", weights_only=True)
    torch.testing.assert_close(saved["head.weight"], model.state_dict()["head.weight"], rtol=1e-5, atol=1e-6)
