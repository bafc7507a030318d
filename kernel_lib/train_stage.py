"""What a notebook calls: one function per step of a stage, so notebooks stay thin drivers.

A stage's output folder (``output_dir``; on Kaggle /kaggle/working) is its only interface:

=====================  ==============================================================
file                   what
=====================  ==============================================================
metrics.json           ``stage``, ``finished``, metrics (see train.py), split used
config.json            the stage's TrainConfig as plain data
classes.json           the class vocabulary (column order of logits and of the head)
checkpoint.pt          resumable training state (checkpoint.prev.pt: the one before)
model.pt               final weights, a plain state dict (``torch.load(weights_only=True)``)
predictions_val.npz    per-site validation logits with true labels (predictions.py)
predictions_test.npz   per-site test logits
submission.csv         this stage's own submission (``id_code,sirna``)
norm_stats.csv         the per-plate/experiment channel statistics used
history.csv, *.png     learning curves
=====================  ==============================================================
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from IPython.display import Image, display

from . import controls, metadata, models, paths, plates, submission, verify
from . import inference, train as loop, train_stage_ddp as ddp
from .environment import record_environment
from .outputs import read_metrics, update_metrics, write_json
from .status import is_done
from .parameters import with_stage_defaults
from .budget import SessionBudget, start_session  # noqa: F401  (start_session: the notebooks' first call)
from .config import TrainConfig, check_stage_arch
from .models import describe_model  # noqa: F401  (the notebooks' model summary)
from .data import NormStats, SiteDataset, compute_norm_stats, load_norm_stats, read_site
from .predictions import TEST_FILE, VAL_FILE
from .synthetic import read_test_truth
from .runtime import seed_everything

CLASSES_FILE = "classes.json"
SUBMISSION_FILE = "submission.csv"
def training_config(params: Mapping[str, Any]) -> TrainConfig:
    """TrainConfig from notebook parameters over the stage's defaults (registry.py, profile full)."""
    cfg = TrainConfig.from_params(with_stage_defaults(str(params.get("stage", "")), params))
    check_stage_arch(cfg)  # before the data and its statistics are read (minutes on real data)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    return cfg


@dataclass
class StageData:
    """The wells and datasets of one stage. ``split_name`` says which validation split."""

    data_dir: Path
    wells: pd.DataFrame           # every well of the dataset (metadata.read_wells)
    classes: list[str]
    cell_types: list[str]
    split_name: str
    train: SiteDataset
    val: SiteDataset
    test: SiteDataset
    image_size: int               # after resizing
    pseudo_labels: dict | None = None  # pseudo_label_wells' report (metrics.json "pseudo_labels")

    def summary(self) -> pd.DataFrame:
        rows = []
        for name, ds in (("train", self.train), ("val", self.val), ("test", self.test)):
            f = ds.frame
            rows.append(dict(part=name, sites=len(f), wells=f["id_code"].nunique(),
                             experiments=f["experiment"].nunique(),
                             cell_types=",".join(sorted(f["cell_type"].unique()))))
        return pd.DataFrame(rows).set_index("part")


def _native_size(data_dir: Path, sites: pd.DataFrame) -> int:
    r = sites.iloc[0]
    return int(read_site(data_dir, r["dataset"], r["experiment"], r["plate"], r["well"], int(r["site"]),
                         channels=(1,)).shape[-1])


def _norm_stats(cfg: TrainConfig, data_dir: Path, sites: pd.DataFrame) -> NormStats | None:
    """Per-plate/experiment statistics, computed once and kept in the output folder, so later
    chunks and the notebook's re-runs read instead of recomputing."""
    if cfg.normalization not in ("plate", "experiment"):
        return None
    name = f"norm_stats_{cfg.normalization}_{cfg.norm_source}_{cfg.image_size}.csv"
    path = Path(cfg.output_dir) / name
    # an earlier chunk's copy (on Kaggle: the previous chunk kernel's output, mounted as input)
    earlier = [path] + [d / name for d in paths.stage_dirs(cfg.stage, cfg.input_dirs)]
    for candidate in earlier:
        if candidate.is_file():
            stats = load_norm_stats(candidate, cfg.normalization, cfg.norm_source)
            if candidate != path:
                stats.save(path)
            return stats
    stats = compute_norm_stats(data_dir, sites, by=cfg.normalization, source=cfg.norm_source,
                               image_size=cfg.image_size, seed=cfg.seed)
    stats.save(path)
    return stats


