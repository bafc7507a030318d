"""Tests for kernel_lib.kaggle and kaggle_build/_cli/_rehearse: the chain as Kaggle kernels, all offline.

* The real kaggle client (2.x) validates every built folder: ``KaggleApi.kernels_push`` and
  ``dataset_create_new`` run unchanged, with credentials from fake environment variables and
  ``requests.Session.send`` answered by `FakeKaggleServer`, which records the requests.
* ``tests/fake_kaggle/kaggle`` stands in for the CLI on PATH and records what ``push`` runs.
* A rehearsal runs the real notebooks of the chain in Kaggle-like sandboxes on a synthetic dataset.
"""
from __future__ import annotations

import ast
import io
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import nbformat
import pytest
import requests

from kernel_lib import kaggle, kaggle_build, kaggle_cli, kaggle_rehearse, registry
from kernel_lib.registry import STAGES

FAKE_KAGGLE = Path(__file__).resolve().parent / "fake_kaggle"
REPO = Path(__file__).resolve().parent.parent
USER = "alice"

# ---------------------------------------------------------------- fixtures: small notebooks, a build


def _notebook(params: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell("# stand-in"),
                nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("print(output_dir)")]
    return nb


_COMMON = 'data_dir = ""\noutput_dir = "out"\ninput_dirs = []\n'
_TRAIN = 'seed = 42\nnum_workers = 2\ntime_budget_s = 0.0\nresume = "auto"\n'
STAND_IN_PARAMS = {
    "01_eda.ipynb": 'stage = "eda"\n' + _COMMON + "n_sites_per_experiment = 4\n",
    "02_base_cnn.ipynb": 'stage = "base_cnn"\n' + _COMMON + _TRAIN + 'arch = "base_cnn"\n',
    "03_resnet50.ipynb": 'stage = "resnet50"\n' + _COMMON + _TRAIN + 'arch = "resnet50"\npretrained = ""\n',
    "04_cell_line.ipynb": 'stage = "cell_line_hepg2"\ncell_type = "HEPG2"\n' + _COMMON + _TRAIN
                          + 'init_from = "resnet50"\narch = "resnet50"\n',
    "05_merge.ipynb": 'stage = "merge"\n' + _COMMON + 'stages = []\nfallback_stage = "resnet50"\n',
}


