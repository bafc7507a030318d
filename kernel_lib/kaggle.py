"""The chain as Kaggle kernels: built offline, pushed in order with the kaggle CLI, followed, pulled.

Kaggle runs each stage's notebook as a kernel, offline, on a GPU for training stages, inside a
12-hour session. A training stage therefore becomes K *chunk* kernels: chunk i lists chunk i-1
as a kernel source, so its output (checkpoint.pt, metrics.json, ...) is mounted under
/kaggle/input, and the notebook resumes from it (resume="auto"); a chunk that starts after
training finished copies the finished files through. A stage's downstream kernels list its last
chunk. kernel_lib reaches the kernels as a private Kaggle dataset (``<user>/rxrx1-kernel-lib``)
which the notebooks put on sys.path by glob; ImageNet weights, when a stage's ``pretrained``
parameter names some, travel as a second dataset.

``build`` writes BUILD/<kernel-slug>/ (the notebook with its parameters injected by papermill's
prepare-only mode + kernel-metadata.json), BUILD/<dataset-slug>/ (dataset-metadata.json + files)
and BUILD/chain.json (push order). ``push``, ``status`` and ``download`` only run the ``kaggle``
executable: the kaggle package is never imported here, because importing it authenticates.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from .outputs import write_json
from .stages import STAGES, Stage, get_stage

COMPETITION = "recursion-cellular-image-classification"
GPU_SHAPE = "NvidiaTeslaT4"    # today's default Kaggle GPU; NvidiaTeslaP100 is retired
SESSION_S = 12 * 3600          # Kaggle's session limit, CPU and GPU alike
MARGIN_S = 30 * 60             # session start, the notebook's input globbing, saving /kaggle/working
KAGGLE_CPUS = 4
DEFAULT_CHUNKS = {"resnet50": 3}
PREFIX = "RxRx1"
LIB_SLUG = "rxrx1-kernel-lib"
MANIFEST = "chain.json"
MANIFEST_FORMAT = 1
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
    for item in (part.strip() for entry in items for part in entry.split(",") if part.strip()):
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--chunks {item!r}: expected STAGE=K with K >= 1, e.g. resnet50=3")
        names = [s.name for s in STAGES if s.name.startswith("cell_line_")] if name == "cell_line" else [name]
        for n in names:
            if not get_stage(n).trains:
                raise ValueError(f"--chunks {item!r}: stage {n} does not train, so it runs as one kernel")
            out[n] = int(value)
    return out


def plan_kernels(chunks: Mapping[str, int] | None = None, stages: Sequence[Stage] = STAGES) -> list[KernelPlan]:
    """Every kernel in push order. Chunk i > 1 reads chunk i-1; every chunk reads the last chunk of
    each upstream stage (so init_from and the merge find their inputs whichever chunk resumes)."""
    wanted = {**DEFAULT_CHUNKS, **(chunks or {})}
    last: dict[str, str] = {}
    plans: list[KernelPlan] = []
    for stage in stages:
        upstream = tuple(last[u] for u in stage.upstream)
        n = wanted.get(stage.name, 1) if stage.trains else 1
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
                  time_budget_s: float) -> dict[str, Any]:
    """The parameters injected into a stage's notebook for Kaggle: the local chain's (profile,
    stage, user overrides, the budget for training stages), then Kaggle's folders."""
    from .chain import Chain, accepted_parameters, profile_params

    chain = Chain(data_dir=Path("."), out=Path("."), profile=profile, overrides=dict(overrides),
                  time_budget_s=time_budget_s if stage.trains else 0.0)
    params = chain.params_for(stage)
    accepted = accepted_parameters(stage)
    chosen = set(profile_params(profile, stage)) | set(overrides.get("all", {})) | set(overrides.get(stage.name, {}))
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
    import nbformat
    import papermill

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
    instead, kernel_lib/ is still a folder of its own. The notebooks' glob finds either.
    """
    shutil.copytree(LIB_DIR, folder / "python" / "kernel_lib",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.tmp"))
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
    plans = plan_kernels(opts.chunks)
    out = Path(opts.out)
    for stage in STAGES:
        if not stage.notebook_path.is_file():
            raise FileNotFoundError(f"stage {stage.name}: notebook {stage.notebook_path} not found")
    _clean_out(out)
    datasets = [{"dir": LIB_SLUG, "kind": "kernel_lib"}]
    build_lib_dataset(out / LIB_SLUG, opts.user)
    kernels = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in STAGES:
            params = kaggle_params(stage, opts.profile, overrides, budget)
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
    manifest = {"format": MANIFEST_FORMAT, "user": opts.user, "profile": opts.profile, "time_budget_s": budget,
                "datasets": datasets, "kernels": kernels}
    write_json(out / MANIFEST, manifest, indent=2)
    return manifest


def write_templates(out: Path, chunks: Mapping[str, int] | None = None, user: str = USER_PLACEHOLDER) -> list[Path]:
    """The committed kernel-metadata/ folder: each kernel's metadata (and the kernel_lib dataset's)
    as `build` writes them with the notebooks' default parameters, for user ``user``."""
    written = []
    for plan in plan_kernels(chunks):
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
        kernels.append(BuiltKernel(meta_path.parent, entry["stage"], json.loads(meta_path.read_text())))
    return manifest, kernels