def pseudo_label_wells(cfg: TrainConfig, wells: pd.DataFrame, classes: list[str],
                       data_dir: Path) -> tuple[pd.DataFrame, dict | None]:
    """The test treatment wells to train on (``cfg.pseudo_labels``: a merge stage's name), labelled
    with the merge's siRNA where its probability >= ``cfg.pseudo_threshold``; and a report (wells
    taken of all, threshold, and on synthetic data their accuracy against the test truth)."""
    if not cfg.pseudo_labels:
        return wells.iloc[:0], None
    path = paths.find_stage_dir(cfg.pseudo_labels, cfg.input_dirs) / submission.PSEUDO_LABELS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"parameter pseudo_labels={cfg.pseudo_labels!r}: {path} not found; run the "
                                f"{cfg.pseudo_labels} stage first (python run_all.py --only {cfg.pseudo_labels})")
    labels = metadata.read_csv_checked(path, ("id_code", "sirna", "probability"))  # empty, columns, duplicates
    try:
        labels["probability"] = labels["probability"].astype(float)
    except ValueError as err:
        raise ValueError(f"{path}: column 'probability' is not numeric ({err})") from None
    test = wells[(wells["dataset"] == "test") & (wells["well_type"] == metadata.TREATMENT)].set_index("id_code")
    unknown = labels.loc[~labels["id_code"].isin(test.index), "id_code"]
    if len(unknown):
        raise ValueError(f"{path}: id_code {unknown.iloc[0]!r} ({len(unknown)} rows) is not a test treatment well")
    chosen = labels[labels["probability"] >= cfg.pseudo_threshold]
    rows = test.loc[chosen["id_code"]].reset_index().assign(sirna=chosen["sirna"].to_numpy())
    if cfg.cell_type:
        rows = rows[rows["cell_type"] == cfg.cell_type]
    metadata.check_labels(rows, classes, source=str(path))
    of_wells = (labels["id_code"].map(test["cell_type"]) == cfg.cell_type).sum() if cfg.cell_type else len(labels)
    report = {"from": cfg.pseudo_labels, "threshold": cfg.pseudo_threshold, "wells": len(rows),
              "of_wells": int(of_wells)}
    truth = read_test_truth(data_dir)
    if truth is not None and len(rows):
        right = rows.merge(truth, on="id_code", suffixes=("", "_true"))
        report["accuracy"] = float((right["sirna"] == right["sirna_true"]).mean())
    print(f"pseudo-labels from {cfg.pseudo_labels}: {report['wells']} of {report['of_wells']} test wells at "
          f"probability >= {cfg.pseudo_threshold}" + (f", {report['accuracy']:.3f} right (synthetic truth)"
                                                      if "accuracy" in report else ""))
    return rows[wells.columns], report


