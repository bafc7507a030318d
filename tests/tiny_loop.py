"""Tiny CPU stand-ins shared by the loop's tests: sites following the dataset contract, a small
net with a ``head``, a fake clock and a config (test_train, test_budget, test_inference, test_ddp)."""
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from kernel_lib import train as tr
from kernel_lib.config import TrainConfig

CLASSES = ["sirna_7", "sirna_2", "UNTREATED"]  # opaque labels, not in sorted order
CELL_TYPES = ["HEPG2", "RPE"]


class TinySites(Dataset):
    """In-memory sites following the loop's dataset contract; the class shows in one channel."""

    def __init__(self, n_wells: int, experiment: str = "HEPG2-01", classes=CLASSES, labels=None, size: int = 6,
                 channels: int = 3, seed: int = 0, split_name: str = "experiment"):
        g = torch.Generator().manual_seed(seed)
        rows = []
        for w in range(n_wells):
            label = labels[w] if labels is not None else w % len(classes)
            for site in (1, 2):
                rows.append({"id_code": f"{experiment}_1_W{w:02d}", "experiment": experiment, "plate": 1,
                             "well": f"W{w:02d}", "site": site, "cell_type": CELL_TYPES[w % 2],
                             "sirna": classes[label] if label >= 0 else "", "label": label, "ct": w % 2})
        self.frame = pd.DataFrame(rows, columns=["id_code", "experiment", "plate", "well", "site", "cell_type",
                                                 "sirna", "label", "ct"])
        self.classes, self.cell_types, self.split_name = list(classes), list(CELL_TYPES), split_name
        n = len(rows)
        images = torch.randint(0, 100, (n, channels, size, size), generator=g)
        for i, row in enumerate(rows):
            if row["label"] >= 0:
                images[i, row["label"] % channels] += 60 * (1 + row["label"] // channels)
        self.images = images.clamp(0, 255).to(torch.uint8)
        self.mean = self.images.float().mean((2, 3))
        self.std = self.images.float().std((2, 3), correction=0) + 1.0

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, i: int) -> dict:
        row = self.frame.iloc[i]
        return {"image": self.images[i], "mean": self.mean[i], "std": self.std[i],
                "label": torch.tensor(int(row["label"])), "cell_type": torch.tensor(int(row["ct"])),
                "index": torch.tensor(i)}


class TinyNet(nn.Module):
    """conv -> ReLU -> global mean -> dropout -> head; has a ``head`` for freeze_epochs."""

    def __init__(self, in_chans: int = 3, n_classes: int = 3, dropout: float = 0.3):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(8, n_classes)

    def forward(self, x, cell_type=None):
        return self.head(self.drop(F.relu(self.conv(x)).mean((2, 3))))


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class TickPerStep(tr.Callback):
    """Each optimizer step takes 1 s of fake time (advanced after the loop measured the step)."""

    def __init__(self, clock: FakeClock):
        self.clock = clock

    def on_step_end(self, progress):
        self.clock.t += 1.0




def tiny_cfg(out, **overrides) -> TrainConfig:
    params = dict(stage="tiny", arch="tinynet", output_dir=str(out), device="cpu", seed=3, epochs=2, batch_size=2,
                  accum_steps=2, lr=0.05, schedule="cosine", warmup_steps=2, min_lr=0.001, label_smoothing=0.1,
                  freeze_epochs=1, patience=0, augment=True, resume="auto")
    params.update(overrides)
    return TrainConfig.from_params(params)


def fresh_model(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return TinyNet(**kwargs)


def datasets():
    # 12 wells x 2 sites = 24 training sites = 6 optimizer steps of 2 x 2 per epoch
    return TinySites(12, seed=1), TinySites(4, experiment="RPE-02", seed=2)


