"""Inference: validation metrics from logits, predict (order, TTA), prediction files."""
import math
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_loop import CLASSES, TinySites, tiny_cfg  # noqa: E402

from kernel_lib import inference  # noqa: E402
from kernel_lib.predictions import load_predictions  # noqa: E402


def test_evaluate_averages_site_probabilities_per_well():
    probs = torch.tensor([[0.45, 0.55], [0.9, 0.1],   # well A (label 0): sites disagree, mean says 0
                          [0.6, 0.4], [0.7, 0.3],     # well B (label 1): both wrong
                          [0.1, 0.9]])                # unlabelled site: ignored
    labels = torch.tensor([0, 0, 1, 1, -1])
    metrics = inference.evaluate(probs.log(), labels, ["A", "A", "B", "B", "C"], ["HEPG2", "HEPG2", "RPE", "RPE", "RPE"])
    assert metrics["val_acc_site"] == 0.25
    assert metrics["val_acc_well"] == 0.5
    assert (metrics["val_acc_well_HEPG2"], metrics["val_acc_well_RPE"]) == (1.0, 0.0)
    expected_loss = -(math.log(0.45) + math.log(0.9) + math.log(0.4) + math.log(0.3)) / 4
    assert math.isclose(metrics["val_loss"], expected_loss, rel_tol=1e-6)


def test_predict_keeps_order_and_sums_tta_views(tmp_path):
    class PixelwiseNet(nn.Module):  # 1x1 conv + global mean: the same logits for every view
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x, cell_type=None):
            return self.conv(x).mean((2, 3))

    torch.manual_seed(0)
    model, dataset = PixelwiseNet(), TinySites(3)
    cfg = tiny_cfg(tmp_path, batch_size=4)
    plain = inference.predict(cfg, model, dataset, tta=False)
    expected = torch.stack([model(((dataset[i]["image"].float() - dataset.mean[i][:, None, None])
                                   / dataset.std[i][:, None, None])[None])[0] for i in range(len(dataset))])
    assert plain.dtype == np.float32 and plain.shape == (6, 3)
    np.testing.assert_allclose(plain, expected.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inference.predict(cfg, model, dataset, tta=True), 8 * plain, rtol=1e-5, atol=1e-5)


def test_write_predictions_round_trips(tmp_path):
    dataset = TinySites(2)
    logits = np.arange(12, dtype=np.float32).reshape(4, 3)
    inference.write_predictions(tmp_path / "predictions_val.npz", dataset, logits, "val:experiment")
    loaded = load_predictions(tmp_path / "predictions_val.npz")
    assert loaded.classes == CLASSES and loaded.split == "val:experiment"
    np.testing.assert_array_equal(loaded.logits, logits)
    assert list(loaded.frame["sirna"]) == ["sirna_7", "sirna_7", "sirna_2", "sirna_2"]