# ---------------------------------------------------------------- push, status, download (the kaggle CLI)

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess]


def run_kaggle(args: Sequence[str]) -> subprocess.CompletedProcess:
    exe = shutil.which("kaggle")
    if exe is None:
        raise KaggleError("the kaggle CLI is not on PATH: pip install -r requirements.txt (kaggle 2.x), "
                          "then `kaggle auth login` or put your API token in ~/.kaggle")
    return subprocess.run([exe, *args], capture_output=True, text=True)


def _show(args: Sequence[str]) -> str:
    return "kaggle " + " ".join(shlex.quote(str(a)) for a in args)


def _checked(run: Runner, args: Sequence[str], what: str) -> str:
    """Run, echo, and fail on a non-zero exit or the error lines the CLI prints with exit status 0."""
    print(_show(args), flush=True)
    proc = run(args)
    text = (proc.stdout or "") + (proc.stderr or "")
    if text.strip():
        print("  " + text.strip().replace("\n", "\n  "), flush=True)
    bad = re.search(r"(push error|creation error|not valid kernel sources|not valid dataset sources)", text)
    if proc.returncode != 0 or bad:
        raise KaggleError(f"{what} failed ({_show(args)}): {text.strip() or f'exit status {proc.returncode}'}")
    return text


def kernel_status(run: Runner, ref: str) -> tuple[str, str]:
    """(status, failure message) of a kernel's latest version, or of ``user/slug/version``."""
    proc = run(["kernels", "status", ref])
    text = (proc.stdout or "") + (proc.stderr or "")
    match = re.search(r'has status "(?:KernelWorkerStatus\.)?([A-Za-z_]+)"', text)
    if proc.returncode != 0 or not match:
        return "unknown", text.strip()
    failure = re.search(r'Failure message: "(.*)"', text)
    return match.group(1).lower(), failure.group(1) if failure else ""


def dataset_state(run: Runner, ref: str) -> tuple[str, int] | None:
    """(status, current version) of a dataset; None when it does not exist (or is unreachable)."""
    proc = run(["datasets", "status", ref, "--format", "json"])
    if proc.returncode != 0:
        return None
    for line in reversed((proc.stdout or "").strip().splitlines()):
        if line.startswith("{"):
            data = json.loads(line)
            return str(data.get("status", "")).lower(), int(data.get("current_version_number") or 0)
    raise KaggleError(f"`{_show(['datasets', 'status', ref, '--format', 'json'])}` printed no JSON: {proc.stdout}")


_BAD_END = ("error", "cancel_requested", "cancel_acknowledged")


