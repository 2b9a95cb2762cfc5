"""Faults made for real against `mods run`: kill -9, Ctrl-C to the process group, two runs
on one workspace, a moved workspace, corrupt artifacts, k larger than the data, bad input.
Each test runs the real command line (its own temporary Prefect server) on tiny models."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from pipeline_helpers import ALL, summary, tiny_config, write_pool
from process_helpers import alive, big_pool, child_pids, cli_env, mods, start_mods, wait_for, write_config
from unreadable import child_kwargs, make_unreadable

pytestmark = pytest.mark.flow
ROOT = Path(__file__).resolve().parents[2]


def computed_stages(stdout: str) -> list[str]:
    line = next(l for l in stdout.splitlines() if "stages computed this run:" in l)
    listed = line.split(":", 1)[1].strip()
    return [] if listed.startswith("none") else [s.strip() for s in listed.split(",")]


def quality_parts(workspace: Path) -> list[Path]:
    return sorted((workspace / "rowstore" / "quality").glob("*/part-*.parquet"))


def leftovers(workspace: Path) -> list[str]:
    return [str(p) for p in workspace.rglob("*") if ".tmp-" in p.name]


def test_kill_9_in_the_middle_of_quality_resumes_only_unfinished_rows(prefect_harness, tiny_llama_dir: Path,
                                                                      tmp_path: Path):
    from flows.mods_pipeline import mods_pipeline

    pool = big_pool(tmp_path / "big.jsonl")
    config = write_config(tmp_path, tiny_llama_dir, "killed", "killed", pool=pool, rows_per_shard=8)
    workspace = tmp_path / "killed"
    run = start_mods(tmp_path, "run", "--config", str(config), "--quiet")
    wait_for(lambda: len(quality_parts(workspace)) >= 3 or run.poll() is not None, 300, "quality shards")
    children = child_pids(run.pid)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    # The temporary Prefect server (its own session, so Ctrl-C does not reach it) ends with it.
    wait_for(lambda: not alive(children), 30, "the temporary server to end with its parent")
    done_rows = sum(len(pd.read_parquet(p)) for p in quality_parts(workspace))
    assert 0 < done_rows < 320, "the kill must land in the middle of quality"

    rerun = mods(tmp_path, "run", "--config", str(config), "--quiet")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    quality = summary(workspace, "quality")
    assert quality["rows_computed"] == 320 - done_rows and quality["rows_reused"] == done_rows
    # Whatever the kill left half-written (a temporary part, a temporary folder) is gone.
    assert leftovers(workspace) == []

    # The same selection as a run that was never interrupted.
    whole = tiny_config(tmp_path, tiny_llama_dir, pool=pool, workspace="whole", rows_per_shard=8)
    result = mods_pipeline(config=whole, return_state=True).result()
    assert (workspace / "artifacts" / "export").exists()
    (resumed,) = [p for p in (workspace / "artifacts" / "export").iterdir() if not p.name.startswith(".")]
    assert (resumed / "selected.jsonl").read_bytes() == Path(result["selected_jsonl"]).read_bytes()


def test_ctrl_c_to_the_process_group_exits_130_promptly_and_leaves_nothing(tiny_llama_dir: Path, tmp_path: Path):
    pool = big_pool(tmp_path / "big.jsonl")
    config = write_config(tmp_path, tiny_llama_dir, "interrupted", "ws", pool=pool, rows_per_shard=8)
    workspace = tmp_path / "ws"
    run = start_mods(tmp_path, "run", "--config", str(config), "--quiet")
    wait_for(lambda: len(quality_parts(workspace)) >= 1 or run.poll() is not None, 300, "quality shards")
    children = child_pids(run.pid)
    sent = time.time()
    os.killpg(run.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    out, err = run.communicate(timeout=120)
    took = time.time() - sent
    assert run.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "mods run: interrupted"
    assert "Traceback" not in err
    assert took < 60, f"Ctrl-C took {took:.0f} s"
    assert leftovers(workspace) == []
    wait_for(lambda: not alive(children), 30, "the temporary server to stop")


def test_two_concurrent_runs_on_one_workspace_execute_each_stage_once(tiny_llama_dir: Path, tmp_path: Path):
    config = write_config(tmp_path, tiny_llama_dir, "shared", "shared")
    # INFO: the flow's own "waiting" line (row-wise stages) is an INFO record of Prefect's logger.
    runs = [start_mods(tmp_path, "run", "--config", str(config), "--quiet", env={"PREFECT_LOGGING_LEVEL": "INFO"})
            for _ in range(2)]
    outputs = [run.communicate(timeout=900) for run in runs]
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-2000:]
    first, second = (computed_stages(out) for out, _ in outputs)
    assert sorted(first + second) == sorted(ALL), (first, second)
    assert leftovers(tmp_path / "shared") == []
    # They ran at the same time: one of them waited for the other's lock on an artifact
    # (two runs one after the other would pass the checks above too).
    logs = [p.read_text() for p in (tmp_path / "shared" / "logs").glob("run-*.log")]
    assert len(logs) == 2
    texts = [*logs, *(err for _, err in outputs)]
    waits = [line for text in texts for line in text.splitlines() if WAITED.search(line)]
    assert waits, "neither run waited for the other's lock: they did not run at the same time"


WAITED = re.compile(r"another (run is computing|process is writing) it; waiting")


def test_moved_workspace_and_corrupt_artifacts(tiny_llama_dir: Path, tmp_path: Path):
    config = write_config(tmp_path, tiny_llama_dir, "first", "W")
    first = mods(tmp_path, "run", "--config", str(config), "--quiet")
    assert first.returncode == 0, first.stderr[-2000:]

    # cp -a W W2; mv W W.x; run on W2: everything upstream is reused from W2.
    shutil.copytree(tmp_path / "W", tmp_path / "W2", symlinks=True)
    os.rename(tmp_path / "W", tmp_path / "W.x")
    moved = mods(tmp_path, "run", "--config", str(config), "--workspace", str(tmp_path / "W2"),
                 "--set", "necessity.k=2", "--quiet")
    assert moved.returncode == 0, moved.stderr[-2000:]
    assert computed_stages(moved.stdout) == ["augment_select", "final_train", "export"]

    # A truncated scores.parquet (marker intact) and a garbage marker.
    w2 = tmp_path / "W2"
    (scores,) = (w2 / "artifacts" / "quality").glob("[!.]*/scores.parquet")
    scores.write_bytes(scores.read_bytes()[:100])
    (marker,) = (w2 / "artifacts" / "seed_select").glob("[!.]*/_SUCCESS.json")
    marker.write_text("garbage")
    repaired = mods(tmp_path, "run", "--config", str(config), "--workspace", str(w2), "--set", "necessity.k=2",
                    "--quiet")
    assert repaired.returncode == 0, repaired.stderr[-2000:]
    assert {"quality", "seed_select"} <= set(computed_stages(repaired.stdout))
    assert summary(w2, "quality")["rows_computed"] == 0  # rebuilt from the row store, nothing rescored
    assert f"rebuilding {scores.parent}" in newest_log(w2) and str(marker) in newest_log(w2)
    verify = mods(tmp_path, "verify", "--workspace", str(w2), "--quiet")
    assert verify.returncode == 0, verify.stdout
    again = ["run", "--config", str(config), "--workspace", str(w2), "--set", "necessity.k=2", "--quiet"]

    # One flipped byte (same size, marker intact): a plain run checks sizes and reuses it;
    # `mods verify` and `mods run --verify` check sha256: damaged, and only that stage reruns.
    (rows,) = (w2 / "artifacts" / "high_quality").glob("[!.]*/rows.parquet")
    flipped = bytearray(rows.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    rows.write_bytes(bytes(flipped))
    plain = mods(tmp_path, *again)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert computed_stages(plain.stdout) == []
    verify = mods(tmp_path, "verify", "--workspace", str(w2), "--quiet")
    assert verify.returncode == 1, verify.stdout
    assert f"damaged  {rows.parent.relative_to(w2)}: {rows} does not match its sha256" in verify.stdout
    assert "1 damaged" in verify.stdout
    checked = mods(tmp_path, *again, "--verify")
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert computed_stages(checked.stdout) == ["high_quality"]  # same key: the later stages are still valid
    assert f"rebuilding {rows.parent}: {rows} does not match its sha256" in newest_log(w2)
    assert mods(tmp_path, "verify", "--workspace", str(w2), "--quiet").returncode == 0

    # A file nobody may read (the marker intact, sizes right): damaged for `mods verify`, and
    # a plain run rebuilds it, naming the file. Made for real: root without CAP_DAC_OVERRIDE.
    kwargs = child_kwargs()
    (embeddings,) = (w2 / "artifacts" / "embed").glob("[!.]*/embeddings.parquet")
    make_unreadable(embeddings)
    verify = mods(tmp_path, "verify", "--workspace", str(w2), "--quiet", **kwargs)
    assert verify.returncode == 1, verify.stdout + verify.stderr
    assert (f"damaged  {embeddings.parent.relative_to(w2)}: unreadable: {embeddings} (Permission denied)"
            in verify.stdout), verify.stdout
    rebuilt = mods(tmp_path, *again, **kwargs)
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert computed_stages(rebuilt.stdout) == ["embed"]  # from the row store: nothing recomputed
    assert summary(w2, "embed")["rows_computed"] == 0
    assert f"rebuilding {embeddings.parent}: unreadable: {embeddings}" in newest_log(w2)
    assert mods(tmp_path, "verify", "--workspace", str(w2), "--quiet", **kwargs).returncode == 0
    assert not [p for p in (w2 / "artifacts").rglob("*") if ".broken-" in p.name or ".tmp-" in p.name]


def newest_log(workspace: Path) -> str:
    return max((workspace / "logs").glob("run-*.log"), key=lambda p: p.stat().st_mtime).read_text()


def test_k_above_the_high_quality_rows_is_capped_and_reported(prefect_harness, tiny_llama_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    from flows.mods_pipeline import mods_pipeline
    from mods.core.stage import get_stage

    def no_model(self, params, folders):
        raise AssertionError("a model was loaded for a stage with no rows")

    # answers and necessity have no rows: neither may load its model (seed model, scorer).
    for name in ("answers", "necessity"):
        monkeypatch.setattr(type(get_stage(name)), "setup", no_model)
    warnings: list[logging.LogRecord] = []
    catcher = logging.Handler(logging.WARNING)
    catcher.emit = warnings.append  # type: ignore[method-assign]
    logging.getLogger("mods.stages").addHandler(catcher)
    config = tiny_config(tmp_path, tiny_llama_dir).model_copy(deep=True)
    config.seed_selection.k = 1000
    try:
        state = mods_pipeline(config=config, return_state=True)
    finally:
        logging.getLogger("mods.stages").removeHandler(catcher)
    assert state.is_completed(), state.message
    said = [record.getMessage() for record in warnings]
    assert any(m.startswith("seed_selection.k=1000, but only 32") for m in said), said
    assert any(m.startswith("necessity.k=3, but only 0 of the 0 answered rows") for m in said), said
    workspace = Path(config.workspace)
    seed = summary(workspace, "seed_select")
    assert seed["capped"] and seed["k_requested"] == 1000 and seed["k"] == seed["candidates"] == 32
    assert summary(workspace, "answers")["rows"] == 0  # nothing left to answer: an empty artifact
    assert summary(workspace, "augment_select")["k"] == 0
    report = Path(state.result()["report"]).read_text()
    assert "k_requested=1000" in report and "capped=True" in report


BAD_INPUTS = {
    "missing path": (["--data", "{tmp}/nope.jsonl"], "nope.jsonl"),
    "empty file": (["--data", "{tmp}/empty.jsonl"], "empty.jsonl"),
    "no usable field": (["--data", "{tmp}/foo.json"], "foo.json"),
    "empty folder": (["--data", "{tmp}/empty_dir"], "empty_dir"),
    "glob matching nothing": (["--data", "{tmp}/*.nothing"], "matches no data"),
    "workspace is a file": (["--workspace", "{tmp}/afile"], "is a file"),
    "malformed --set": (["--set", "quality.alpha=[1"], "quality.alpha"),
    "bad config file": (["--config", "{tmp}/bad.yaml"], "bad.yaml"),
    "unknown nested field": (["--set", "seed_training.epoch=1"], "seed_training.epoch"),
    "unreachable server": (["--data", "{tmp}/ok.jsonl"], "PREFECT_API_URL"),
    # Mode 000, made unreadable for real (root without CAP_DAC_OVERRIDE, see tests/unreadable.py).
    "unreadable file": (["--data", "{tmp}/locked.jsonl"], "data: {tmp}/locked.jsonl: cannot read (Permission denied)"),
    "folder with an unreadable file": (["--data", "{tmp}/locked_dir"],
                                       "data: {tmp}/locked_dir/locked.jsonl: cannot read (Permission denied)"),
    "folder with an unreadable folder": (["--data", "{tmp}/outer_dir"],
                                         "data: {tmp}/outer_dir/locked: cannot read this folder (Permission denied)"),
}
UNREADABLE = {"unreadable file", "folder with an unreadable file", "folder with an unreadable folder"}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_ends_in_one_line_and_exit_2(case: str, tmp_path: Path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "foo.json").write_text('[{"foo": 1}]')
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "bad.yaml").write_text("sample: {rows: [1\n")
    write_pool(tmp_path / "ok.jsonl")
    popen = {}
    if case in UNREADABLE:
        popen = child_kwargs()
        make_unreadable(write_pool(tmp_path / "locked.jsonl"))
        (tmp_path / "locked_dir").mkdir()
        write_pool(tmp_path / "locked_dir" / "ok.jsonl")
        make_unreadable(write_pool(tmp_path / "locked_dir" / "locked.jsonl"))
        (tmp_path / "outer_dir" / "locked").mkdir(parents=True)
        write_pool(tmp_path / "outer_dir" / "ok.jsonl")
        write_pool(tmp_path / "outer_dir" / "locked" / "inner.jsonl")
        make_unreadable(tmp_path / "outer_dir" / "locked")
    args, expected = BAD_INPUTS[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    expected = expected.replace("{tmp}", str(tmp_path))
    if "--workspace" not in args:
        args += ["--workspace", str(tmp_path / "ws")]
    extra = {"env": {**cli_env(tmp_path), "PREFECT_API_URL": "http://127.0.0.1:9/api"}} if case == "unreachable server" else {}
    if extra:
        result = subprocess.run([sys.executable, "-m", "flows.cli", "run", *args, "--quiet"], cwd=ROOT,
                                capture_output=True, text=True, timeout=600, **extra)
    else:
        result = mods(tmp_path, "run", *args, "--quiet", **popen)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[-1].startswith("mods run: ") and expected in lines[-1], lines[-5:]
    assert len(lines) <= 3, lines  # the error, and at most a note or two from the reader
    assert "dataset_dict.json" not in result.stderr  # the unreadable folder is named, not a file looked up in it
