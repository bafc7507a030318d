"""A stage's parameters: what a notebook receives, from (profile, user overrides, time budget).

`stage_params` is the one pure function that the local chain and the Kaggle build both call: the
stage's profile entry (registry.py), then its fixed parameters, then the user's overrides
(``all.NAME`` for every stage that has the name, ``STAGE.NAME`` for one), then the chunk budget.
Each stage kind is validated by its config (config.py), so a misspelt or mistyped parameter is an
error naming it before any notebook runs. `notebook_params` is the other side: what a running
notebook received.
"""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import papermill
import yaml

from .config import EdaConfig, MergeConfig, TrainConfig, check_stage_arch
from .registry import CELL_LINE, STAGE_NAMES, Stage, enabled_stages, get_stage, profile_params

CONFIGS = {"eda": EdaConfig, "train": TrainConfig, "merge": MergeConfig}
# Set by whoever runs the notebook (the chain, the Kaggle build), never by a profile or the user.
FOLDER_PARAMS = ("data_dir", "output_dir", "input_dirs")
_IPYTHON_NAMES = {"In", "Out", "exit", "quit", "get_ipython", "open"}
_LITERALS = (str, int, float, bool, list, tuple, dict, type(None))


def _literal_assignments(source: str) -> list[str] | None:
    """The names a cell assigns when it holds nothing but ``name = <literal>`` lines (and
    comments): a papermill parameters cell or the cell papermill injects. None otherwise."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    names: list[str] = []
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets)):
            return None
        try:
            ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
        names += [t.id for t in node.targets]
    return names or None


def notebook_params(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The papermill parameters of a running notebook: exactly the names assigned by its
    parameters cell and by the cell papermill injected, with their current values.

    In IPython (Jupyter, papermill, Kaggle) the names come from the kernel's input history
    (``In``): every executed cell that holds only ``name = <literal>`` assignments, which is what
    a papermill parameters cell and papermill's injected cell are. Re-running the setup cell in the
    same kernel therefore reads the same parameters, not the setup cell's own globals. Without an
    input history (a plain dict), the names are the globals holding flat literals, so call it
    right after the parameters have been defined.
    """
    history = namespace.get("In")
    if isinstance(history, list) and any(isinstance(c, str) and c.strip() for c in history):
        names: dict[str, None] = {}
        for cell in history:
            for name in (_literal_assignments(cell) or []) if isinstance(cell, str) else []:
                names[name] = None
        return {k: namespace[k] for k in names if k in namespace and not k.startswith("_")}
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and k not in _IPYTHON_NAMES and isinstance(v, _LITERALS)}


def accepted_parameters(stage: Stage) -> set[str]:
    """Names a stage accepts: the fields of its kind's config."""
    return {f.name for f in dataclasses.fields(CONFIGS[stage.kind])}


def notebook_parameters(stage: Stage) -> dict[str, Any]:
    """The parameters cell of a stage's notebook (papermill's inspect_notebook)."""
    return {name: p["default"] for name, p in papermill.inspect_notebook(str(stage.notebook_path)).items()}


def parse_value(text: str, where: str = "") -> Any:
    """A command-line value: YAML (true, [1, 2], text), plus numbers YAML 1.1 reads as text (6e-4).
    A value YAML cannot read is an error naming ``where`` (the ``-p`` item)."""
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as err:
        raise ValueError(f"{where or repr(text)}: the value {text!r} is not valid YAML "
                         f"({_yaml_problem(err)}); quote text, e.g. -p 'stage.name=\"text\"'") from None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _yaml_problem(err: Exception) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else str(problem)