def wait_for_kernel(run: Runner, ref: str, poll_s: float, sleep: Callable[[float], None] = time.sleep,
                    max_unknown: int = 10) -> None:
    """Poll until the kernel (version) is complete; raise if it ends otherwise."""
    last, unknown = "", 0
    while True:
        status, message = kernel_status(run, ref)
        if status != last:
            print(f"  {ref}: {status}", flush=True)
            last = status
        if status == "complete":
            return
        if status in _BAD_END:
            raise KaggleError(f"kernel {ref} ended with status {status}" + (f": {message}" if message else "")
                              + "; see its log on kaggle.com, fix, rebuild, and resume with "
                                "`python run_all.py kaggle push --from <its slug>`")
        unknown = unknown + 1 if status == "unknown" else 0
        if unknown >= max_unknown:
            raise KaggleError(f"`kaggle kernels status {ref}` failed {unknown} times in a row: {message}")
        sleep(poll_s)


def wait_for_dataset(run: Runner, ref: str, after_version: int, poll_s: float,
                     sleep: Callable[[float], None] = time.sleep, max_polls: int = 720) -> None:
    """Poll until the dataset has a version newer than ``after_version`` and it is ready."""
    for _ in range(max_polls):
        state = dataset_state(run, ref)
        if state is not None:
            status, version = state
            if status in ("failed", "deleted"):
                raise KaggleError(f"dataset {ref} version {version} {status} on Kaggle; push it again")
            if status == "ready" and version > after_version:
                print(f"  {ref}: version {version} ready", flush=True)
                return
        sleep(poll_s)
    raise KaggleError(f"dataset {ref} was not ready after {max_polls} polls")


def push_datasets(run: Runner, build_dir: Path, manifest: dict, poll_s: float, dry_run: bool,
                  sleep: Callable[[float], None] = time.sleep) -> None:
    """kernel_lib: created the first time, a new version every push; weights: created once."""
    for ds in manifest["datasets"]:
        folder = Path(build_dir) / ds["dir"]
        ref = f"{manifest['user']}/{ds['dir']}"
        create = ["datasets", "create", "-p", str(folder), "--dir-mode", "zip"]
        version = ["datasets", "version", "-p", str(folder), "-m", "kernel_lib from run_all.py kaggle push",
                   "--dir-mode", "zip"]
        if dry_run:
            print(f"# dataset {ref}: created if `kaggle datasets status` finds none"
                  + (", else a new version" if ds["kind"] == "kernel_lib" else ", else left as it is"))
            print(_show(["datasets", "status", ref, "--format", "json"]))
            print(_show(create))
            if ds["kind"] == "kernel_lib":
                print(_show(version))
            print(f"# wait until `kaggle datasets status {ref}` says ready")
            continue
        state = dataset_state(run, ref)
        if state is None:
            _checked(run, create, f"creating dataset {ref}")
            before = 0
        elif ds["kind"] == "kernel_lib":
            before = state[1]
            _checked(run, version, f"new version of dataset {ref}")
        else:
            print(f"dataset {ref} exists (version {state[1]}): not uploaded again", flush=True)
            continue
        wait_for_dataset(run, ref, before, poll_s, sleep)


def _start_index(kernels: Sequence[BuiltKernel], start: str | None) -> int:
    """Index of the kernel ``start`` names: its slug or id, or a stage (its first kernel)."""
    if not start:
        return 0
    for i, k in enumerate(kernels):
        if start in (k.id, k.dir.name, k.stage):
            return i
    raise ValueError(f"--from {start!r}: no such kernel or stage in the build; kernels are "
                     f"{', '.join(k.dir.name for k in kernels)}")


