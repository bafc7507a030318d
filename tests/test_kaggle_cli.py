"""Tests for kernel_lib.kaggle_cli: push, status and download against tests/fake_kaggle on PATH.

The fake records every command (calls.jsonl) and plays scripted scenarios (a JSON file named by
$FAKE_KAGGLE_SCENARIO: per kernel its status sequence, the metrics.json its output holds, its log,
the lines its push prints, the GPU hours it uses; the quota left). The tests assert the exact
commands issued and the messages printed. The dry run's commands also go through the real client.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from kernel_lib import kaggle, kaggle_build, kaggle_cli, kaggle_push
from test_kaggle import FAKE_KAGGLE, USER, built, kaggle_api, stand_in_notebooks  # noqa: F401 (fixtures)

# every test drives the fake kaggle executable through subprocesses: the slow tier
pytestmark = pytest.mark.slow

METRICS = ["--file-pattern", r"^metrics\.json$", "--force"]
RESETS = "2026-05-04T00:00:00+00:00"
PAPERMILL_ERROR = ("Executing notebook\nstep 120 loss 2.1\n" + "-" * 75 + '\nException encountered at "In [7]":\n'
                   "Traceback (most recent call last):\nRuntimeError: CUDA out of memory")


@pytest.fixture
def build(built, tmp_path) -> Path:
    """A copy of the module's build: push rewrites kernel sources in it."""
    return Path(shutil.copytree(built, tmp_path / "build"))


@pytest.fixture
def fake_cli(tmp_path, monkeypatch) -> Path:
    """tests/fake_kaggle first on PATH; returns its state folder (calls.jsonl, state.json)."""
    state = tmp_path / "fake_kaggle_state"
    monkeypatch.setenv("PATH", str(FAKE_KAGGLE) + os.pathsep + os.environ["PATH"])
    monkeypatch.setenv("FAKE_KAGGLE_DIR", str(state))
    for name in ("FAKE_KAGGLE_FAIL", "FAKE_KAGGLE_RUNNING", "FAKE_KAGGLE_SUBMISSION", "FAKE_KAGGLE_SCENARIO"):
        monkeypatch.delenv(name, raising=False)
    return state


def _scenario(fake_cli: Path, monkeypatch, **data) -> None:
    fake_cli.mkdir(parents=True, exist_ok=True)
    (fake_cli / "scenario.json").write_text(json.dumps(data))
    monkeypatch.setenv("FAKE_KAGGLE_SCENARIO", str(fake_cli / "scenario.json"))


def _chunks(*metrics: tuple[bool, int], stage: str = "resnet50", **extra) -> dict:
    return {f"{USER}/rxrx1-{stage}-chunk-{i}": {"metrics": {"finished": f, "steps_done": n}, **extra}
            for i, (f, n) in enumerate(metrics, 1)}


def _calls(state: Path) -> list[list[str]]:
    path = state / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _pushed(state: Path) -> list[str]:
    return [Path(c[3]).name for c in _calls(state) if c[:2] == ["kernels", "push"]]


def _sources(build: Path, slug: str) -> list[str]:
    return json.loads((build / slug / "kernel-metadata.json").read_text())["kernel_sources"]


FIRST_CHUNKS = ["rxrx1-eda", "rxrx1-base-cnn-chunk-1", "rxrx1-resnet50-chunk-1", "rxrx1-cell-line-hepg2-chunk-1",
                "rxrx1-cell-line-huvec-chunk-1", "rxrx1-cell-line-rpe-chunk-1", "rxrx1-cell-line-u2os-chunk-1",
                "rxrx1-merge"]


# ---------------------------------------------------------------- the adaptive push


