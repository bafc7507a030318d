"""The Kaggle build: the chain's kernels planned, parameterised and written as push-ready folders.

Owns the plan (which kernels, their titles, slugs and kernel sources), kernel-metadata.json and
dataset-metadata.json, the Kaggle user name, the parameters injected into each notebook, the
`build` that writes BUILD/<kernel-slug>/ (the notebook prepared by papermill + kernel-metadata.json),
BUILD/<dataset-slug>/ and BUILD/chain.json, the committed kernel-metadata/ templates, and reading a
build back (`read_build`). Kaggle runs each stage's notebook as a kernel, offline, on a GPU for
training stages, inside one session; a training stage becomes up to N *chunk* kernels: chunk i lists
chunk i-1 as a kernel source, so its output (checkpoint.pt, metrics.json, ...) is mounted under
/kaggle/input and the notebook resumes from it. Nothing here runs the kaggle CLI (kaggle_cli.py).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import nbformat
import papermill

from .environment import REQUIREMENTS
from .outputs import write_json
from .parameters import accepted_parameters, stage_params
from .registry import PROFILES, STAGES, Stage, enabled_stages, final_merge, get_stage, group_members, split_names

COMPETITION = "recursion-cellular-image-classification"
GPU_SHAPE = "NvidiaTeslaT4"    # today's default Kaggle GPU; NvidiaTeslaP100 is retired
SESSION_S = 9 * 3600           # the GPU session this design plans for: quota messages still say 9 h
                               # (Kaggle's docs say 12 h: --session-hours 12)
MARGIN_S = 30 * 60             # session start, the notebook's input globbing, saving /kaggle/working
KAGGLE_CPUS = 4
DEFAULT_MAX_CHUNKS = 6         # chunk kernels built per training stage; push stops at the one that finishes
PREFIX = "RxRx1"
LIB_SLUG = "rxrx1-kernel-lib"
MANIFEST = "chain.json"
MANIFEST_FORMAT = 2
USER_PLACEHOLDER = "USERNAME"
LIB_DIR = Path(__file__).resolve().parent
REPO_ROOT = LIB_DIR.parent
DEFAULT_BUILD = REPO_ROOT / "build" / "kaggle"
# What a stage sees on Kaggle: data_dir "" = found under /kaggle/input; upstream kernels' outputs
# and datasets are mounted under /kaggle/input; only /kaggle/working is saved.
KAGGLE_PATHS = {"data_dir": "", "output_dir": "/kaggle/working", "input_dirs": ["/kaggle/input"]}
KAGGLE_DEFAULTS = {"num_workers": KAGGLE_CPUS}  # unless a profile or the user sets them


class KaggleError(RuntimeError):
    """A kaggle CLI call failed or a kernel of the chain ended badly; the message says what to do."""


# ---------------------------------------------------------------- the plan: kernels and their sources

def slugify(title: str) -> str:
    """Kaggle's slug of a title made of letters, digits and spaces (python-slugify agrees)."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


@dataclass(frozen=True)
class KernelPlan:
    """One Kaggle kernel: a stage, or one chunk (1-based) of a training stage."""

    stage: str
    chunk: int  # 0 for a stage that does not train
    sources: tuple[str, ...]  # slugs of the kernels whose outputs it reads

    @property
    def title(self) -> str:
        return f"{PREFIX} {self.stage.replace('_', ' ')}" + (f" chunk {self.chunk}" if self.chunk else "")

    @property
    def slug(self) -> str:
        return slugify(self.title)


def parse_chunks(items: Sequence[str]) -> dict[str, int]:
    """``resnet50=3``, ``cell_line=2`` (every cell_line_* stage) or comma-separated lists of them."""
    out: dict[str, int] = {}
    for item in (part for entry in items for part in split_names(entry)):
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--chunks {item!r}: expected STAGE=K with K >= 1, e.g. resnet50=3")
        names = group_members(name) or [name]  # a group (cell_line, fold): each of its stages
        for n in names:
            if not get_stage(n).trains:
                raise ValueError(f"--chunks {item!r}: stage {n} does not train, so it runs as one kernel")
            out[n] = int(value)
    return out