def push(build_dir: Path, *, dry_run: bool = False, wait: bool = True, start: str | None = None,
         datasets: bool = True, poll_s: float = 60.0, run: Runner = run_kaggle,
         sleep: Callable[[float], None] = time.sleep) -> None:
    """Datasets first, then each kernel in chain order. With ``wait``, a kernel is pushed only once
    the kernel pushed before it and all its kernel sources are complete: one kernel runs at a time
    (GPU quota), and a chunk must find the previous chunk's finished output."""
    manifest, kernels = read_build(build_dir)
    first = _start_index(kernels, start)
    if datasets:
        push_datasets(run, build_dir, manifest, poll_s, dry_run, sleep)
    complete: set[str] = set()  # kernel ids seen complete in this run
    pending: tuple[str, str] | None = None  # (id, id/version) pushed last, not yet seen complete

    def settle(kernel_id: str, ref: str) -> None:
        if dry_run:
            print(f"# wait until `kaggle kernels status {ref}` says complete")
        else:
            wait_for_kernel(run, ref, poll_s, sleep)
        complete.add(kernel_id)

    for kernel in kernels[first:]:
        if wait:
            if pending:
                settle(*pending)
            for source in kernel.meta["kernel_sources"]:
                if source not in complete:
                    settle(source, source)
        args = ["kernels", "push", "-p", str(kernel.dir)]
        if dry_run:
            print(_show(args))
            pending = (kernel.id, kernel.id)
            continue
        text = _checked(run, args, f"pushing kernel {kernel.id}")
        version = re.search(r"Kernel version (\d+) successfully", text)
        pending = (kernel.id, f"{kernel.id}/{version.group(1)}" if version else kernel.id)
    if wait and pending:
        settle(*pending)


def status(build_dir: Path, run: Runner = run_kaggle) -> list[tuple[str, str]]:
    """(kernel id, status) for every kernel of the built chain, printed as a table."""
    _, kernels = read_build(build_dir)
    rows = []
    for k in kernels:
        state, message = kernel_status(run, k.id)
        rows.append((k.id, state))
        print(f"{k.id:<55} {state}" + (f"  ({message})" if message and state != "unknown" else ""), flush=True)
    return rows


def download(build_dir: Path, out: Path, stage: str = "merge", run: Runner = run_kaggle) -> Path:
    """Pull the output of ``stage``'s last kernel into ``out``; returns its submission.csv."""
    _, kernels = read_build(build_dir)
    mine = [k for k in kernels if k.stage == stage]
    if not mine:
        raise ValueError(f"stage {stage!r} has no kernel in {build_dir}; stages are "
                         f"{', '.join(dict.fromkeys(k.stage for k in kernels))}")
    Path(out).mkdir(parents=True, exist_ok=True)
    _checked(run, ["kernels", "output", mine[-1].id, "-p", str(out), "--force"], f"downloading {mine[-1].id}")
    submission = Path(out) / "submission.csv"
    if not submission.is_file():
        raise KaggleError(f"{mine[-1].id}'s output holds no submission.csv (see {out}); is the kernel complete?")
    print(f"\n{submission}\nsubmit it with:\n  " + _show(
        ["competitions", "submit", COMPETITION, "-f", str(submission), "-m", f"RxRx1 suite: {mine[-1].id}"]))
    return submission


# ---------------------------------------------------------------- offline rehearsal of a built chain

LAYOUTS = ("modern", "historic")