def _write_stand_ins(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, params in STAND_IN_PARAMS.items():
        nbformat.write(_notebook(params), str(folder / name))
    return folder


@pytest.fixture
def stand_in_notebooks(tmp_path, monkeypatch) -> Path:
    """Small notebooks with the real ones' parameter names, in place of notebooks/."""
    folder = _write_stand_ins(tmp_path / "notebooks")
    monkeypatch.setattr(registry, "NOTEBOOK_DIR", folder)
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """One build of the real notebooks, default options (6 chunk kernels per training stage)."""
    out = tmp_path_factory.mktemp("built") / "build"
    kaggle_build.build(kaggle_build.BuildOptions(user=USER, out=out))
    return out


def _cells(folder: Path) -> list:
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    return nbformat.read(str(folder / meta["code_file"]), as_version=4).cells


def _injected(folder: Path) -> dict:
    """The values of the injected-parameters cell (plain assignments of literals)."""
    cell = next(c for c in _cells(folder) if "injected-parameters" in c.metadata.get("tags", []))
    return {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body}


# ---------------------------------------------------------------- the plan


def test_plan_chains_chunks_upstream_stages_and_the_merge():
    plans = {p.slug: p for p in kaggle_build.plan_kernels({"resnet50": 3, "cell_line_rpe": 2}, max_chunks=1)}
    assert list(plans)[:5] == ["rxrx1-eda", "rxrx1-base-cnn-chunk-1", "rxrx1-resnet50-chunk-1",
                               "rxrx1-resnet50-chunk-2", "rxrx1-resnet50-chunk-3"]
    assert plans["rxrx1-resnet50-chunk-1"].sources == ()
    assert plans["rxrx1-resnet50-chunk-3"].sources == ("rxrx1-resnet50-chunk-2",)
    assert plans["rxrx1-cell-line-hepg2-chunk-1"].sources == ("rxrx1-resnet50-chunk-3",)
    assert plans["rxrx1-cell-line-rpe-chunk-2"].sources == ("rxrx1-resnet50-chunk-3", "rxrx1-cell-line-rpe-chunk-1")
    # eda and base_cnn for the merge's index page: its output is the whole result
    assert plans["rxrx1-merge"].sources == ("rxrx1-eda", "rxrx1-base-cnn-chunk-1",
                                            "rxrx1-resnet50-chunk-3", "rxrx1-cell-line-hepg2-chunk-1",
                                            "rxrx1-cell-line-huvec-chunk-1", "rxrx1-cell-line-rpe-chunk-2",
                                            "rxrx1-cell-line-u2os-chunk-1")
    assert list(plans)[-1] == "rxrx1-merge" and len(plans) == 1 + 1 + 3 + 5 + 1
    # every source runs before the kernel that reads it
    order = list(plans)
    assert all(order.index(s) < order.index(slug) for slug, p in plans.items() for s in p.sources)


def test_optional_stages_join_the_kernel_chain_only_when_enabled():
    enabled = [registry.get_stage(n) for n in registry.enabled_stages("full", ["fold", "pseudo_label"])]
    plans = {p.slug: p for p in kaggle_build.plan_kernels({"fold_1": 2}, stages=enabled, max_chunks=1)}
    assert plans["rxrx1-fold-1-chunk-2"].sources == ("rxrx1-fold-1-chunk-1",)  # a fold is chunked like any stage
    assert {"rxrx1-fold-0-chunk-1", "rxrx1-fold-1-chunk-2", "rxrx1-fold-2-chunk-1"} <= set(plans["rxrx1-merge"].sources)
    assert plans["rxrx1-pseudo-label-chunk-1"].sources == ("rxrx1-resnet50-chunk-1", "rxrx1-merge")
    assert {"rxrx1-merge", "rxrx1-pseudo-label-chunk-1", "rxrx1-fold-2-chunk-1"} <= set(plans["rxrx1-merge-pseudo"].sources)
    assert list(plans)[-1] == "rxrx1-merge-pseudo"
    default = kaggle_build.plan_kernels(max_chunks=1)
    assert not {p.stage for p in default} & {"final_fit", "fold_0", "pseudo_label", "merge_pseudo"}
    assert "rxrx1-fold-0-chunk-1" not in next(p for p in default if p.stage == "merge").sources
    assert kaggle_build.parse_chunks(["fold=3"]) == {"fold_0": 3, "fold_1": 3, "fold_2": 3}


def test_every_training_stage_gets_max_chunks_kernels_unless_chunks_says_otherwise():
    counts = {}
    for p in kaggle_build.plan_kernels({"resnet50": 8}):
        counts[p.stage] = counts.get(p.stage, 0) + 1
    assert counts == {"eda": 1, "base_cnn": 6, "resnet50": 8, "cell_line_hepg2": 6, "cell_line_huvec": 6,
                      "cell_line_rpe": 6, "cell_line_u2os": 6, "merge": 1}
    assert len(kaggle_build.plan_kernels(max_chunks=2)) == 2 + 6 * 2
    with pytest.raises(ValueError, match="--max-chunks 0"):
        kaggle_build.plan_kernels(max_chunks=0)


def test_titles_slugify_to_the_slugs_as_the_kaggle_client_computes_them():
    from slugify import slugify  # python-slugify, what the kaggle client compares slugs with

    plans = kaggle_build.plan_kernels({"resnet50": 12, "cell_line": 2})
    assert len({p.slug for p in plans}) == len(plans)
    for p in plans:
        assert slugify(p.title) == p.slug and len(p.slug) >= 5 and len(p.title) >= 5


def test_parse_chunks_expands_cell_line_and_rejects_bad_items():
    assert kaggle_build.parse_chunks(["resnet50=4,cell_line=2"]) == {
        "resnet50": 4, "cell_line_hepg2": 2, "cell_line_huvec": 2, "cell_line_rpe": 2, "cell_line_u2os": 2}
    with pytest.raises(ValueError, match="stage eda does not train"):
        kaggle_build.parse_chunks(["eda=2"])
    with pytest.raises(ValueError, match="K >= 1"):
        kaggle_build.parse_chunks(["resnet50=0"])
    with pytest.raises(KeyError, match="unknown stage 'resnet'"):
        kaggle_build.parse_chunks(["resnet=2"])


def test_metadata_turns_internet_off_gpu_on_for_training_and_lists_sources():
    plan = next(p for p in kaggle_build.plan_kernels() if p.slug == "rxrx1-resnet50-chunk-2")
    meta = kaggle_build.kernel_metadata(plan, "bob", "03_resnet50.ipynb", ["rxrx1-kernel-lib"])
    assert meta["id"] == "bob/rxrx1-resnet50-chunk-2" and meta["enable_internet"] is False
    assert meta["enable_gpu"] is True and meta["machine_shape"] == "NvidiaTeslaT4"
    assert meta["kernel_sources"] == ["bob/rxrx1-resnet50-chunk-1"]
    assert meta["dataset_sources"] == ["bob/rxrx1-kernel-lib"]
    assert meta["competition_sources"] == ["recursion-cellular-image-classification"]
    merge = kaggle_build.kernel_metadata(kaggle_build.plan_kernels()[-1], "bob", "05_merge.ipynb", [])
    assert merge["enable_gpu"] is False and "machine_shape" not in merge


def test_chunk_budget_is_the_session_less_the_margin():
    assert kaggle_build.chunk_budget_s() == 9 * 3600 - 30 * 60  # the 9-hour GPU session
    assert kaggle_build.chunk_budget_s(3600, 600) == 3000
    with pytest.raises(ValueError, match="margin"):
        kaggle_build.chunk_budget_s(600, 600)


# ---------------------------------------------------------------- the user name


def test_user_comes_from_the_flag_then_the_environment_then_the_kaggle_config(tmp_path):
    home = tmp_path / "home"
    (home / ".kaggle").mkdir(parents=True)
    assert kaggle_build.resolve_user("carol", {"KAGGLE_USERNAME": "dave"}, home) == "carol"
    assert kaggle_build.resolve_user(None, {"KAGGLE_USERNAME": "dave"}, home) == "dave"
    with pytest.raises(ValueError, match="--user NAME"):
        kaggle_build.resolve_user(None, {}, home)
    (home / ".kaggle" / "credentials.json").write_text(json.dumps({"refresh_token": "x", "username": "erin"}))
    assert kaggle_build.resolve_user(None, {}, home) == "erin"
    (home / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "frank", "key": "k"}))
    assert kaggle_build.resolve_user(None, {}, home) == "frank"
    other = tmp_path / "cfg"
    other.mkdir()
    (other / "kaggle.json").write_text(json.dumps({"username": "gina"}))
    assert kaggle_build.resolve_user(None, {"KAGGLE_CONFIG_DIR": str(other)}, home) == "gina"
    with pytest.raises(ValueError, match="'a/b' \\(from --user\\)"):
        kaggle_build.resolve_user("a/b", {}, home)


