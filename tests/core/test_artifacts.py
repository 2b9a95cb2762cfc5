from __future__ import annotations

import json
from pathlib import Path

import pytest
from stage_helpers import fn_stage, run_body

from mods.core.artifacts import Artifact, ArtifactError, Workspace, fingerprint_files, is_complete
from mods.core.engine import Engine, key_params


def _writes(text: str):
    def body(ctx):
        (ctx.out / "data.txt").write_text(text)

    return body


def test_key_depends_on_params_input_content_and_version(tmp_path: Path):
    engine = Engine(tmp_path)
    a = run_body(tmp_path, "up", {"v": 1}, {}, _writes("one")).artifact
    b = run_body(tmp_path, "up", {"v": 2}, {}, _writes("two")).artifact
    same = run_body(tmp_path, "up", {"v": 3}, {}, _writes("one")).artifact  # another key, the same bytes as a

    def key(params, upstream, version="1", name="demo"):
        return engine.resolve(fn_stage(name, _writes("x"), version, ("up",)), params, {"up": upstream}).key

    base = key({"alpha": 0.0, "k": 3}, a)
    assert key({"k": 3, "alpha": 0.0}, a) == base  # order of params does not matter
    assert key({"alpha": 0.5, "k": 3}, a) != base
    assert key({"alpha": 0.0, "k": 3}, b) != base  # other input content
    assert same.key != a.key and key({"alpha": 0.0, "k": 3}, same) == base  # same content: same key (early cut-off)
    assert key({"alpha": 0.0, "k": 3}, a, version="2") != base
    assert key({"alpha": 0.0, "k": 3}, a, name="other") != base


def test_device_and_progress_do_not_change_keys():
    params = {"k": 3, "device": "cuda", "progress": True, "nested": {"device": "cpu", "lr": 1.0}}
    assert key_params(params) == {"k": 3, "nested": {"lr": 1.0}}


def test_run_stage_skips_complete_artifacts(tmp_path: Path):
    ws = Workspace(tmp_path)
    calls = []

    def body(ctx):
        calls.append(ctx.out)
        (ctx.out / "data.txt").write_text("hello")
        return {"rows": 1}

    first = run_body(ws, "demo", {"k": 1}, {}, body)
    second = run_body(ws, "demo", {"k": 1}, {}, body)
    assert first.executed and not second.executed
    assert len(calls) == 1
    assert first.artifact == second.artifact
    assert (first.artifact.dir(ws) / "data.txt").read_text() == "hello"
    marker = json.loads((first.artifact.dir(ws) / "_SUCCESS.json").read_text())
    assert marker["summary"] == {"rows": 1} and marker["key"] == first.artifact.key


def test_failed_body_leaves_no_artifact_and_no_temp(tmp_path: Path):
    ws = Workspace(tmp_path)

    def body(ctx):
        (ctx.out / "half.txt").write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_body(ws, "demo", {"k": 2}, {}, body)
    stage_dir = tmp_path / "artifacts" / "demo"
    assert [p.name for p in stage_dir.iterdir() if not p.name.endswith(".lock")] == []


def test_a_declared_output_the_body_did_not_write_fails_the_run_and_marks_nothing(tmp_path: Path):
    from mods.core.faults import MissingOutputError, PermanentStageError

    def writes_only_the_table(ctx):
        (ctx.out / "result.parquet").write_bytes(b"table")

    with pytest.raises(MissingOutputError) as caught:
        run_body(tmp_path, "demo", {"k": 1}, {}, writes_only_the_table, outputs=("result.parquet", "model/"))
    assert str(caught.value) == "demo ran but did not write model/ (its declared outputs: result.parquet, model/)"
    assert isinstance(caught.value, PermanentStageError)  # a retry would do the same
    assert [p.name for p in (tmp_path / "artifacts" / "demo").iterdir() if not p.name.endswith(".lock")] == []

    def writes_a_file_where_a_folder_is_declared(ctx):
        writes_only_the_table(ctx)
        (ctx.out / "model").write_text("not a folder")

    with pytest.raises(MissingOutputError, match="did not write model/"):
        run_body(tmp_path, "demo", {"k": 1}, {}, writes_a_file_where_a_folder_is_declared,
                 outputs=("result.parquet", "model/"))

    def writes_both(ctx):
        writes_only_the_table(ctx)
        (ctx.out / "model").mkdir()

    outcome = run_body(tmp_path, "demo", {"k": 1}, {}, writes_both, outputs=("result.parquet", "model/"))
    assert outcome.executed and (outcome.artifact.dir(Workspace(tmp_path)) / "model").is_dir()


def test_missing_input_artifact_is_a_clear_error(tmp_path: Path):
    ws = Workspace(tmp_path)
    ghost = Artifact(stage="embed", key="abc")
    with pytest.raises(ArtifactError, match="needs the 'embed' artifact abc"):
        run_body(ws, "demo", {}, {"embed": ghost}, lambda ctx: None)


def test_incomplete_leftover_is_replaced(tmp_path: Path):
    ws = Workspace(tmp_path)
    key = Engine(ws).resolve(fn_stage("demo", lambda ctx: None), {"k": 5}, {}).key
    leftover = ws.artifact_dir("demo", key)
    leftover.mkdir(parents=True)
    (leftover / "stale.txt").write_text("from a crash")
    assert not is_complete(leftover)
    outcome = run_body(ws, "demo", {"k": 5}, {}, lambda ctx: (ctx.out / "fresh.txt").write_text("ok") and None)
    assert outcome.executed
    assert not (leftover / "stale.txt").exists() and (leftover / "fresh.txt").exists()


def test_fingerprint_tracks_content_changes(tmp_path: Path):
    f = tmp_path / "a.json"
    f.write_text("[1]")
    by_stat = fingerprint_files([f])
    by_content = fingerprint_files([f], hash_content=True)
    f.write_text("[2, 3]")
    assert fingerprint_files([f]) != by_stat
    assert fingerprint_files([f], hash_content=True) != by_content