def parse_overrides(items: Sequence[str], yaml_file: str | None = None) -> dict[str, dict[str, Any]]:
    """``-p stage.name=value`` (value parsed as YAML: 3e-4, true, [1, 2], text) and a YAML file of
    ``{stage: {name: value}}``; ``all.name=value`` applies to every stage that accepts the name.
    A malformed file or value is an error naming the file (line, column) or the ``-p`` item."""
    out: dict[str, dict[str, Any]] = {}
    if yaml_file:
        try:
            data = yaml.safe_load(Path(yaml_file).read_text()) or {}
        except OSError as err:
            raise ValueError(f"--params {yaml_file}: cannot read it ({err.strerror or err})") from None
        except yaml.YAMLError as err:
            raise ValueError(f"--params {yaml_file}: not valid YAML ({_yaml_problem(err)})") from None
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise ValueError(f"{yaml_file}: expected a mapping of stage -> {{parameter: value}}")
        for stage, values in data.items():
            out.setdefault(str(stage), {}).update(values)
    for item in items:
        key, sep, value = item.partition("=")
        stage, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"-p {item!r}: expected stage.name=value, e.g. resnet50.epochs=3")
        out.setdefault(stage, {})[name] = parse_value(value, f"-p {item!r}")
    for stage in out:
        if stage != "all" and stage not in STAGE_NAMES:
            raise ValueError(f"unknown stage {stage!r} in parameters; stages are {', '.join(STAGE_NAMES)}")
    return out


def stage_params(stage: Stage, profile: str, overrides: Mapping[str, Mapping[str, Any]] | None = None,
                 time_budget_s: float = 0.0, extra: Sequence[str] = ()) -> dict[str, Any]:
    """A stage's notebook parameters, without the folders (each runner sets its own).

    Order: the profile, the stage's fixed parameters, ``all.NAME`` overrides, ``STAGE.NAME``
    overrides, then ``time_budget_s`` (training stages). A merge's ``stages`` default to its
    per-cell-line upstream, its ``average_with`` to its enabled ``averaged`` upstream (``extra``: the
    chain's ``--with``; registry.enabled_stages). The result is validated by the stage's config:
    unknown names, wrong types and out-of-range values are errors naming the stage.
    """
    overrides = overrides or {}
    accepted = accepted_parameters(stage)
    params = profile_params(profile, stage)
    params.update(stage.params)
    params.update({k: v for k, v in overrides.get("all", {}).items() if k in accepted})
    for name, value in overrides.get(stage.name, {}).items():
        if name not in accepted:
            raise ValueError(f"stage {stage.name}: unknown parameter {name!r}; its parameters are {sorted(accepted)}")
        params[name] = value
    if stage.trains and time_budget_s:
        # --time-budget sets every training stage's budget; a different -p time_budget_s is a conflict
        asked = overrides.get(stage.name, {}).get("time_budget_s", overrides.get("all", {}).get("time_budget_s"))
        if asked is not None and asked != float(time_budget_s):
            raise ValueError(f"stage {stage.name}: time_budget_s={asked} conflicts with --time-budget "
                             f"{time_budget_s:g}; give one of them")
        params["time_budget_s"] = float(time_budget_s)
    if "stage" in accepted:
        params["stage"] = stage.name
    if stage.kind == "merge":
        params.setdefault("stages", [u for u in stage.upstream if u.startswith(CELL_LINE + "_")])
        enabled = enabled_stages(profile, (*extra, stage.name) if stage.optional else extra)
        params.setdefault("average_with", [u for u in stage.upstream if get_stage(u).averaged and u in enabled])
    check_params(stage, params)
    return params


def check_params(stage: Stage, params: Mapping[str, Any]) -> None:
    """Build the stage's config from ``params`` (folders aside): a bad value fails here, naming it."""
    try:
        cfg = CONFIGS[stage.kind].from_params({k: v for k, v in params.items() if k not in FOLDER_PARAMS})
        if stage.kind == "train":
            check_stage_arch(cfg)
    except (TypeError, ValueError) as err:
        raise ValueError(f"stage {stage.name}: {err}") from None


def with_stage_defaults(stage_name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """A notebook's parameters over its stage's ``full`` defaults from the registry.

    A notebook run by the chain or the Kaggle build already received every parameter; one opened
    and run by hand in Jupyter gets the real-data defaults of the stage it names.
    """
    if stage_name not in STAGE_NAMES:
        return dict(params)
    return {**stage_params(get_stage(stage_name), "full"), **params}