def plan_kernels(chunks: Mapping[str, int] | None = None, stages: Sequence[Stage] | None = None,
                 max_chunks: int = DEFAULT_MAX_CHUNKS) -> list[KernelPlan]:
    """Every kernel in push order: ``max_chunks`` chunk kernels per training stage unless ``chunks``
    names another number. Chunk i > 1 reads chunk i-1; every chunk reads the last chunk of each
    upstream stage in ``stages`` (default: the stages that are not optional), which `push` rewrites
    to the chunk that actually finished."""
    if stages is None:
        stages = [s for s in STAGES if not s.optional]
    if max_chunks < 1:
        raise ValueError(f"--max-chunks {max_chunks}: need at least 1")
    wanted = chunks or {}
    last: dict[str, str] = {}
    plans: list[KernelPlan] = []
    for stage in stages:
        upstream = tuple(last[u] for u in stage.upstream if u in last)
        n = wanted.get(stage.name, max_chunks) if stage.trains else 1
        previous: tuple[str, ...] = ()
        for i in range(1, n + 1):
            plan = KernelPlan(stage.name, i if stage.trains else 0, upstream + previous)
            plans.append(plan)
            previous = (plan.slug,)
        last[stage.name] = previous[0]
    return plans


def kernel_metadata(plan: KernelPlan, user: str, code_file: str, datasets: Sequence[str]) -> dict[str, Any]:
    """kernel-metadata.json as the kaggle CLI reads it; ``datasets`` are dataset slugs of ``user``."""
    trains = get_stage(plan.stage).trains
    meta: dict[str, Any] = {
        "id": f"{user}/{plan.slug}", "title": plan.title, "code_file": code_file,
        "language": "python", "kernel_type": "notebook", "is_private": True,
        "enable_gpu": trains, "enable_tpu": False,
        "enable_internet": False,  # the CLI turns it on when the key is absent
        "dataset_sources": [f"{user}/{d}" for d in datasets],
        "competition_sources": [COMPETITION],
        "kernel_sources": [f"{user}/{s}" for s in plan.sources],
        "model_sources": [],
    }
    if trains:
        meta["machine_shape"] = GPU_SHAPE
    return meta


def dataset_metadata(user: str, slug: str, title: str, description: str) -> dict[str, Any]:
    """dataset-metadata.json for ``kaggle datasets create|version`` (a private dataset)."""
    return {"title": title, "id": f"{user}/{slug}", "licenses": [{"name": "other"}], "description": description}


def lib_metadata(user: str) -> dict[str, Any]:
    return dataset_metadata(user, LIB_SLUG, f"{PREFIX} kernel lib",
                            "kernel_lib of the RxRx1 notebook suite, pushed by `python run_all.py kaggle push`; "
                            "the notebooks add its folder to sys.path.")


# ---------------------------------------------------------------- who: the Kaggle user name

_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def _config_files(env: Mapping[str, str], home: Path) -> list[Path]:
    dirs = [Path(env["KAGGLE_CONFIG_DIR"])] if env.get("KAGGLE_CONFIG_DIR") else []
    dirs += [home / ".kaggle", Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "kaggle"]
    return [d / name for d in dirs for name in ("kaggle.json", "credentials.json")]


def resolve_user(flag: str | None, env: Mapping[str, str] = os.environ, home: Path | None = None) -> str:
    """--user, else KAGGLE_USERNAME, else "username" in the kaggle config (kaggle.json, or the
    credentials.json that ``kaggle auth login`` writes)."""
    home = Path.home() if home is None else home
    user, source = flag, "--user"
    if not user and env.get("KAGGLE_USERNAME"):
        user, source = env["KAGGLE_USERNAME"], "KAGGLE_USERNAME"
    if not user:
        for path in _config_files(env, home):
            try:
                user = json.loads(path.read_text()).get("username") if path.is_file() else None
            except (ValueError, OSError):
                user = None
            if user:
                source = str(path)
                break
    if not user:
        raise ValueError("no Kaggle user name: pass --user NAME, set KAGGLE_USERNAME, or put "
                         "{\"username\": ...} in ~/.kaggle/kaggle.json (kaggle auth login writes it)")
    if not _USER_RE.match(user):
        raise ValueError(f"Kaggle user name {user!r} (from {source}) is not a valid user name")
    return user