def test_push_uploads_kernel_lib_then_each_kernel_and_stops_each_stage_at_the_chunk_that_finished(build, fake_cli):
    done = kaggle_push.push(build, poll_s=0)
    calls = _calls(fake_cli)
    lib = str(build / "rxrx1-kernel-lib")
    assert calls[0] == ["datasets", "status", f"{USER}/rxrx1-kernel-lib", "--format", "json"]
    assert calls[1] == ["datasets", "create", "-p", lib, "--dir-mode", "zip"]
    first_kernel = next(i for i, c in enumerate(calls) if c[:2] == ["kernels", "push"])
    assert calls[first_kernel - 2] == calls[0]  # polled until the new dataset was ready
    assert calls[first_kernel - 1] == ["quota", "--format", "json"]  # before anything: the plan against the quota
    # every training stage finished in chunk 1 (the fake's default metrics.json): chunks 2..6 never pushed
    assert _pushed(fake_cli) == FIRST_CHUNKS and done == [f"{USER}/{s}" for s in FIRST_CHUNKS]
    fetch = [c for c in calls if c[:2] == ["kernels", "output"]]
    assert [c[2] for c in fetch] == [f"{USER}/{s}/1" for s in FIRST_CHUNKS if "chunk" in s]
    assert all(c[3] == "-p" and c[5:] == METRICS for c in fetch)
    # readers name the chunk that finished, rewritten in the build before they were pushed
    assert _sources(build, "rxrx1-cell-line-rpe-chunk-1") == [f"{USER}/rxrx1-resnet50-chunk-1"]
    # the merge reads every stage: eda and base_cnn for its index page too
    assert _sources(build, "rxrx1-merge") == [f"{USER}/{s}" for s in FIRST_CHUNKS[:7]]
    state = json.loads((fake_cli / "state.json").read_text())
    assert state["violations"] == [] and state["running_at_push"] == []  # in order, one kernel at a time


def test_a_stage_finishing_in_chunk_3_pushes_three_chunks_and_its_readers_read_chunk_3(build, fake_cli, monkeypatch,
                                                                                       capsys):
    _scenario(fake_cli, monkeypatch, kernels=_chunks((False, 100), (False, 200), (True, 300)))
    # the whole chain: the merge reads eda and base_cnn too, so they must be on Kaggle before it
    kaggle_push.push(build, poll_s=0, datasets=False)
    assert _pushed(fake_cli) == (FIRST_CHUNKS[:2] + [f"rxrx1-resnet50-chunk-{i}" for i in (1, 2, 3)]
                                 + FIRST_CHUNKS[3:])
    assert _sources(build, "rxrx1-cell-line-hepg2-chunk-1") == [f"{USER}/rxrx1-resnet50-chunk-3"]
    assert _sources(build, "rxrx1-merge")[2] == f"{USER}/rxrx1-resnet50-chunk-3"
    out = capsys.readouterr().out
    assert "resnet50: chunk 1 reached steps_done 100, training unfinished: pushing chunk 2" in out
    assert "resnet50: training finished in chunk 3 (steps_done 300)" in out
    assert f"skip {USER}/rxrx1-resnet50-chunk-4: resnet50 finished in {USER}/rxrx1-resnet50-chunk-3" in out


def test_a_chunk_without_progress_stops_the_push_with_its_log(build, fake_cli, monkeypatch):
    _scenario(fake_cli, monkeypatch, kernels=_chunks((False, 100), (False, 100), log="step 100 loss nan\nstalled"))
    with pytest.raises(kaggle_cli.KaggleError, match=r"(?s)rxrx1-resnet50-chunk-2/1 made no progress: steps_done 100, "
                                                     r"the previous chunk 100.*loss nan\n    stalled"):
        kaggle_push.push(build, poll_s=0, start="resnet50", datasets=False)
    assert _pushed(fake_cli) == ["rxrx1-resnet50-chunk-1", "rxrx1-resnet50-chunk-2"]
    assert _calls(fake_cli)[-1] == ["kernels", "logs", f"{USER}/rxrx1-resnet50-chunk-2/1"]


def test_resuming_at_a_chunk_compares_with_the_previous_chunks_metrics(build, fake_cli, monkeypatch):
    _scenario(fake_cli, monkeypatch, kernels=_chunks((False, 100), (False, 100)))
    kaggle_push.push(build, poll_s=0, wait=False, datasets=False)  # every kernel has a version
    n = len(_calls(fake_cli))
    with pytest.raises(kaggle_cli.KaggleError, match="made no progress"):
        kaggle_push.push(build, poll_s=0, start="rxrx1-resnet50-chunk-2", datasets=False)
    assert ["kernels", "output", f"{USER}/rxrx1-resnet50-chunk-1", "-p"] == _calls(fake_cli)[-2][:4]  # chunk 1's
    assert _calls(fake_cli)[n:n + 2] == [["quota", "--format", "json"], ["kernels", "status", f"{USER}/rxrx1-resnet50-chunk-1"]]