def load_data(cfg: TrainConfig) -> StageData:
    """Wells, the validation split (on all train wells, then the stage's cell type), datasets."""
    data_dir = paths.resolve_data_dir(cfg.data_dir)
    wells = metadata.read_wells(data_dir)
    classes, treatments = controls.class_lists(wells, cfg.controls)  # treatments first, then controls
    cell_types = metadata.cell_types(wells)
    if cfg.cell_type and cfg.cell_type not in cell_types:
        raise ValueError(f"parameter cell_type={cfg.cell_type!r} is not in the data; cell types are {cell_types}")
    # split first, on every train well: a cell-line stage holds out exactly the experiments its
    # upstream stage held out, so no validation well can have been trained on upstream
    train_w, val_w, split_name = metadata.split_train_val(wells, cfg.split, cfg.val_experiments,
                                                          cfg.val_fraction, cfg.seed, cfg.folds, cfg.fold)
    test_w = wells[wells["dataset"] == "test"]

    def keep(w: pd.DataFrame) -> pd.DataFrame:
        w = w[w["well_type"] == metadata.TREATMENT]
        return w[w["cell_type"] == cfg.cell_type] if cfg.cell_type else w

    extra = controls.training_controls(wells, train_w, cfg.controls, cfg.cell_type)  # kernel_lib/controls.py
    pseudo, pseudo_report = pseudo_label_wells(cfg, wells, classes, data_dir)
    train_s = metadata.expand_sites(pd.concat([keep(train_w), extra, pseudo]), cfg.sites)
    if cfg.max_train_sites and len(train_s) > cfg.max_train_sites:
        rng = np.random.default_rng(cfg.seed)
        train_s = train_s.iloc[np.sort(rng.choice(len(train_s), cfg.max_train_sites, replace=False))]
    val_s = metadata.expand_sites(keep(val_w), cfg.sites)
    test_s = metadata.expand_sites(keep(test_w), cfg.sites)
    used = pd.concat([train_s, val_s, test_s])
    plates = used[["experiment", "plate"]].drop_duplicates()
    # statistics use every well (controls too) of the plates this stage touches
    all_sites = metadata.expand_sites(wells.merge(plates, on=["experiment", "plate"]), cfg.sites)
    if cfg.verify != "off":  # a broken upload fails here with every bad file listed, not mid-epoch
        report = verify.verify_files(data_dir, verify.site_rows_files(data_dir, all_sites), cfg.verify,
                                     progress=False)
        if not report.ok:
            raise ValueError(f"the data this stage reads is broken (parameter verify={cfg.verify!r}):\n"
                             f"{report.summary()}\nrun `python run_all.py verify --data DIR` for the whole folder")
        print(f"verified {report.files:,} PNGs ({cfg.verify}) in {report.seconds:.1f} s")
    stats = _norm_stats(cfg, data_dir, all_sites)
    image_size = cfg.image_size or _native_size(data_dir, used)
    make = lambda s, split: SiteDataset(data_dir, s, classes, cell_types, cfg.normalization, stats,  # noqa: E731
                                        cfg.image_size, sites=cfg.sites, split_name=split)
    data = StageData(data_dir, wells, classes, cell_types, split_name,
                     make(train_s, split_name), make(val_s, split_name), make(test_s, "test"), image_size,
                     pseudo_report)
    for ds in (data.train, data.val, data.test):
        ds.target_classes = treatments  # what inference may predict: never a control
    if cfg.cache:
        for ds in (data.train, data.val):
            ds.use_cache(paths.cache_dir())
    write_json(Path(cfg.output_dir) / CLASSES_FILE, classes)
    return data


def build_model(cfg: TrainConfig, data: StageData):
    """The stage's model, randomly initialised (or from a pretrained file); ``init_from`` weights
    and checkpoints are loaded by the training loop, which knows whether it resumes."""
    seed_everything(cfg.seed)  # every chunk's kernel must start from the same initial weights
    return models.build_model(cfg.arch, len(data.classes), in_chans=6, pretrained=cfg.pretrained,
                              conv1_init=cfg.conv1_init, head=cfg.head, n_cell_types=len(data.cell_types),
                              cell_type_dim=cfg.cell_type_dim, image_size=data.image_size, dropout=cfg.dropout,
                              arcface_scale=cfg.arcface_scale, search_dirs=cfg.input_dirs)


def pass_through(cfg: TrainConfig) -> bool:
    """A chunk that starts after the stage is done (trained and predicted) copies the done stage's
    files from its input folders into the output folder and is done in seconds. Returns True when
    it did. A stage whose training finished but whose predictions are missing is not done: the
    chunk loads the finished checkpoint (`train` returns at once) and `predict` writes them."""
    if is_done(cfg.output_dir, "train"):
        return True
    done = [d for d in paths.stage_dirs(cfg.stage, cfg.input_dirs)
            if Path(d).resolve() != Path(cfg.output_dir).resolve() and is_done(d, "train")]
    if not done:
        return False
    folder = done[0]
    for f in folder.iterdir():
        if f.is_file():
            shutil.copy2(f, Path(cfg.output_dir) / f.name)
    print(f"stage {cfg.stage} done in {folder}: copied its outputs to {cfg.output_dir}")
    return True


