"""The local chain: every stage's notebook executed with papermill, training stages in chunks.

A training stage runs as a series of chunks, each a separate papermill execution under
``time_budget_s`` that resumes from the previous chunk's checkpoint in the stage's output folder,
until its metrics.json says ``finished``: exactly how the stage runs as chained Kaggle kernels.
Executed notebooks are kept per stage and chunk (``OUT/<stage>/<stage>_chunkN.ipynb`` and
``.html``); ``OUT/index.html`` links them with the summary and the figures.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import nbformat
import pandas as pd
import papermill
from jupyter_client import AsyncKernelManager
from nbclient.exceptions import DeadKernelError
from nbconvert import HTMLExporter
from papermill.exceptions import PapermillExecutionError

from .config import CHUNK_PARAMS
from .index_page import write_index_page
from .outputs import read_metrics
from .parameters import CONFIGS, accepted_parameters, stage_params, with_stage_defaults
from .registry import STAGE_NAMES, STAGES, Stage, enabled_stages, final_merge, get_stage, split_names
from .status import CONFIG_FILE, SUBMISSION_FILE, mark_stale, stage_state

REPO_ROOT = Path(__file__).resolve().parent.parent
_CHUNK_NUMBER = re.compile(r"_chunk(\d+)\.ipynb$")
# a Python warning as the warnings module prints it: "path:line: SomeWarning: message"
_WARNING_LINE = re.compile(r"^(?:.*?:\d+: )?(?:[A-Za-z]+Warning): (.+)$")


@dataclass
class StageRun:
    stage: str
    chunks: int = 0
    wall_s: float = 0.0
    skipped: bool = False
    notebooks: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class ChainError(RuntimeError):
    """A failing cell: names the executed notebook and the cell's error."""


class StaleResultsError(ChainError):
    """A stage's folder holds results of other data or parameters than this run's."""


def downstream(name: str) -> list[str]:
    """Every stage that reads ``name``'s outputs, directly or through others, in chain order."""
    found: set[str] = set()
    frontier = {name}
    while frontier:
        frontier = {s.name for s in STAGES if set(s.upstream) & frontier} - found
        found |= frontier
    return [n for n in STAGE_NAMES if n in found]


class _IpcKernelManager(AsyncKernelManager):
    """The notebooks' kernels talk over local sockets: no open TCP ports, and none of ipykernel's
    "Kernel is running over TCP without encryption" warning once per notebook."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("transport", "ipc")
        # the socket files go to a temporary folder, not into the stage's output folder (the cwd)
        kwargs.setdefault("ip", os.path.join(tempfile.mkdtemp(prefix="rxrx1-kernel-"), "kernel-ipc"))
        super().__init__(**kwargs)


class _KnownParameters(logging.Filter):
    """Drops papermill's "Passed unknown parameter: NAME" for names the stage's config accepts:
    the notebooks' parameters cells list only identity and folders, every other field is injected."""

    def __init__(self, names: set[str]) -> None:
        super().__init__()
        self.names = names

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        prefix = "Passed unknown parameter: "
        return not (message.startswith(prefix) and message[len(prefix):].strip() in self.names)