# ---------------------------------------------------------------- build


def test_build_injects_kaggle_folders_and_the_chunk_budget(built):
    manifest, kernels = kaggle_build.read_build(built)
    assert [k.dir.name for k in kernels] == [p.slug for p in kaggle_build.plan_kernels()]
    for k in kernels:
        params = _injected(k.dir)
        stage = next(s for s in STAGES if s.name == k.stage)
        assert params.get("stage", k.stage) == k.stage  # the EDA notebook has no stage parameter
        assert (params["data_dir"], params["output_dir"], params["input_dirs"]) == ("", "/kaggle/working",
                                                                                     ["/kaggle/input"])
        if stage.trains:
            assert params["stage"] == k.stage
            assert params["time_budget_s"] == 30600.0 and params["num_workers"] == 4
        else:
            assert "time_budget_s" not in params
        assert params.get("cell_type") == stage.params.get("cell_type")
    assert _injected(built / "rxrx1-merge")["stages"] == [s.name for s in STAGES if s.name.startswith("cell_line_")]
    assert manifest["time_budget_s"] == 30600.0 and manifest["margin_s"] == 1800


def test_the_kaggle_paths_cell_follows_papermills_cell(built):
    tags = [c.metadata.get("tags", []) for c in _cells(built / "rxrx1-resnet50-chunk-2")]
    assert tags[1:4] == [["parameters"], ["injected-parameters"], ["kaggle-paths"]]


def _run_paths_cell(folder: Path, env: dict, monkeypatch, **params) -> dict:
    cell = next(c for c in _cells(folder) if "kaggle-paths" in c.metadata.get("tags", []))
    for k in ("KAGGLE_ROOT",):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    namespace = {"output_dir": "/kaggle/working", "input_dirs": ["/kaggle/input"], **params}
    exec(cell.source, namespace)
    return namespace


def test_the_kaggle_paths_cell_changes_nothing_on_kaggle_and_moves_a_sandbox(built, monkeypatch, tmp_path):
    on_kaggle = _run_paths_cell(built / "rxrx1-eda", {}, monkeypatch)
    assert (on_kaggle["output_dir"], on_kaggle["input_dirs"]) == ("/kaggle/working", ["/kaggle/input"])
    sandbox = _run_paths_cell(built / "rxrx1-eda", {"KAGGLE_ROOT": str(tmp_path)}, monkeypatch)
    assert (sandbox["output_dir"], sandbox["input_dirs"]) == (f"{tmp_path}/working", [f"{tmp_path}/input"])