def mount_point(input_dir: Path, kind: str, ref: str, layout: str) -> Path:
    """Where Kaggle mounts a source. kind: competitions (ref: the competition), datasets or
    notebooks (ref: owner/slug). historic: /kaggle/input/<slug>/ for all of them."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {LAYOUTS}")
    return input_dir / ref.rsplit("/", 1)[-1] if layout == "historic" else input_dir / kind / ref


def _mount(src: Path, dst: Path) -> None:
    # Hard links: real folders (pathlib's rglob does not enter symlinked ones), no copying.
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst, copy_function=_link_or_copy,
                    ignore=shutil.ignore_patterns("dataset-metadata.json", "kernel-metadata.json"))


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


@contextlib.contextmanager
def _sandbox_env(root: Path) -> Iterator[None]:
    """The kernel's environment, restored afterwards: KAGGLE_ROOT, no repository on PYTHONPATH,
    no network (a dead proxy), no bytecode written beside the read-only inputs."""
    dead = "http://127.0.0.1:9"
    values = {"KAGGLE_ROOT": str(root), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": None, "no_proxy": None,
              "NO_PROXY": None, **{k: dead for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}}
    saved = {k: os.environ.get(k) for k in values}

    def apply(env: Mapping[str, str | None]) -> None:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    apply(values)
    try:
        yield
    finally:
        apply(saved)


def _needed(kernels: Sequence[BuiltKernel], stages: Sequence[str] | None) -> list[BuiltKernel]:
    """The kernels of ``stages`` and every kernel they read from, in chain order (all: None)."""
    if not stages:
        return list(kernels)
    for name in stages:
        get_stage(name)
    wanted = {k.id for k in kernels if k.stage in stages}
    for k in reversed(kernels):  # sources come before their readers
        if k.id in wanted:
            wanted.update(k.meta["kernel_sources"])
    return [k for k in kernels if k.id in wanted]


def rehearse(build_dir: Path, data_dir: Path, work: Path, layout: str = "modern", stages: Sequence[str] | None = None,
             log_output: bool = False) -> dict[str, Path]:
    """Run the built kernels in chain order (those of ``stages`` and their sources; all by default),
    each in a fresh Kaggle-like root under ``work``: input/ holds the competition data, its
    datasets and its kernel sources' outputs (checked unchanged afterwards), working/ is the cwd
    and becomes the kernel's output. Returns {kernel id: its output folder}."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    manifest, kernels = read_build(build_dir)
    outputs: dict[str, Path] = {}
    for kernel in _needed(kernels, stages):
        slug = kernel.id.split("/", 1)[1]
        root = Path(work) / slug / "kaggle"
        if root.exists():
            shutil.rmtree(root)
        input_dir = root / "input"
        _mount(Path(data_dir), mount_point(input_dir, "competitions", COMPETITION, layout))
        for ref in kernel.meta["dataset_sources"]:
            _mount(Path(build_dir) / ref.split("/")[1], mount_point(input_dir, "datasets", ref, layout))
        for ref in kernel.meta["kernel_sources"]:
            if ref not in outputs:
                raise ValueError(f"{kernel.id} reads {ref}, which has not run before it")
            _mount(outputs[ref], mount_point(input_dir, "notebooks", ref, layout))
        working = root / "working"
        working.mkdir()
        before = _snapshot(input_dir)
        executed = Path(work) / slug / kernel.meta["code_file"]
        print(f"[rehearse] {kernel.id}", flush=True)
        with _sandbox_env(root):
            try:
                papermill.execute_notebook(str(kernel.dir / kernel.meta["code_file"]), str(executed),
                                           kernel_name="python3", cwd=str(working), log_output=log_output,
                                           progress_bar=False)
            except PapermillExecutionError as e:
                raise KaggleError(f"{kernel.id} failed in {executed} (cell {e.exec_count}): {e.ename}: {e.evalue}") from None
        if _snapshot(input_dir) != before:
            raise KaggleError(f"{kernel.id} wrote under {input_dir}, which is read-only on Kaggle")
        outputs[kernel.id] = working
    return outputs