def notebook_warnings(nb: Path) -> list[str]:
    """Python warnings an executed notebook printed (its stderr outputs), in order, once each."""
    try:
        cells = nbformat.read(str(nb), as_version=4).cells
    except (OSError, ValueError):
        return []
    found: list[str] = []
    for cell in cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                for line in str(output.get("text", "")).splitlines():
                    m = _WARNING_LINE.match(line.strip())
                    if m and m.group(1) not in found:
                        found.append(m.group(1))
    return found


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
    echo_warnings: bool = True  # print each stage's warnings on the console as it ends
    extra: tuple[str, ...] = ()  # optional stages or groups to run too (--with; registry.enabled_stages)

    @property
    def stages(self) -> list[str]:
        """The stages this chain runs, in order."""
        return enabled_stages(self.profile, self.extra)

    @property
    def final_merge(self) -> str:
        """The merge whose submission.csv is the chain's (merge_pseudo when pseudo-labelling)."""
        return final_merge(self.stages)

    def stage_dir(self, name: str) -> Path:
        return self.out / name

    def params_for(self, stage: Stage) -> dict[str, Any]:
        """Notebook parameters (parameters.stage_params), then this chain's folders."""
        params = stage_params(stage, self.profile, self.overrides, self.time_budget_s, self.extra)
        params.update(data_dir=str(self.data_dir.resolve()), output_dir=str(self.stage_dir(stage.name).resolve()),
                      input_dirs=[str(self.stage_dir(u).resolve()) for u in stage.upstream])
        return params

    def state(self, name: str) -> str:
        """status.stage_state of the stage's folder: done, trained, partial, stale or absent."""
        return stage_state(self.stage_dir(name), get_stage(name).kind)

    def finished(self, name: str) -> bool:
        """Done: a training stage only once its predictions and submission exist (status.py)."""
        return self.state(name) == "done"

    def differences(self, stage: Stage, params: dict[str, Any]) -> list[str]:
        """What differs between the stage folder's config.json and this run's parameters: the data
        folder and every parameter that changes results (config.CHUNK_PARAMS do not)."""
        path = self.stage_dir(stage.name) / CONFIG_FILE
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            return []
        if not isinstance(saved, dict):
            return []
        wanted = CONFIGS[stage.kind].from_params(with_stage_defaults(stage.name, params)).to_dict()
        found = []
        if saved.get("data_dir") and Path(saved["data_dir"]).resolve() != Path(params["data_dir"]).resolve():
            found.append(f"data_dir: was {saved['data_dir']}, now {params['data_dir']}")
        for name, value in wanted.items():
            if name in CHUNK_PARAMS or name not in saved:
                continue
            if _plain(saved[name]) != _plain(value):
                found.append(f"{name}: was {saved[name]!r}, now {value!r}")
        return found

    def check_inputs(self, stage: Stage, params: dict[str, Any]) -> None:
        differ = self.differences(stage, params)
        if differ:
            below = downstream(stage.name)
            raise StaleResultsError(
                f"stage {stage.name}: {self.stage_dir(stage.name)} holds results of other inputs than this "
                f"run's ({'; '.join(differ)}). Either rerun it with these: python run_all.py --only {stage.name} "
                f"--force (keeping your other options{'; it marks ' + ', '.join(below) + ' stale' if below else ''}), "
                f"or write this run elsewhere: --out ANOTHER_FOLDER")

    def mark_downstream_stale(self, name: str) -> list[str]:
        """Stages built from ``name``'s previous outputs are out of date: marked ``stale`` (rerun
        from scratch next time they are selected); a final submission from them is removed."""
        marked = [d for d in downstream(name)
                  if self.state(d) != "absent" and mark_stale(self.stage_dir(d), f"upstream stage {name} was rerun")]
        if any(get_stage(n).kind == "merge" for n in [name, *marked]):
            (self.out / SUBMISSION_FILE).unlink(missing_ok=True)
        if marked:
            print(f"[{name}] rerun from scratch: marked stale (rerun when selected): {', '.join(marked)}", flush=True)
        return marked

    def _next_chunk(self, folder: Path) -> int:
        numbers = [int(m.group(1)) for p in folder.glob("*_chunk*.ipynb") if (m := _CHUNK_NUMBER.search(p.name))]
        return max(numbers, default=0) + 1

    def run_stage(self, stage: Stage, force: bool = False) -> StageRun:
        run = StageRun(stage.name)
        folder = self.stage_dir(stage.name)
        params = self.params_for(stage)
        state = self.state(stage.name)
        if force or state == "stale":
            if folder.exists():
                shutil.rmtree(folder)
            state = "absent"
        elif state != "absent":
            self.check_inputs(stage, params)
        if state == "done":
            run.skipped = True
            run.warnings = [str(w).removeprefix(f"[{stage.name}] ")
                            for w in read_metrics(folder).get("warnings") or []]
            return run
        if state == "absent":
            self.mark_downstream_stale(stage.name)
        elif state == "trained":
            print(f"[{stage.name}] training finished earlier, predictions missing: predicting from the finished "
                  f"checkpoint", flush=True)
        if stage.kind == "merge":
            (self.out / SUBMISSION_FILE).unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        last_steps = -1
        first = self._next_chunk(folder)
        while True:
            run.chunks += 1
            if run.chunks > self.max_chunks:
                raise ChainError(f"stage {stage.name}: not finished after {self.max_chunks} chunks")
            nb = folder / f"{stage.name}_chunk{first + run.chunks - 1}.ipynb"
            print(f"[{stage.name}] chunk {first + run.chunks - 1}: {nb}", flush=True)
            try:
                self._execute(stage, nb, params)
            finally:
                run.notebooks.append(nb)
                self._collect_warnings(run, nb)
            metrics = read_metrics(folder)
            if metrics.get("finished") or not stage.trains:
                break
            steps = int(metrics.get("steps_done", 0))
            if steps <= last_steps:
                raise ChainError(f"stage {stage.name}: chunk {run.chunks} made no progress ({steps} steps); "
                                 f"time_budget_s={params.get('time_budget_s')} is too small for one step, "
                                 f"a checkpoint and the inference. See {nb}")
            last_steps = steps
        state = self.state(stage.name)
        if state == "trained":
            raise ChainError(f"stage {stage.name}: training finished but its predictions are missing after {nb}; "
                             f"rerun: it predicts from the finished checkpoint")
        if state != "done":
            raise ChainError(f"stage {stage.name}: {nb} ran but metrics.json does not say finished")
        run.wall_s = time.time() - t0
        return run

    def _collect_warnings(self, run: StageRun, nb: Path) -> None:
        metrics = read_metrics(self.stage_dir(run.stage))
        for message in [*notebook_warnings(nb), *(str(w) for w in metrics.get("warnings") or [])]:
            message = message.removeprefix(f"[{run.stage}] ")
            if message not in run.warnings:
                run.warnings.append(message)
                if self.echo_warnings:
                    print(f"[{run.stage}] warning: {message}", flush=True)

    def _execute(self, stage: Stage, nb: Path, params: dict[str, Any]) -> None:
        env_path = os.environ.get("PYTHONPATH", "")
        if str(REPO_ROOT) not in env_path.split(os.pathsep):
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env_path) if p)
        quiet = _KnownParameters(accepted_parameters(stage))
        logger = logging.getLogger("papermill")
        logger.addFilter(quiet)
        try:
            papermill.execute_notebook(str(stage.notebook_path), str(nb), parameters=params, kernel_name="python3",
                                       cwd=str(nb.parent), log_output=self.log_output,
                                       progress_bar=self.progress and not self.log_output,
                                       kernel_manager_class=_IpcKernelManager)
        except PapermillExecutionError as e:
            raise ChainError(f"stage {stage.name} failed in {nb} (cell {e.exec_count}): {e.ename}: {e.evalue}") from None
        except DeadKernelError as e:
            raise ChainError(f"stage {stage.name}: the notebook's kernel died in {nb} (killed, or out of memory: "
                             f"{str(e).strip() or 'DeadKernelError'}); rerun resumes: a training stage from its last "
                             f"checkpoint, a finished one at prediction") from None
        finally:
            logger.removeFilter(quiet)
            if self.write_html and nb.is_file():
                render_html(nb)

    def run(self, stages: Sequence[str] | None = None, force: bool = False) -> list[StageRun]:
        names = list(stages) if stages else self.stages
        runs = []
        for name in names:
            stage = get_stage(name)
            runs.append(self.run_stage(stage, force=force))
        last = self.final_merge
        merge = self.stage_dir(last) / SUBMISSION_FILE
        final = self.out / SUBMISSION_FILE
        if merge.is_file() and self.finished(last):
            shutil.copy2(merge, final)
        elif final.is_file() and self.state(last) != "done":
            final.unlink()  # never a final submission the final merge's current outputs do not back
        return runs


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples are lists), for comparing a config with config.json."""
    return json.loads(json.dumps(value))


def select_stages(only: str | None = None, start: str | None = None,
                  enabled: Sequence[str] | None = None) -> list[str]:
    """``--only a,b`` and ``--from stage`` selection among the ``enabled`` stages (default: those
    that are not optional), in chain order."""
    names = list(enabled) if enabled is not None else [s.name for s in STAGES if not s.optional]
    wanted = split_names(only)
    for s in ([start] if start else []) + wanted:
        get_stage(s)
        if s not in names:
            raise ValueError(f"stage {s} is optional and not enabled in this chain: add --with {s}")
    if start:
        names = names[names.index(start):]
    if only:
        names = [n for n in names if n in wanted]
    if not names:
        raise ValueError(f"--only {only} with --from {start} selects no stage: --from keeps "
                         f"{', '.join(select_stages(start=start, enabled=enabled))}")
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
        state = chain.state(run.stage)
        rows.append(dict(stage=run.stage, chunks=run.chunks, wall_s=round(run.wall_s, 1),
                         status="skipped (done)" if run.skipped else ("finished" if state == "done" else state),
                         warnings=len(run.warnings),
                         val_acc_well=None if val is None else round(float(val), 4),
                         test_acc=None if m.get("test_accuracy") is None else round(float(m["test_accuracy"]), 4),
                         split=m.get("split", "")))
    table = pd.DataFrame(rows).set_index("stage")
    table.attrs["warnings"] = [(run.stage, w) for run in runs for w in run.warnings]
    return table


def write_index(chain: Chain, table: pd.DataFrame) -> Path:
    """OUT/index.html: the summary, the plate maps and curves, links to every executed notebook
    (index_page.py; the merge stage writes the same page into its own output from its inputs)."""
    return write_index_page(chain.out, {name: chain.stage_dir(name) for name in chain.stages}, table,
                            chain.data_dir, chain.profile)