def test_build_writes_the_kernel_lib_dataset_without_caches(built):
    lib = built / "rxrx1-kernel-lib"
    meta = json.loads((lib / "dataset-metadata.json").read_text())
    assert meta["id"] == f"{USER}/rxrx1-kernel-lib" and 6 <= len(meta["title"]) <= 50
    files = {p.relative_to(lib).as_posix() for p in lib.rglob("*") if p.is_file()}
    assert {"python/kernel_lib/__init__.py", "python/kernel_lib/registry.py", "python/kernel_lib/kaggle.py"} <= files
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    # the pins environment.py compares Kaggle's versions with travel inside kernel_lib (zipimport too)
    assert (lib / "python" / "kernel_lib" / "requirements.txt").read_text() == (REPO / "requirements.txt").read_text()


def test_build_attaches_a_weights_dataset_when_a_stage_loads_pretrained_weights(stand_in_notebooks, tmp_path,
                                                                                monkeypatch):
    weights = tmp_path / "resnet50-11ad3fa6.pth"
    weights.write_bytes(b"not really weights")
    out = tmp_path / "build"
    kaggle_build.build(kaggle_build.BuildOptions(user=USER, out=out, overrides={"resnet50": {"pretrained": str(weights)}}))
    slug = "rxrx1-weights-resnet50-11ad3fa6"
    assert (out / slug / weights.name).read_bytes() == b"not really weights"
    assert json.loads((out / slug / "dataset-metadata.json").read_text())["id"] == f"{USER}/{slug}"
    for chunk in (1, 2, 6):
        meta = json.loads((out / f"rxrx1-resnet50-chunk-{chunk}" / "kernel-metadata.json").read_text())
        assert meta["dataset_sources"] == [f"{USER}/rxrx1-kernel-lib", f"{USER}/{slug}"]
        assert _injected(out / f"rxrx1-resnet50-chunk-{chunk}")["pretrained"] == "/kaggle/input"
    cell_line = json.loads((out / "rxrx1-cell-line-rpe-chunk-1" / "kernel-metadata.json").read_text())
    assert cell_line["dataset_sources"] == [f"{USER}/rxrx1-kernel-lib"]
    manifest, _ = kaggle_build.read_build(out)
    assert {"dir": slug, "kind": "weights"} in manifest["datasets"]

    # the kaggle-paths cell finds the file in either mount layout, or leaves the input root
    root = tmp_path / "root"
    for mount in (root / "input" / "datasets" / USER / slug, root / "input" / slug):
        mount.mkdir(parents=True)
        (mount / weights.name).write_bytes(b"w")
        found = _run_paths_cell(out / "rxrx1-resnet50-chunk-1", {"KAGGLE_ROOT": str(root)}, monkeypatch,
                                pretrained="/kaggle/input")
        assert found["pretrained"] == str(mount / weights.name)
        (mount / weights.name).unlink()
    missing = _run_paths_cell(out / "rxrx1-resnet50-chunk-1", {"KAGGLE_ROOT": str(root)}, monkeypatch,
                              pretrained="/kaggle/input")
    assert missing["pretrained"] == f"{root}/input"


def test_build_names_a_missing_weight_file(stand_in_notebooks, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        kaggle_build.build(kaggle_build.BuildOptions(user=USER, out=tmp_path / "b",
                                         overrides={"resnet50": {"pretrained": str(tmp_path / "nowhere.pth")}}))


def test_rebuild_replaces_the_previous_build_and_refuses_a_foreign_folder(stand_in_notebooks, tmp_path):
    out = tmp_path / "build"
    kaggle_build.build(kaggle_build.BuildOptions(user=USER, out=out, chunks={"resnet50": 4}))
    assert (out / "rxrx1-resnet50-chunk-4").is_dir()
    kaggle_build.build(kaggle_build.BuildOptions(user=USER, out=out, chunks={"resnet50": 2}))
    assert not (out / "rxrx1-resnet50-chunk-3").exists() and (out / "rxrx1-resnet50-chunk-2").is_dir()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="not a previous build"):
        kaggle_build.build(kaggle_build.BuildOptions(user=USER, out=foreign))
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_build_names_the_stage_whose_notebook_is_missing(stand_in_notebooks, tmp_path):
    (stand_in_notebooks / "04_cell_line.ipynb").unlink()
    with pytest.raises(FileNotFoundError, match="stage cell_line_hepg2: notebook .*04_cell_line.ipynb not found"):
        kaggle_build.build(kaggle_build.BuildOptions(user=USER, out=tmp_path / "b"))
    assert not (tmp_path / "b").exists()  # checked before anything is written