def test_a_stage_unfinished_after_its_last_chunk_says_to_build_more(stand_in_notebooks, tmp_path, fake_cli,
                                                                     monkeypatch):
    out = tmp_path / "b"
    kaggle_build.build(kaggle_build.BuildOptions(user=USER, out=out, max_chunks=2))
    _scenario(fake_cli, monkeypatch, kernels=_chunks((False, 100), (False, 200)))
    with pytest.raises(kaggle_cli.KaggleError, match="resnet50 is not finished after its last built chunk.*"
                                                     "--max-chunks.*push --from rxrx1-resnet50-chunk-3"):
        kaggle_push.push(out, poll_s=0, start="resnet50", datasets=False)


# ---------------------------------------------------------------- the GPU quota


def test_quota_exhausted_before_chunk_2_stops_cleanly_with_the_resume_command(build, fake_cli, monkeypatch, capsys):
    _scenario(fake_cli, monkeypatch, kernels=_chunks((False, 100), gpu_hours=8),
              quota={"gpu_hours_left": 12, "gpu_hours_total": 30, "refresh_at": RESETS})
    rc = kaggle.main(["push", "--build-dir", str(build), "--from", "resnet50", "--skip-datasets", "--poll", "0",
                      "--yes"])
    out = capsys.readouterr().out
    assert rc == 3 and _pushed(fake_cli) == ["rxrx1-resnet50-chunk-1"]
    assert (f"stopped before {USER}/rxrx1-resnet50-chunk-2: it may use 9.0 GPU hours and 4.0 of 30.0 are left this "
            f"week; the quota resets {RESETS}.") in out
    assert f"done in this push: {USER}/rxrx1-resnet50-chunk-1\n  resnet50 unfinished at steps_done 100" in out
    assert f"python run_all.py kaggle push --from rxrx1-resnet50-chunk-2 --build-dir {build}" in out
    assert _calls(fake_cli)[-1] == ["quota", "--format", "json"]


def test_a_push_planning_more_gpu_hours_than_are_left_asks_for_yes(build, fake_cli, monkeypatch, capsys):
    _scenario(fake_cli, monkeypatch, quota={"gpu_hours_left": 12, "refresh_at": RESETS})
    with pytest.raises(kaggle_cli.KaggleError, match=r"plans at least 45.0 GPU hours and 12.0 are left.*--yes"):
        kaggle_push.push(build, poll_s=0, start="resnet50", datasets=False)
    assert _pushed(fake_cli) == []
    assert "this push runs 5 training stage(s), at least one GPU session of up to 9.0 h each: 45.0 h" in \
        capsys.readouterr().out


# ---------------------------------------------------------------- what Kaggle refuses or reports


def test_a_refused_competition_source_is_a_push_error_even_though_the_client_exits_0(build, fake_cli, monkeypatch):
    refused = ("The following are not valid competition sources and could not be added to the kernel: "
               "['recursion-cellular-image-classification']")
    _scenario(fake_cli, monkeypatch, kernels={f"{USER}/rxrx1-eda": {"push_output": [refused]}})
    with pytest.raises(kaggle_cli.KaggleError) as e:
        kaggle_push.push(build, poll_s=0, datasets=False)
    message = str(e.value)
    assert "competition sources ['recursion-cellular-image-classification']: accept the competition's rules on " \
           "kaggle.com" in message
    assert f"Cancel the version already queued at https://www.kaggle.com/code/{USER}/rxrx1-eda" in message
    assert _pushed(fake_cli) == ["rxrx1-eda"]