def train(cfg: TrainConfig, model, data: StageData, budget: SessionBudget | None = None):
    """Train (resuming from the newest checkpoint), under the session's time budget: ``budget``
    from `start_session` in the notebook's first cell (without one, the budget counts from here).
    With more than one CUDA device, under torchrun, one process per GPU (train_stage_ddp.py);
    ``model`` then receives the trained weights. metrics.json records ``processes``, ``chunks``
    (chunks run so far) and the ``environment`` (environment.py)."""
    if pass_through(cfg):
        record_environment(cfg.output_dir)
        return read_metrics(cfg.output_dir)
    n_predict = len(data.val) + len(data.test)
    # this chunk's number: one more than any earlier chunk's (this folder's, or on Kaggle the previous kernel's)
    chunks = 1 + max((int(read_metrics(d).get("chunks") or 0)
                      for d in paths.stage_dirs(cfg.stage, [cfg.output_dir, *cfg.input_dirs])), default=0)
    n = ddp.processes(cfg)
    if n > 1:
        result = ddp.launch(cfg, n, budget, n_predict)
        ddp.load_final_weights(cfg, model)
    else:
        result = loop.fit(cfg, model, data.train, data.val, n_predict=n_predict, budget=budget)
    update_metrics(cfg.output_dir, stage=cfg.stage, split=data.split_name, processes=n, chunks=chunks,
                   pseudo_labels=data.pseudo_labels)
    if cfg.validation_from:  # a final fit validates nothing itself: it reports the held-out run it repeats
        held_out = read_metrics(paths.find_stage_dir(cfg.validation_from, cfg.input_dirs))
        update_metrics(cfg.output_dir, validation_from=cfg.validation_from,
                       val_acc_well=held_out.get("val_acc_well", held_out.get("best_val_acc_well")),
                       split=f"{data.split_name} (validation: {cfg.validation_from}'s {held_out.get('split')})")
    record_environment(cfg.output_dir)
    return result


def predict(cfg: TrainConfig, model, data: StageData, postprocess: str = "assignment") -> pd.DataFrame | None:
    """When training finished: validation and test logits to prediction files, and this stage's
    own submission (post-processed with plate groups inferred from train metadata)."""
    if not read_metrics(cfg.output_dir).get("finished"):
        print("training not finished in this chunk: the next chunk resumes from checkpoint.pt")
        return None
    out = Path(cfg.output_dir)
    if is_done(out, "train"):
        print(f"predictions of the finished stage are already in {out}")
        return pd.read_csv(out / SUBMISSION_FILE, dtype=str, keep_default_na=False)
    update_metrics(out, predicted=False)  # until every prediction file below is written
    for ds, name, split in ((data.val, VAL_FILE, f"val:{data.split_name}"), (data.test, TEST_FILE, "test")):
        logits = inference.predict(cfg, model, ds, tta=cfg.tta)
        inference.write_predictions(out / name, ds, logits, split)
    groups = plates.infer_plate_groups(data.wells)
    # a cell-line stage's own submission covers its cell type only; the merge stage combines them
    wells = data.wells[data.wells["cell_type"] == cfg.cell_type] if cfg.cell_type else data.wells
    frame, _ = submission.merge_predictions({cfg.stage: out / TEST_FILE}, wells, groups, mode=postprocess)
    submission.write_submission(out / SUBMISSION_FILE, frame)
    update_metrics(out, stage=cfg.stage, finished=True, predicted=True,
                   test_accuracy=score_submission(out / SUBMISSION_FILE, data.data_dir))
    return frame


def score_submission(path: str | os.PathLike, data_dir: str | os.PathLike) -> float | None:
    """Accuracy of a submission against the synthetic test truth (None on real data)."""
    truth = read_test_truth(data_dir)
    if truth is None:
        return None
    sub = pd.read_csv(path, dtype=str, keep_default_na=False)
    merged = sub.merge(truth, on="id_code", suffixes=("", "_true"))
    return float((merged["sirna"] == merged["sirna_true"]).mean()) if len(merged) else None


def show_results(output_dir: str | os.PathLike) -> None:
    """Display a stage's metrics and learning curves (in a notebook; prints elsewhere)."""
    metrics = read_metrics(output_dir)
    display(pd.Series({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}, name="metrics",
                      dtype=object).to_frame())
    for name in ("loss.png", "accuracy.png"):
        path = Path(output_dir) / name
        if path.is_file():
            display(Image(filename=str(path)))