# ---------------------------------------------------------------- what: parameters for Kaggle

def chunk_budget_s(session_s: float = SESSION_S, margin_s: float = MARGIN_S) -> float:
    """A chunk's time_budget_s: the session limit less the margin the notebook does not measure."""
    if session_s <= 0 or margin_s < 0 or margin_s >= session_s:
        raise ValueError(f"session_s={session_s} and margin_s={margin_s}: need 0 <= margin < session")
    return float(session_s - margin_s)


def kaggle_params(stage: Stage, profile: str, overrides: Mapping[str, Mapping[str, Any]],
                  time_budget_s: float, extra: Sequence[str] = ()) -> dict[str, Any]:
    """The parameters injected into a stage's notebook for Kaggle: the local chain's
    (parameters.stage_params: profile, stage, user overrides, the budget for training stages),
    Kaggle's defaults where neither a non-full profile nor the user chose, then Kaggle's folders."""
    params = stage_params(stage, profile, overrides, time_budget_s if stage.trains else 0.0, extra)
    accepted = accepted_parameters(stage)
    chosen = (set(PROFILES.get(profile, {}).get(stage.profile_key, {})) if profile != "full" else set()) \
        | set(overrides.get("all", {})) | set(overrides.get(stage.name, {}))
    for name, value in KAGGLE_DEFAULTS.items():
        if name in accepted and name not in chosen:
            params[name] = value
    params.update(KAGGLE_PATHS)  # every notebook has them (the local chain sets them too)
    return params


@dataclass(frozen=True)
class Weights:
    """A pretrained weight file a stage loads, and the dataset that carries it to Kaggle."""

    file: Path

    @property
    def slug(self) -> str:
        return slugify(f"{PREFIX} weights {self.file.stem}")[:50]

    @property
    def title(self) -> str:
        return f"{PREFIX} weights {self.file.stem}"[:50]


def stage_weights(params: Mapping[str, Any]) -> Weights | None:
    """The local weight file named by a stage's ``pretrained`` parameter ("hub", a file or a folder)."""
    if not params.get("pretrained"):
        return None
    # models imports torch, which building kernel folders needs only when a stage names weights
    from .models import resolve_pretrained_path

    return Weights(resolve_pretrained_path(str(params.get("arch", "resnet50")), str(params["pretrained"])))


def kaggle_cell(weights: Weights | None) -> str:
    """The cell inserted after papermill's: Kaggle folders under $KAGGLE_ROOT (default /kaggle,
    where it changes nothing; `rehearse` moves it), and the weight file wherever Kaggle mounted
    its dataset (/kaggle/input/<slug>/ or /kaggle/input/datasets/<owner>/<slug>/)."""
    lines = ["# Inserted by `python run_all.py kaggle build`. On Kaggle /kaggle stays /kaggle; an offline",
             "# rehearsal sets KAGGLE_ROOT to a sandbox laid out the same way.",
             "import glob as _glob, os as _os",
             "_root = _os.environ.get('KAGGLE_ROOT', '/kaggle')"]
    lines += ["_moved = lambda p: _root + p[len('/kaggle'):] if p == '/kaggle' or p.startswith('/kaggle/') else p",
              "output_dir = _moved(output_dir)",
              "input_dirs = [_moved(d) for d in input_dirs]"]
    if weights is not None:
        name, slug = weights.file.name, weights.slug
        lines += [f"_weights = sorted(_glob.glob(_root + '/input/{slug}/**/{name}', recursive=True)",
                  f"                  + _glob.glob(_root + '/input/datasets/*/{slug}/**/{name}', recursive=True))",
                  "# none found: keep the input root, and the model's loader says what is missing",
                  "pretrained = _weights[0] if _weights else _root + '/input'"]
    return "\n".join(lines) + "\n"