def test_a_kernel_ending_in_error_prints_its_failing_cell_and_log_tail(build, fake_cli, monkeypatch):
    _scenario(fake_cli, monkeypatch, kernels={f"{USER}/rxrx1-resnet50-chunk-1": {
        "statuses": ["running", "error"], "failure": "Notebook failed", "log": PAPERMILL_ERROR}})
    with pytest.raises(kaggle_cli.KaggleError) as e:
        kaggle_push.push(build, poll_s=0, start="resnet50", datasets=False)
    message = str(e.value)
    assert f"kernel {USER}/rxrx1-resnet50-chunk-1/1 ended with status error: Notebook failed" in message
    assert "failing cell: In [7]" in message and "    RuntimeError: CUDA out of memory" in message
    assert "--from" in message
    assert _calls(fake_cli)[-1] == ["kernels", "logs", f"{USER}/rxrx1-resnet50-chunk-1/1"]


def test_failing_cell_reads_nbclients_report_too():
    log = "An error occurred while executing the following cell:\n------------------\n1 / 0\n------------------\n"
    assert kaggle_cli.failing_cell(log) == "\n1 / 0" and kaggle_cli.failing_cell("all fine") is None


# ---------------------------------------------------------------- the kernel_lib dataset


def test_a_second_push_waits_for_the_processing_version_then_versions_kernel_lib(build, fake_cli):
    kaggle_push.push(build, poll_s=0)
    state = json.loads((fake_cli / "state.json").read_text())
    state["datasets"][f"{USER}/rxrx1-kernel-lib"]["queue"] = ["pending", "pending", "ready"]
    (fake_cli / "state.json").write_text(json.dumps(state))
    n = len(_calls(fake_cli))
    kaggle_push.push(build, poll_s=0, start="merge")
    calls = _calls(fake_cli)[n:]
    status = ["datasets", "status", f"{USER}/rxrx1-kernel-lib", "--format", "json"]
    assert calls[:4] == [status, status, status, ["datasets", "version", "-p", str(build / "rxrx1-kernel-lib"), "-m",
                                                   "kernel_lib from run_all.py kaggle push", "--dir-mode", "zip"]]
    assert len([c for c in _calls(fake_cli) if c[:2] == ["datasets", "create"]]) == 1


def test_a_dataset_not_found_for_30_minutes_after_its_create_gives_up(build, fake_cli, monkeypatch):
    _scenario(fake_cli, monkeypatch, dataset_hidden=True)
    now = [0.0]

    def sleep(s):
        now[0] += 60

    with pytest.raises(kaggle_cli.KaggleError, match="still not found 30 minutes after it was created"):
        kaggle_push.push(build, poll_s=60, sleep=sleep, clock=lambda: now[0])
    assert 30 <= len([c for c in _calls(fake_cli) if c[:2] == ["datasets", "status"]]) <= 32
    assert _pushed(fake_cli) == []


# ---------------------------------------------------------------- --from, --no-wait, dry run, status, download


def test_push_from_a_stage_finds_the_chunk_that_finished_its_sources_first(build, fake_cli):
    kaggle_push.push(build, poll_s=0)
    n = len(_calls(fake_cli))
    kaggle_push.push(build, poll_s=0, start="cell_line_rpe", datasets=False)
    calls = _calls(fake_cli)[n:]
    assert calls[0] == ["quota", "--format", "json"]  # no quota scripted: "No quota information available"
    assert calls[1] == ["kernels", "status", f"{USER}/rxrx1-resnet50-chunk-1"]
    assert calls[2][:3] == ["kernels", "output", f"{USER}/rxrx1-resnet50-chunk-1"] and calls[2][5:] == METRICS
    assert ["kernels", "push", "-p", str(build / "rxrx1-cell-line-rpe-chunk-1")] in calls
    assert _pushed(fake_cli)[-3:] == ["rxrx1-cell-line-rpe-chunk-1", "rxrx1-cell-line-u2os-chunk-1", "rxrx1-merge"]
    with pytest.raises(ValueError, match="--from 'nope'"):
        kaggle_push.push(build, start="nope")


def test_push_no_wait_warns_and_pushes_everything_without_polling(build, fake_cli, capsys):
    kaggle_push.push(build, poll_s=0, wait=False, datasets=False)
    assert [c[:2] for c in _calls(fake_cli)] == [["kernels", "push"]] * len(kaggle_build.plan_kernels())
    err = capsys.readouterr().err
    assert "Kaggle runs only a few GPU sessions at a time" in err and "chunks cannot overlap" in err


