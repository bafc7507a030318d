"""The chain's index page (index.html): the summary of every stage, its warnings, the merge's test
plates, links to the executed notebooks and every stage's figures.

Written from stage folders alone, so that two writers give the same page: the local chain
(`chain.write_index`: OUT/index.html over OUT/<stage>/, with the chain's own run table), and the
merge stage (`write_merge_index`: index.html in the merge's output, over the stage folders found in
its ``input_dirs``). On Kaggle the merge kernel lists every stage's last kernel as a source, so its
output (/kaggle/working, which ``kaggle download`` fetches) holds the whole result: the submission
and this page. A linked file outside the page's folder (an upstream kernel's output under
/kaggle/input) is copied to ``stages/<stage>/`` beside the page, so every link works offline.
Nothing here imports papermill, nbconvert or torch.
"""
from __future__ import annotations

import html
import os
import shutil
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd

from . import paths
from .outputs import read_metrics
from .registry import STAGE_NAMES, final_merge, get_stage

INDEX_FILE = "index.html"
COPIES_DIR = "stages"
SUMMARY_COLUMNS = ("chunks", "wall_s", "status", "warnings", "val_acc_well", "test_acc", "split")
# an executed notebook: the local chain's chunks, or the notebook Kaggle keeps in a kernel's output
KAGGLE_NOTEBOOK, KAGGLE_HTML = "__notebook__.ipynb", "__results__.html"


def stage_folders(roots: Iterable[str | os.PathLike], own: Mapping[str, Path] | None = None) -> dict[str, Path]:
    """Each stage's output folder under ``roots`` (paths.find_stage_dir: a finished one, else the
    most steps), in chain order; ``own`` (stage -> folder) first, e.g. the merge's own output."""
    roots, own = list(roots), dict(own or {})
    found: dict[str, Path] = {}
    for name in STAGE_NAMES:
        if name in own:
            found[name] = Path(own[name])
            continue
        try:
            found[name] = paths.find_stage_dir(name, roots)
        except FileNotFoundError:
            pass
    return found


def _round(value, digits: int = 4):
    return None if value is None else round(float(value), digits)


def summary_from_folders(folders: Mapping[str, Path]) -> pd.DataFrame:
    """The summary table of `chain.summary_table` from the folders' metrics.json alone: ``chunks``
    (training chunks recorded), ``wall_s`` (all chunks), ``status``, ``warnings`` (count; the
    messages in ``attrs["warnings"]``), ``val_acc_well``, ``test_acc``, ``split``."""
    rows, warned = [], []
    for name, folder in folders.items():
        m = read_metrics(folder)
        wall = m.get("wall_time_s")
        wall = wall.get("total") if isinstance(wall, dict) else wall
        messages = [str(w).removeprefix(f"[{name}] ") for w in m.get("warnings") or []]
        warned += [(name, w) for w in dict.fromkeys(messages)]
        rows.append(dict(stage=name, chunks=m.get("chunks"), wall_s=_round(wall, 1),
                         status="finished" if m.get("finished") else (m.get("stopped_reason") or "unfinished"),
                         warnings=len(set(messages)), val_acc_well=_round(m.get("val_acc_well", m.get("best_val_acc_well"))),
                         test_acc=_round(m.get("test_accuracy")), split=m.get("split", "")))
    table = pd.DataFrame(rows, columns=["stage", *SUMMARY_COLUMNS]).set_index("stage")
    table.attrs["warnings"] = warned
    return table


class _Links:
    """Relative links from the page's folder; a file outside it is copied to stages/<stage>/."""

    def __init__(self, out: Path):
        self.out = out.resolve()

    def __call__(self, stage: str, f: Path) -> str:
        f = Path(f)
        try:
            return f.resolve().relative_to(self.out).as_posix()
        except ValueError:
            target = self.out / COPIES_DIR / stage / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if f.is_file():
                shutil.copy2(f, target)
            return target.relative_to(self.out).as_posix()


def _image(link: str, f: Path) -> str:
    return (f"<a href='{html.escape(link)}'><img src='{html.escape(link)}' alt='{html.escape(f.stem)}' "
            f"title='{html.escape(f.stem)}'></a>")