def test_unknown_parameter_override_names_stage_and_parameter(stand_in_notebooks, tmp_path):
    with pytest.raises(ValueError, match="stage resnet50: unknown parameter 'epochz'"):
        kaggle_build.build(kaggle_build.BuildOptions(user=USER, out=tmp_path / "b", overrides={"resnet50": {"epochz": 3}}))


def test_committed_kernel_metadata_folder_is_what_the_generator_writes(tmp_path):
    written = kaggle_build.write_templates(tmp_path)
    committed = REPO / "kernel-metadata"
    expected = {p.relative_to(tmp_path).as_posix(): p.read_text() for p in written}
    actual = {p.relative_to(committed).as_posix(): p.read_text() for p in committed.rglob("*.json")}
    assert actual == expected, "run `python run_all.py kaggle metadata` and commit kernel-metadata/"


# ---------------------------------------------------------------- the real kaggle client, network stubbed


def _response(request, status: int, payload: dict) -> requests.Response:
    r = requests.Response()
    r.status_code, r.request, r.url = status, request, request.url
    r.headers["Content-Type"] = "application/json"
    r._content = json.dumps(payload).encode()
    return r


class FakeKaggleServer:
    """Answers the kaggle client's HTTP requests: a dataset exists once created, kernels complete."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []  # (API method, JSON body)
        self.uploads: dict[str, bytes] = {}  # blob name -> bytes uploaded

    def send(self, session, request, **kwargs):
        if request.url.startswith("https://upload.invalid/"):
            body = request.body.read() if hasattr(request.body, "read") else request.body
            self.uploads[request.url.rsplit("/", 1)[1]] = body
            return _response(request, 200, {})
        assert request.url.startswith("https://api.kaggle.com/v1/"), f"unexpected request to {request.url}"
        method = request.url.rsplit("/", 1)[1]
        body = json.loads(request.body) if request.body else {}
        self.calls.append((method, body))
        created = any(m == "CreateDataset" for m, _ in self.calls)
        answers = {
            "SaveKernel": (200, {"url": "https://www.kaggle.com/code/x", "versionNumber": 1}),
            "GetKernelSessionStatus": (200, {"status": "COMPLETE"}),
            "ListKernelSessionOutput": (200, {"files": [], "log": ""}),
            "GetAcceleratorQuotaStatistics": (200, {"gpuQuota": {"timeUsed": "3600s", "totalTimeAllowed": "108000s"},
                                                     "quotaRefreshTime": "2026-05-04T00:00:00Z"}),
            "GetDatasetStatus": (200, {"status": "READY"}) if created else (404, {"code": 404, "message": "Not found"}),
            "GetDataset": (200, {"currentVersionNumber": 1}),
            "CreateDatasetVersion": (200, {"ref": "x", "url": "https://www.kaggle.com/datasets/x", "status": "ok"}),
            "StartBlobUpload": (200, {"token": f"token-{body.get('name')}",
                                      "createUrl": f"https://upload.invalid/{body.get('name')}"}),
            "CreateDataset": (200, {"ref": "x", "url": "https://www.kaggle.com/datasets/x", "status": "ok"}),
        }
        if method not in answers:
            raise AssertionError(f"FakeKaggleServer: no answer for {method}")
        status, payload = answers[method]
        return _response(request, status, payload)


@pytest.fixture
def kaggle_api(tmp_path, monkeypatch):
    """(the real KaggleApi, FakeKaggleServer): credentials from fake environment variables, no
    config or token file of this machine read, every HTTP request answered by the fake server."""
    import tempfile

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", "not-a-real-key")
    for name in ("KAGGLE_API_TOKEN", "KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_CONFIG_DIR", "KAGGLE_API_ENVIRONMENT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the client's resumable-upload state
    server = FakeKaggleServer()
    monkeypatch.setattr(requests.Session, "send", lambda session, request, **kw: server.send(session, request, **kw))
    from kaggle.api.kaggle_api_extended import KaggleApi

    api = KaggleApi()
    api.config = str(tmp_path / "no-kaggle.json")
    api.authenticate()
    return api, server


def test_every_built_kernel_passes_the_kaggle_clients_push(built, kaggle_api, capsys):
    api, server = kaggle_api
    manifest, kernels = kaggle_build.read_build(built)
    for k in kernels:
        api.kernels_push(str(k.dir))
    out = capsys.readouterr().out
    assert "does not resolve" not in out and "retired" not in out
    saved = [body for method, body in server.calls if method == "SaveKernel"]
    assert [s["slug"] for s in saved] == [k.id for k in kernels]
    plans = {f"{USER}/{p.slug}": p for p in kaggle_build.plan_kernels()}
    for s in saved:
        plan = plans[s["slug"]]
        trains = next(st for st in STAGES if st.name == plan.stage).trains
        assert s["enableInternet"] is False
        assert s.get("enableGpu", False) is trains
        assert s.get("machineShape") == ("NvidiaTeslaT4" if trains else None)
        assert s["kernelDataSources"] if plan.sources else "kernelDataSources" not in s
        assert s.get("kernelDataSources", []) == [f"{USER}/{x}" for x in plan.sources]
        assert s["competitionDataSources"] == ["recursion-cellular-image-classification"]
        assert s["datasetDataSources"] == [f"{USER}/rxrx1-kernel-lib"]
        assert s["isPrivate"] is True and s["kernelType"] == "notebook" and s["language"] == "python"
        notebook = json.loads(s["text"])
        assert any("injected-parameters" in c["metadata"].get("tags", []) for c in notebook["cells"])


def test_the_kernel_lib_dataset_passes_the_kaggle_clients_create(built, kaggle_api):
    api, server = kaggle_api
    result = api.dataset_create_new(str(built / "rxrx1-kernel-lib"), dir_mode="zip", quiet=True)
    assert not result.error and result.status == "ok"
    create = next(body for method, body in server.calls if method == "CreateDataset")
    assert (create["ownerSlug"], create["slug"], create["licenseName"]) == (USER, "rxrx1-kernel-lib", "other")
    assert create["isPrivate"] is True and create["files"] == [{"token": "token-python.zip"}]
    # Kaggle unpacks python.zip into python/: kernel_lib/ must sit at the archive's top
    names = zipfile.ZipFile(io.BytesIO(server.uploads["python.zip"])).namelist()
    assert "kernel_lib/__init__.py" in names and "kernel_lib/kaggle.py" in names
    assert not [n for n in names if "__pycache__" in n]



def test_main_builds_and_reports_errors_with_an_exit_status(stand_in_notebooks, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    out = tmp_path / "b"
    assert kaggle.main(["build", "--user", "bob", "--out", str(out), "--chunks", "resnet50=2",
                        "-p", "resnet50.epochs=3", "--margin-minutes", "60"]) == 0
    params = _injected(out / "rxrx1-resnet50-chunk-2")
    assert params["epochs"] == 3 and params["time_budget_s"] == 8 * 3600
    assert not (out / "rxrx1-resnet50-chunk-3").exists()
    assert kaggle.main(["build", "--user", "b/ob", "--out", str(tmp_path / "c")]) == 1
    assert "error: Kaggle user name 'b/ob'" in capsys.readouterr().err
    assert kaggle.main(["status", "--build-dir", str(tmp_path / "none")]) == 1
    assert "kaggle build --user NAME" in capsys.readouterr().err


# ---------------------------------------------------------------- the sandbox layout


def test_mount_points_follow_both_kaggle_layouts(tmp_path):
    assert kaggle_rehearse.mount_point(tmp_path, "notebooks", "u/rxrx1-merge", "modern") == tmp_path / "notebooks/u/rxrx1-merge"
    assert kaggle_rehearse.mount_point(tmp_path, "competitions", kaggle_build.COMPETITION, "modern") == \
        tmp_path / "competitions" / kaggle_build.COMPETITION
    assert kaggle_rehearse.mount_point(tmp_path, "datasets", "u/rxrx1-kernel-lib", "historic") == tmp_path / "rxrx1-kernel-lib"
    with pytest.raises(ValueError, match="layout 'new'"):
        kaggle_rehearse.mount_point(tmp_path, "datasets", "u/x", "new")


# ---------------------------------------------------------------- rehearsals: notebooks run in Kaggle-like sandboxes

_MISBEHAVING_EDA = '''import os, urllib.request
try:
    urllib.request.urlopen("http://example.com", timeout=5)
    network = "open"
except Exception as e:
    network = f"{type(e).__name__}: {e}"
with open(os.path.join(output_dir, "seen.json"), "w") as f:
    import json
    json.dump({"network": network, "cwd": os.getcwd(), "output_dir": output_dir, "input_dirs": input_dirs,
               "inputs": sorted(os.listdir(input_dirs[0])), "pythonpath": os.environ.get("PYTHONPATH")}, f)
open(os.path.join(input_dirs[0], "scribble.txt"), "w").write("Kaggle mounts inputs read-only")
'''


@pytest.mark.slow
def test_rehearsal_sandbox_is_offline_moved_under_its_root_and_catches_writes_to_inputs(stand_in_notebooks, tmp_path,
                                                                                      small_synthetic, monkeypatch):
    nb = _notebook(STAND_IN_PARAMS["01_eda.ipynb"])
    nb.cells[-1] = nbformat.v4.new_code_cell(_MISBEHAVING_EDA)
    nbformat.write(nb, str(stand_in_notebooks / "01_eda.ipynb"))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    build = tmp_path / "build"
    kaggle_build.build(kaggle_build.BuildOptions(user=USER, out=build))
    with pytest.raises(kaggle_build.KaggleError, match=f"{USER}/rxrx1-eda wrote under .*read-only on Kaggle"):
        kaggle_rehearse.rehearse(build, small_synthetic, tmp_path / "work", stages=["eda"])
    root = tmp_path / "work" / "rxrx1-eda" / "kaggle"
    seen = json.loads((root / "working" / "seen.json").read_text())
    assert "Connection refused" in seen["network"] and seen["pythonpath"] is None  # the dead proxy answered
    assert seen["cwd"] == seen["output_dir"] == str(root / "working")
    assert seen["input_dirs"] == [str(root / "input")] and seen["inputs"] == ["competitions", "datasets"]
    assert (root / "input" / "competitions" / kaggle_build.COMPETITION / "train.csv").is_file()
    assert (root / "input" / "datasets" / USER / "rxrx1-kernel-lib" / "python" / "kernel_lib" / "registry.py").is_file()
    assert os.environ["PYTHONPATH"] == str(REPO) and "KAGGLE_ROOT" not in os.environ  # restored


def test_the_stages_find_their_inputs_in_the_historic_layout_too(tmp_path, monkeypatch, small_synthetic):
    from kernel_lib import paths

    input_dir = tmp_path / "input"
    competition = tmp_path / "competition"  # the CSVs are what marks a data folder; no PNG trees needed here
    competition.mkdir()
    for csv in small_synthetic.glob("*.csv"):
        shutil.copy2(csv, competition / csv.name)
    kaggle_rehearse._mount(competition, kaggle_rehearse.mount_point(input_dir, "competitions", kaggle_build.COMPETITION, "historic"))
    upstream = tmp_path / "resnet50-output"
    upstream.mkdir()
    (upstream / "metrics.json").write_text(json.dumps({"stage": "resnet50", "finished": True}))
    kaggle_rehearse._mount(upstream, kaggle_rehearse.mount_point(input_dir, "notebooks", f"{USER}/rxrx1-resnet50-chunk-3", "historic"))
    monkeypatch.setenv("KAGGLE_ROOT", str(tmp_path))
    assert paths.resolve_data_dir("") == input_dir / kaggle_build.COMPETITION
    assert paths.find_stage_dir("resnet50", [input_dir]) == input_dir / "rxrx1-resnet50-chunk-3"


@pytest.mark.slow  # every kernel of the chain, executed
def test_rehearsal_of_the_chain_resumes_across_chunk_kernels_and_merges_a_valid_submission(tmp_path_factory):
    """The real notebooks, built for Kaggle, run kernel after kernel in sandboxes: resnet50 in chunk
    kernels cut at 2 optimizer steps (chunk 2 resumes chunk 1's checkpoint from its mounted output
    and finishes; chunks 3..6 are skipped, as push skips them), 4 cell lines, merge, then the
    optional pseudo-label stage (on the merge kernel's pseudo_labels.csv) and merge_pseudo.
    The stages train the base CNN at 16 px: the Kaggle mechanics do not depend on the architecture,
    and it halves the test's time."""
    import pandas as pd
    import torch

    from kernel_lib import synthetic

    tmp = tmp_path_factory.mktemp("rehearsal")
    data = synthetic.ensure(tmp / "data", synthetic.SyntheticSpec(image_size=16, sirnas_per_group=4,
                                                                  train_experiments=3, positive_controls=2, seed=3),
                            progress=False)
    tiny = {"arch": "base_cnn", "epochs": 1, "batch_size": 8, "image_size": 16, "freeze_epochs": 0}
    overrides = {"all": {"num_workers": 0, "device": "cpu"}, "eda": {"n_sites_per_experiment": 1},
                 "base_cnn": {**tiny, "max_train_sites": 16},
                 "resnet50": {**tiny, "max_train_sites": 32, "chunk_steps": 2},
                 **{s.name: {**tiny, "max_train_sites": 16} for s in STAGES if s.name.startswith("cell_line_")},
                 "pseudo_label": {**tiny, "max_train_sites": 0, "pseudo_threshold": 1e-9}}
    build = tmp / "build"
    manifest = kaggle_build.build(kaggle_build.BuildOptions(user=USER, out=build, overrides=overrides,
                                                            extra=("pseudo_label",)))
    assert manifest["final_merge"] == "merge_pseudo"
    outputs = kaggle_rehearse.rehearse(build, data, tmp / "work", stages=["merge_pseudo"])
    # as push does: resnet50 stops at chunk 2, whose metrics.json says finished; its readers mount chunk 2
    # (the merge reads every stage, eda and base_cnn for its index page)
    enabled = [registry.get_stage(n) for n in registry.enabled_stages("full", ["pseudo_label"])]
    ran = [p.slug for p in kaggle_build.plan_kernels(stages=enabled) if p.chunk <= (2 if p.stage == "resnet50" else 1)]
    assert list(outputs) == [f"{USER}/{slug}" for slug in ran]
    chunks = [json.loads((outputs[f"{USER}/rxrx1-resnet50-chunk-{i}"] / "metrics.json").read_text()) for i in (1, 2)]
    assert [(m["finished"], m["steps_done"]) for m in chunks] == [(False, 2), (True, 4)]
    assert not (outputs[f"{USER}/rxrx1-resnet50-chunk-1"] / "predictions_test.npz").exists()
    mounted = tmp / "work" / "rxrx1-merge" / "kaggle" / "input" / "notebooks" / USER
    assert (mounted / "rxrx1-resnet50-chunk-2" / "model.pt").is_file()
    assert not (mounted / "rxrx1-resnet50-chunk-6").exists()

    submission = pd.read_csv(outputs[f"{USER}/rxrx1-merge"] / "submission.csv", dtype=str)
    test = pd.read_csv(data / "test.csv", dtype=str)
    train = pd.read_csv(data / "train.csv", dtype=str)
    assert list(submission.columns) == ["id_code", "sirna"]
    assert sorted(submission["id_code"]) == sorted(test["id_code"])
    assert set(submission["sirna"]) <= set(train["sirna"])
    # one final kernel, one report: the merge's output holds the index page of every stage, its links inside
    merge_out = outputs[f"{USER}/rxrx1-merge"]
    page = (merge_out / "index.html").read_text()
    found = re.findall(r"(?:href|src)='([^']+)'", page)
    assert found and all((merge_out / link).is_file() for link in found)
    assert "stages/eda/plate_map_" in page and "stages/cell_line_rpe/loss.png" in page
    assert all(f"<th>{stage.name}</th>" in page for stage in STAGES if not stage.optional)
    # pseudo-labels: every test treatment well (threshold ~0) trained, read from the merge kernel's output
    pseudo = json.loads((outputs[f"{USER}/rxrx1-pseudo-label-chunk-1"] / "metrics.json").read_text())
    n_test = len(pd.read_csv(outputs[f"{USER}/rxrx1-merge"] / "pseudo_labels.csv"))
    assert pseudo["finished"] and pseudo["pseudo_labels"]["wells"] == n_test == len(submission)
    second = json.loads((outputs[f"{USER}/rxrx1-merge-pseudo"] / "metrics.json").read_text())
    assert second["averaged"] == ["pseudo_label"] and second["finished"]
    final = pd.read_csv(outputs[f"{USER}/rxrx1-merge-pseudo"] / "submission.csv", dtype=str)
    assert sorted(final["id_code"]) == sorted(test["id_code"])
    second_page = (outputs[f"{USER}/rxrx1-merge-pseudo"] / "index.html").read_text()
    assert all(f"<th>{name}</th>" in second_page for name in ("merge", "pseudo_label", "merge_pseudo"))
    # what ran where, in every kernel's metrics.json
    for kernel, folder in outputs.items():
        env = json.loads((folder / "metrics.json").read_text())["environment"]
        if "eda" in kernel or "merge" in kernel:  # no torch imported: installed versions, devices not probed
            assert env["torch"] == torch.__version__.split("+")[0] and env["gpu_count"] is None, kernel
        else:
            assert env["torch"] == torch.__version__ and env["gpu_count"] == 0, kernel