def prepare_notebook(source: Path, target: Path, params: Mapping[str, Any], extra_cell: str) -> None:
    """papermill prepare-only (parameters injected, nothing run), then ``extra_cell`` after them."""
    papermill.execute_notebook(str(source), str(target), parameters=dict(params), prepare_only=True,
                               kernel_name="python3", progress_bar=False, log_output=False)
    nb = nbformat.read(str(target), as_version=4)
    injected = [i for i, c in enumerate(nb.cells) if "injected-parameters" in c.metadata.get("tags", [])]
    if not injected:
        raise ValueError(f"{source}: papermill injected no parameters; does it have a cell tagged 'parameters'?")
    cell = nbformat.v4.new_code_cell(extra_cell, metadata={"tags": ["kaggle-paths"]})
    nb.cells.insert(injected[0] + 1, cell)
    for key in ("input_path", "output_path"):  # local paths mean nothing on Kaggle
        nb.metadata.get("papermill", {}).pop(key, None)
    nbformat.write(nb, str(target))


# ---------------------------------------------------------------- build

@dataclass(frozen=True)
class BuildOptions:
    user: str
    out: Path = DEFAULT_BUILD
    chunks: Mapping[str, int] | None = None
    profile: str = "full"
    overrides: Mapping[str, Mapping[str, Any]] | None = None
    time_budget_s: float = 0.0  # 0 = chunk_budget_s(session_s, margin_s)
    session_s: float = SESSION_S
    margin_s: float = MARGIN_S
    max_chunks: int = DEFAULT_MAX_CHUNKS
    extra: tuple[str, ...] = ()  # optional stages or groups (--with; registry.enabled_stages)


def _load_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete the build folder and build again") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} was written by another version of `kaggle build`; delete the build folder "
                         "and build again")
    return manifest


def _clean_out(out: Path) -> None:
    """Remove a previous build (the folders its chain.json lists); refuse a foreign folder."""
    manifest = out / MANIFEST
    if manifest.is_file():
        old = _load_manifest(manifest)
        for entry in [*old["kernels"], *old["datasets"]]:
            if (out / entry["dir"]).is_dir() and Path(entry["dir"]).name == entry["dir"]:
                shutil.rmtree(out / entry["dir"])
        manifest.unlink()
    elif out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no {MANIFEST}: not a previous build; choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def build_lib_dataset(folder: Path, user: str) -> None:
    """kernel_lib's sources (no caches) in folder/python/kernel_lib/, with dataset-metadata.json.

    The CLI uploads a subfolder only as an archive (``--dir-mode zip``: python.zip holding
    kernel_lib/...), which Kaggle unpacks into python/; should it unpack into the dataset's root
    instead, kernel_lib/ is still a folder of its own. The notebooks' glob finds either, and
    falls back to importing from python.zip should Kaggle leave the archive packed.
    requirements.txt travels inside kernel_lib/: the pins environment.py compares Kaggle's
    versions with.
    """
    shutil.copytree(LIB_DIR, folder / "python" / "kernel_lib",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.tmp"))
    shutil.copy2(REPO_ROOT / REQUIREMENTS, folder / "python" / "kernel_lib" / REQUIREMENTS)
    write_json(folder / "dataset-metadata.json", lib_metadata(user), indent=2)


def build_weights_dataset(folder: Path, user: str, weights: Weights) -> None:
    """The weight file (hard-linked when possible: about 100 MB) with dataset-metadata.json."""
    folder.mkdir()
    _link_or_copy(str(weights.file), str(folder / weights.file.name))
    write_json(folder / "dataset-metadata.json", dataset_metadata(
        user, weights.slug, weights.title, f"{weights.file.name}: torchvision's ImageNet weights (BSD-3-Clause "
        "code, ImageNet terms of use), for offline RxRx1 kernels."), indent=2)


@contextlib.contextmanager
def _quiet_papermill() -> Iterator[None]:
    # papermill warns of every parameter its parser misses ("Passed unknown parameter"), though
    # training notebooks accept every TrainConfig field; chain.params_for has checked the names.
    logger = logging.getLogger("papermill")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def build(opts: BuildOptions) -> dict[str, Any]:
    """Write every kernel folder, the datasets and chain.json; returns the manifest."""
    with _quiet_papermill():
        return _build(opts)


def _build(opts: BuildOptions) -> dict[str, Any]:
    budget = opts.time_budget_s or chunk_budget_s(opts.session_s, opts.margin_s)
    overrides = opts.overrides or {}
    stages = [get_stage(n) for n in enabled_stages(opts.profile, opts.extra)]
    plans = plan_kernels(opts.chunks, stages, max_chunks=opts.max_chunks)
    out = Path(opts.out)
    for stage in stages:
        if not stage.notebook_path.is_file():
            raise FileNotFoundError(f"stage {stage.name}: notebook {stage.notebook_path} not found")
    _clean_out(out)
    datasets = [{"dir": LIB_SLUG, "kind": "kernel_lib"}]
    build_lib_dataset(out / LIB_SLUG, opts.user)
    kernels = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in stages:
            params = kaggle_params(stage, opts.profile, overrides, budget, opts.extra)
            weights = stage_weights(params)
            stage_datasets = [LIB_SLUG]
            if weights is not None:
                params["pretrained"] = "/kaggle/input"  # the inserted cell finds the file
                stage_datasets.append(weights.slug)
                if not (out / weights.slug).is_dir():
                    build_weights_dataset(out / weights.slug, opts.user, weights)
                    datasets.append({"dir": weights.slug, "kind": "weights"})
            notebook = Path(tmp) / stage.notebook_path.name
            prepare_notebook(stage.notebook_path, notebook, params, kaggle_cell(weights))
            for plan in (p for p in plans if p.stage == stage.name):
                folder = out / plan.slug
                folder.mkdir()
                shutil.copy2(notebook, folder / notebook.name)
                write_json(folder / "kernel-metadata.json",
                            kernel_metadata(plan, opts.user, notebook.name, stage_datasets), indent=2)
                kernels.append({"dir": plan.slug, "stage": plan.stage, "chunk": plan.chunk})
    manifest = {"format": MANIFEST_FORMAT, "user": opts.user, "profile": opts.profile, "extra": list(opts.extra),
                "final_merge": final_merge([s.name for s in stages]), "time_budget_s": budget,
                "margin_s": opts.margin_s, "datasets": datasets, "kernels": kernels}
    write_json(out / MANIFEST, manifest, indent=2)
    return manifest


def write_templates(out: Path, chunks: Mapping[str, int] | None = None, user: str = USER_PLACEHOLDER,
                    max_chunks: int = DEFAULT_MAX_CHUNKS) -> list[Path]:
    """The committed kernel-metadata/ folder: each kernel's metadata (and the kernel_lib dataset's)
    as `build` writes them with the notebooks' default parameters, for user ``user``."""
    written = []
    for plan in plan_kernels(chunks, max_chunks=max_chunks):
        folder = out / plan.slug
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "kernel-metadata.json",
                    kernel_metadata(plan, user, get_stage(plan.stage).notebook, [LIB_SLUG]), indent=2)
        written.append(folder / "kernel-metadata.json")
    (out / LIB_SLUG).mkdir(parents=True, exist_ok=True)
    write_json(out / LIB_SLUG / "dataset-metadata.json", lib_metadata(user), indent=2)
    written.append(out / LIB_SLUG / "dataset-metadata.json")
    return written


