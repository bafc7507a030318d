"""The local chain: every stage's notebook executed with papermill, training stages in chunks.

A training stage runs as a series of chunks, each a separate papermill execution under
``time_budget_s`` that resumes from the previous chunk's checkpoint in the stage's output folder,
until its metrics.json says ``finished``: exactly how the stage runs as chained Kaggle kernels.
Executed notebooks are kept per stage and chunk (``OUT/<stage>/<stage>_chunkN.ipynb`` and
``.html``); ``OUT/index.html`` links them with the summary and the figures.
"""
from __future__ import annotations

import html
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import nbformat
import pandas as pd
import papermill
from nbconvert import HTMLExporter
from papermill.exceptions import PapermillExecutionError

from .outputs import read_metrics
from .parameters import stage_params
from .registry import STAGE_NAMES, Stage, get_stage

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class StageRun:
    stage: str
    chunks: int = 0
    wall_s: float = 0.0
    skipped: bool = False
    notebooks: list[Path] = field(default_factory=list)


class ChainError(RuntimeError):
    """A failing cell: names the executed notebook and the cell's error."""


@dataclass
class Chain:
    data_dir: Path
    out: Path
    profile: str = "synthetic"
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    time_budget_s: float = 0.0
    max_chunks: int = 50
    write_html: bool = True  # each executed notebook also as HTML beside it
    log_output: bool = False
    progress: bool = True  # papermill's cell-by-cell bar while a notebook runs

    def stage_dir(self, name: str) -> Path:
        return self.out / name

    def params_for(self, stage: Stage) -> dict[str, Any]:
        """Notebook parameters (parameters.stage_params), then this chain's folders."""
        params = stage_params(stage, self.profile, self.overrides, self.time_budget_s)
        params.update(data_dir=str(self.data_dir.resolve()), output_dir=str(self.stage_dir(stage.name).resolve()),
                      input_dirs=[str(self.stage_dir(u).resolve()) for u in stage.upstream])
        return params

    def finished(self, name: str) -> bool:
        return bool(read_metrics(self.stage_dir(name)).get("finished"))

    def run_stage(self, stage: Stage, force: bool = False) -> StageRun:
        run = StageRun(stage.name)
        folder = self.stage_dir(stage.name)
        if force and folder.exists():
            shutil.rmtree(folder)
        if self.finished(stage.name):
            run.skipped = True
            return run
        folder.mkdir(parents=True, exist_ok=True)
        params = self.params_for(stage)
        t0 = time.time()
        last_steps = -1
        while True:
            run.chunks += 1
            if run.chunks > self.max_chunks:
                raise ChainError(f"stage {stage.name}: not finished after {self.max_chunks} chunks")
            nb = folder / f"{stage.name}_chunk{run.chunks}.ipynb"
            print(f"[{stage.name}] chunk {run.chunks}: {nb}", flush=True)
            self._execute(stage, nb, params)
            run.notebooks.append(nb)
            metrics = read_metrics(folder)
            if metrics.get("finished") or not stage.trains:
                break
            steps = int(metrics.get("steps_done", 0))
            if steps <= last_steps:
                raise ChainError(f"stage {stage.name}: chunk {run.chunks} made no progress ({steps} steps); "
                                 f"time_budget_s={params.get('time_budget_s')} is too small for one step, "
                                 f"a checkpoint and the inference. See {nb}")
            last_steps = steps
        if not read_metrics(folder).get("finished"):
            raise ChainError(f"stage {stage.name}: {nb} ran but metrics.json does not say finished")
        run.wall_s = time.time() - t0
        return run

    def _execute(self, stage: Stage, nb: Path, params: dict[str, Any]) -> None:
        env_path = os.environ.get("PYTHONPATH", "")
        if str(REPO_ROOT) not in env_path.split(os.pathsep):
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env_path) if p)
        try:
            papermill.execute_notebook(str(stage.notebook_path), str(nb), parameters=params, kernel_name="python3",
                                       cwd=str(nb.parent), log_output=self.log_output,
                                       progress_bar=self.progress and not self.log_output)
        except PapermillExecutionError as e:
            raise ChainError(f"stage {stage.name} failed in {nb} (cell {e.exec_count}): {e.ename}: {e.evalue}") from None
        finally:
            if self.write_html and nb.is_file():
                render_html(nb)

    def run(self, stages: Sequence[str] | None = None, force: bool = False) -> list[StageRun]:
        names = list(stages) if stages else list(STAGE_NAMES)
        runs = []
        for name in names:
            stage = get_stage(name)
            runs.append(self.run_stage(stage, force=force))
        merge = self.stage_dir("merge") / "submission.csv"
        if merge.is_file():
            shutil.copy2(merge, self.out / "submission.csv")
        return runs