def _notebooks(name: str, folder: Path) -> list[tuple[Path, Path | None]]:
    """(notebook, its HTML) of a stage folder: the chunks in order, or Kaggle's kernel notebook."""
    chunks = [p for p in folder.glob(f"{name}_chunk*.ipynb") if p.stem.rsplit("chunk", 1)[1].isdigit()]
    found = [(nb, nb.with_suffix(".html")) for nb in sorted(chunks, key=lambda p: int(p.stem.rsplit("chunk", 1)[1]))]
    if (folder / KAGGLE_NOTEBOOK).is_file():
        found.append((folder / KAGGLE_NOTEBOOK, folder / KAGGLE_HTML))
    return found


def write_index_page(out: str | os.PathLike, folders: Mapping[str, Path], table: pd.DataFrame,
                     data_dir: str | os.PathLike = "", profile: str = "") -> Path:
    """OUT/index.html: the summary ``table``, the warnings in its ``attrs``, the merge's test
    plates, links to every executed notebook and each stage's figures, from ``folders``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    link = _Links(out)
    about = [f"data: <code>{html.escape(str(data_dir))}</code>"] if str(data_dir) else []
    about += [f"profile: {html.escape(profile)}"] if profile else []
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>RxRx1 chain</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px}img{max-width:48%;margin:4px;border:1px solid #eee;vertical-align:top}"
             "</style></head><body><h1>RxRx1 notebook chain</h1>",
             f"<p>{' &middot; '.join(about)}</p>", "<h2>Summary</h2>", table.to_html(na_rep="")]
    if (out / "submission.csv").is_file():
        parts.append("<p>Final submission: <a href='submission.csv'>submission.csv</a></p>")
    warned = list(getattr(table, "attrs", {}).get("warnings", []))
    if warned:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li><b>{html.escape(n)}</b>: {html.escape(w)}</li>"
                                                       for n, w in warned) + "</ul>")
    # the final merge's inferred rotations (merge_pseudo's when it ran: its labels are the submission's)
    merges = [n for n in folders if get_stage(n).kind == "merge" and (Path(folders[n]) / "test_rotations.csv").is_file()]
    if merges:
        final = final_merge(merges)
        merge = Path(folders[final])
        rotations = merge / "test_rotations.csv"
        parts.append("<h2>Test plates: inferred plate groups and rotations</h2>"
                     "<p>Each test experiment's rotation of plate groups over its plates, inferred from the "
                     "merged predictions; <code>margin</code> is its share of the probability mass against "
                     "the runner-up rotation (0.5: a tie, 1.0: certain).</p>")
        parts.append(pd.read_csv(rotations).to_html(index=False, na_rep="", float_format=lambda v: f"{v:.3f}"))
        parts += [_image(link(final, f), f) for f in sorted(merge.glob("test_plate_map_*.png"))]
    parts.append("<h2>Notebooks</h2><ul>")
    for name, folder in folders.items():
        for nb, page in _notebooks(name, Path(folder)):
            inside = link.out in nb.resolve().parents
            rel = link(name, nb)
            shown = nb.stem if nb.name != KAGGLE_NOTEBOOK else f"{name} (Kaggle kernel)"
            if inside or (page is not None and page.is_file()):
                target = rel[:-len(".ipynb")] + ".html" if nb.name != KAGGLE_NOTEBOOK else link(name, page)
                parts.append(f"<li><a href='{html.escape(target)}'>{html.escape(shown)}</a> "
                             f"(<a href='{html.escape(rel)}'>ipynb</a>)</li>")
            else:
                parts.append(f"<li><a href='{html.escape(rel)}'>{html.escape(shown)}</a> (ipynb)</li>")
    parts.append("</ul><h2>Figures</h2>")
    for name, folder in folders.items():
        figures = sorted(f for f in Path(folder).glob("*.png") if not f.name.startswith("test_plate_map_"))
        if figures:
            parts.append(f"<h3>{html.escape(name)}</h3>")
            parts += [_image(link(name, f), f) for f in figures]
    parts.append("</body></html>")
    path = out / INDEX_FILE
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def write_merge_index(out: str | os.PathLike, input_dirs: Iterable[str | os.PathLike],
                      data_dir: str | os.PathLike = "", stage: str = "merge") -> Path:
    """A merge stage's index.html: every stage found in ``input_dirs`` and the merge's own
    ``out`` (as ``stage``), the summary from their metrics.json; linked files from outside ``out``
    copied in."""
    folders = stage_folders(input_dirs, own={stage: Path(out)})
    return write_index_page(out, folders, summary_from_folders(folders), data_dir)
