"""A training stage's reports: metrics.json, config.json, history.csv (one row per epoch) and the
learning curves loss.png and accuracy.png, all written through kernel_lib.outputs.

Owns `write_reports` (what the loop writes at every save) and `plot_history`. What goes into the
metrics is the loop's business; this module only lays it out on disk.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from .outputs import METRICS_FILE, write_json, write_text


def write_reports(out_dir: Path, metrics: Mapping[str, Any], config: Mapping[str, Any], history: list[dict],
                  plots: bool) -> None:
    """metrics.json, config.json and (with any epoch done) history.csv; with ``plots`` the PNGs too."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / METRICS_FILE, metrics)
    write_json(out_dir / "config.json", config)
    if history:
        write_text(out_dir / "history.csv", pd.DataFrame(history).to_csv(index=False))
        if plots:
            plot_history(history, out_dir)


def plot_history(history: list[dict], out_dir: Path) -> None:
    """loss.png (train and validation loss) and accuracy.png (validation accuracies) per epoch."""
    # Imported here: matplotlib costs about a second to import and only a chunk's end plots.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    frame = pd.DataFrame(history)
    panels = {"loss.png": ["train_loss", "val_loss"],
              "accuracy.png": [c for c in frame.columns if c.startswith("val_acc")]}
    for name, columns in panels.items():
        fig = Figure(figsize=(6, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for column in columns:
            if column in frame and frame[column].notna().any():
                ax.plot(frame["epoch"], frame[column], marker="o", label=column)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(name.removesuffix(".png"))
        if ax.lines:
            ax.legend(fontsize="small")
        fig.subplots_adjust(left=0.14, right=0.97, bottom=0.13, top=0.97)
        fig.savefig(out_dir / name, dpi=80)