def folder_size(folder: Path) -> int:
    """Bytes of the files under ``folder`` (a kernel's output counts against Kaggle's 20 GB)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# ---------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    from .chain import PROFILES

    p = argparse.ArgumentParser(prog="run_all.py kaggle", description="Build and push the chain as Kaggle kernels.")
    sub = p.add_subparsers(dest="command", required=True)
    default_build = str(DEFAULT_BUILD)
    b = sub.add_parser("build", help="write push-ready kernel and dataset folders")
    b.add_argument("--user", help="Kaggle user name (default: KAGGLE_USERNAME, then ~/.kaggle/kaggle.json)")
    b.add_argument("--out", default=default_build, help="build folder (default: build/kaggle)")
    b.add_argument("--chunks", action="append", default=[], metavar="STAGE=K",
                   help="kernels per training stage, e.g. resnet50=3 or cell_line=2 (default: resnet50=3, others 1)")
    b.add_argument("--profile", default="full", choices=sorted(PROFILES), help="parameter profile (default: full)")
    b.add_argument("-p", "--param", action="append", default=[], metavar="STAGE.NAME=VALUE",
                   help="override a parameter, e.g. -p resnet50.pretrained=hub (all.NAME for every stage)")
    b.add_argument("--params", metavar="FILE.yaml", help="overrides as YAML: {stage: {name: value}}")
    b.add_argument("--session-hours", type=float, default=SESSION_S / 3600, help="Kaggle session limit (12)")
    b.add_argument("--margin-minutes", type=float, default=MARGIN_S / 60,
                   help="kept free of training in each session (30)")
    b.add_argument("--time-budget", type=float, default=0.0, metavar="SECONDS",
                   help="a chunk's time_budget_s, overriding session minus margin")
    for name, help_ in (("push", "push the datasets, then the kernels in chain order"),
                        ("status", "status of every kernel of the chain"),
                        ("download", "pull the final kernel's output (submission.csv)")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--build-dir", default=default_build, help="the build folder (default: build/kaggle)")
        if name == "push":
            s.add_argument("--dry-run", action="store_true", help="print the kaggle commands, run nothing")
            s.add_argument("--no-wait", action="store_true",
                           help="push every kernel at once (only when their sources already have complete versions)")
            s.add_argument("--from", dest="start", metavar="KERNEL", help="resume the chain at this kernel slug or stage")
            s.add_argument("--skip-datasets", action="store_true", help="do not upload kernel_lib and weights")
            s.add_argument("--poll", type=float, default=60.0, metavar="SECONDS", help="status polling interval")
        if name == "download":
            s.add_argument("--stage", default="merge", help="whose last kernel to pull (default: merge)")
            s.add_argument("--out", default="kaggle_output", help="where to put it (default: kaggle_output)")
    r = sub.add_parser("rehearse", help="run the built chain offline in Kaggle-like sandboxes")
    r.add_argument("--build-dir", default=default_build, help="the build folder (default: build/kaggle)")
    r.add_argument("--data", required=True, help="a Kaggle-layout RxRx1 folder, mounted as the competition data")
    r.add_argument("--work", default=str(REPO_ROOT / "build" / "rehearsal"), help="sandboxes (default: build/rehearsal)")
    r.add_argument("--layout", default="modern", choices=LAYOUTS, help="how inputs are mounted (default: modern)")
    r.add_argument("--only", metavar="STAGES", help="comma-separated stages to rehearse (with the kernels they read)")
    r.add_argument("--log-output", action="store_true", help="stream the notebooks' output")
    t = sub.add_parser("metadata", help="rewrite the kernel-metadata/ templates (user USERNAME)")
    t.add_argument("--out", default=str(REPO_ROOT / "kernel-metadata"))
    t.add_argument("--chunks", action="append", default=[], metavar="STAGE=K")
    return p


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    try:
        if args.command == "build":
            from .chain import parse_overrides

            opts = BuildOptions(user=resolve_user(args.user), out=Path(args.out), chunks=parse_chunks(args.chunks),
                                profile=args.profile, overrides=parse_overrides(args.param, args.params),
                                time_budget_s=args.time_budget, session_s=args.session_hours * 3600,
                                margin_s=args.margin_minutes * 60)
            manifest = build(opts)
            print(f"built {len(manifest['kernels'])} kernels and {len(manifest['datasets'])} dataset(s) in "
                  f"{opts.out} (time_budget_s {manifest['time_budget_s']:.0f} per chunk)\n"
                  f"next: python run_all.py kaggle push" +
                  ("" if Path(args.out) == DEFAULT_BUILD else f" --build-dir {args.out}"))
        elif args.command == "push":
            push(Path(args.build_dir), dry_run=args.dry_run, wait=not args.no_wait, start=args.start,
                 datasets=not args.skip_datasets, poll_s=args.poll)
        elif args.command == "status":
            status(Path(args.build_dir))
        elif args.command == "download":
            download(Path(args.build_dir), Path(args.out), stage=args.stage)
        elif args.command == "rehearse":
            only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
            outputs = rehearse(Path(args.build_dir), Path(args.data), Path(args.work), args.layout, only,
                               args.log_output)
            for ref, folder in outputs.items():
                print(f"{ref:<55} {folder_size(folder) / 1e6:9.1f} MB  {folder}")
        elif args.command == "metadata":
            for path in write_templates(Path(args.out), parse_chunks(args.chunks)):
                print(path)
    except (KaggleError, ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