def test_dry_run_prints_the_commands_in_order_and_runs_none(build, fake_cli, capsys):
    kaggle_push.push(build, dry_run=True)
    assert _calls(fake_cli) == []
    lines = capsys.readouterr().out.splitlines()
    pushes = [line for line in lines if line.startswith("kaggle kernels push")]
    assert pushes == [f"kaggle kernels push -p {build / p.slug}" for p in kaggle_build.plan_kernels()]
    i = lines.index(f"kaggle kernels push -p {build / 'rxrx1-resnet50-chunk-2'}")
    assert lines[i - 2:i] == ["kaggle quota --format json", "# stop here, printing the command that resumes, if the "
                              "GPU hours left cannot hold this kernel"]
    assert lines[i - 4] == (f"kaggle kernels output {USER}/rxrx1-resnet50-chunk-1 -p "
                            f"{build / 'metrics' / 'rxrx1-resnet50-chunk-1'} --file-pattern '^metrics\\.json$' --force")
    assert lines[i - 5] == f"# wait until `kaggle kernels status {USER}/rxrx1-resnet50-chunk-1` says complete"


def test_dry_run_commands_are_accepted_by_the_real_kaggle_cli(build, kaggle_api, capsys, monkeypatch):
    _, server = kaggle_api
    kaggle_push.push(build, dry_run=True)
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if line.startswith("kaggle ")]
    import kaggle.cli as cli  # the real client; importing it reads credentials, so only inside the fixture

    exits = []
    for argv in commands:
        monkeypatch.setattr(sys, "argv", argv)
        try:
            cli.main()
            exits.append(0)
        except SystemExit as e:  # argparse exits 2 on a bad command line, the CLI 1 on an API error
            exits.append(e.code or 0)
    assert commands[0][:3] == ["kaggle", "datasets", "status"]
    assert exits == [1] + [0] * (len(commands) - 1), capsys.readouterr()  # 1: the dataset did not exist yet
    methods = [m for m, _ in server.calls]
    assert methods.count("SaveKernel") == len(kaggle_build.plan_kernels())
    assert methods.count("GetAcceleratorQuotaStatistics") == len([p for p in kaggle_build.plan_kernels() if p.chunk])
    assert methods.index("CreateDataset") < methods.index("CreateDatasetVersion") < methods.index("SaveKernel")


def test_status_lists_every_kernel_and_download_fetches_the_submission(build, fake_cli, tmp_path, monkeypatch,
                                                                       capsys):
    with pytest.raises(kaggle_cli.KaggleError, match="rxrx1-merge"):
        kaggle_cli.download(build, tmp_path / "nothing", run=lambda args: kaggle_cli.run_kaggle(["nope"]))
    kaggle_push.push(build, poll_s=0, wait=False, datasets=False)
    rows = kaggle_cli.status(build)
    assert [r[0] for r in rows] == [f"{USER}/{p.slug}" for p in kaggle_build.plan_kernels()]
    assert {r[1] for r in rows} == {"running"}
    monkeypatch.setenv("FAKE_KAGGLE_SUBMISSION", "id_code,sirna\nHEPG2-08_1_B03,513\n")
    monkeypatch.setenv("FAKE_KAGGLE_INDEX", "<html>the chain</html>")
    capsys.readouterr()
    submission = kaggle_cli.download(build, tmp_path / "pulled")
    assert submission.read_text() == "id_code,sirna\nHEPG2-08_1_B03,513\n"
    assert (tmp_path / "pulled" / "index.html").read_text() == "<html>the chain</html>"
    assert f"index page (every stage's summary, figures, notebooks): {tmp_path / 'pulled' / 'index.html'}" in \
        capsys.readouterr().out
    submission = kaggle_cli.download(build, tmp_path / "pulled")
    assert _calls(fake_cli)[-1] == ["kernels", "output", f"{USER}/rxrx1-merge", "-p", str(tmp_path / "pulled"),
                                    "--force"]
    assert f"kaggle competitions submit recursion-cellular-image-classification -f {submission}" in \
        capsys.readouterr().out