def select_stages(only: str | None = None, start: str | None = None) -> list[str]:
    """``--only a,b`` and ``--from stage`` selection, in chain order."""
    names = list(STAGE_NAMES)
    if start:
        get_stage(start)
        names = names[names.index(start):]
    if only:
        wanted = [s.strip() for s in only.split(",") if s.strip()]
        for s in wanted:
            get_stage(s)
        names = [n for n in names if n in wanted]
    return names


def render_html(nb: Path) -> Path:
    """An executed notebook as HTML beside it (nbconvert)."""
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(str(nb), as_version=4))
    out = nb.with_suffix(".html")
    out.write_text(body, encoding="utf-8")
    return out


def summary_table(chain: Chain, runs: Sequence[StageRun]) -> pd.DataFrame:
    """stage, chunks, wall time, validation accuracy (and split), test accuracy against truth."""
    rows = []
    for run in runs:
        m = read_metrics(chain.stage_dir(run.stage))
        val = m.get("val_acc_well", m.get("best_val_acc_well"))
        rows.append(dict(stage=run.stage, chunks=run.chunks, wall_s=round(run.wall_s, 1),
                         status="skipped (finished)" if run.skipped else ("finished" if m.get("finished") else "-"),
                         val_acc_well=None if val is None else round(float(val), 4),
                         test_acc=None if m.get("test_accuracy") is None else round(float(m["test_accuracy"]), 4),
                         split=m.get("split", "")))
    return pd.DataFrame(rows).set_index("stage")


def write_index(chain: Chain, table: pd.DataFrame) -> Path:
    """OUT/index.html: the summary, the plate maps and curves, links to every executed notebook."""
    out = chain.out
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>RxRx1 chain</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px}img{max-width:48%;margin:4px;border:1px solid #eee;vertical-align:top}"
             "</style></head><body><h1>RxRx1 notebook chain</h1>",
             f"<p>data: <code>{html.escape(str(chain.data_dir))}</code> &middot; profile: {chain.profile}</p>",
             "<h2>Summary</h2>", table.to_html(na_rep="")]
    sub = out / "submission.csv"
    if sub.is_file():
        parts.append("<p>Final submission: <a href='submission.csv'>submission.csv</a></p>")
    parts.append("<h2>Notebooks</h2><ul>")
    for name in STAGE_NAMES:
        folder = chain.stage_dir(name)
        for nb in sorted(folder.glob(f"{name}_chunk*.ipynb"), key=lambda p: int(p.stem.rsplit("chunk", 1)[1])):
            rel = nb.relative_to(out).as_posix()
            link = rel[:-len(".ipynb")] + ".html"
            parts.append(f"<li><a href='{html.escape(link)}'>{html.escape(nb.stem)}</a> "
                         f"(<a href='{html.escape(rel)}'>ipynb</a>)</li>")
    parts.append("</ul><h2>Figures</h2>")
    for name in STAGE_NAMES:
        figures = sorted(chain.stage_dir(name).glob("*.png"))
        if figures:
            parts.append(f"<h3>{name}</h3>")
            parts += [f"<a href='{f.relative_to(out).as_posix()}'><img src='{f.relative_to(out).as_posix()}' "
                      f"alt='{html.escape(f.stem)}' title='{html.escape(f.stem)}'></a>" for f in figures]
    parts.append("</body></html>")
    path = out / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