# ---------------------------------------------------------------- the built chain, read back

@dataclass(frozen=True)
class BuiltKernel:
    dir: Path
    stage: str
    meta: dict  # its kernel-metadata.json
    chunk: int = 0  # 1-based for a training stage's chunk kernels

    @property
    def id(self) -> str:
        return self.meta["id"]


def read_build(build_dir: Path) -> tuple[dict, list[BuiltKernel]]:
    """chain.json and each kernel's metadata, in push order."""
    manifest_path = Path(build_dir) / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: run `python run_all.py kaggle build --user NAME` first")
    manifest = _load_manifest(manifest_path)
    kernels = []
    for entry in manifest["kernels"]:
        meta_path = Path(build_dir) / entry["dir"] / "kernel-metadata.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: the build in {build_dir} is incomplete; rebuild it")
        kernels.append(BuiltKernel(meta_path.parent, entry["stage"], json.loads(meta_path.read_text()),
                                   entry["chunk"]))
    return manifest, kernels


def resolve_source(ref: str, kernels: Mapping[str, BuiltKernel], finished: Mapping[str, str]) -> str:
    """A kernel source as it must be pushed: a chunk of a stage whose training finished becomes the
    chunk that finished (``finished``: stage -> kernel id); anything else stays as built."""
    source = kernels.get(ref)
    return finished.get(source.stage, ref) if source is not None and source.chunk else ref

