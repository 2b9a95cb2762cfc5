from __future__ import annotations

import json
from pathlib import Path

import pytest

from mods.core.artifacts import Artifact, ArtifactError, StageSpec, Workspace, artifact_key, fingerprint_files, is_complete, run_stage
from mods.stages import key_params

SPEC = StageSpec("demo", "1", "cpu", "test stage")


def test_key_depends_on_params_inputs_and_version():
    a = Artifact(stage="up", key="k1")
    base = artifact_key(SPEC, {"alpha": 0.0, "k": 3}, [a])
    assert artifact_key(SPEC, {"k": 3, "alpha": 0.0}, [a]) == base  # order of params does not matter
    assert artifact_key(SPEC, {"alpha": 0.5, "k": 3}, [a]) != base
    assert artifact_key(SPEC, {"alpha": 0.0, "k": 3}, [Artifact(stage="up", key="k2")]) != base
    assert artifact_key(StageSpec("demo", "2", "cpu", ""), {"alpha": 0.0, "k": 3}, [a]) != base
    assert artifact_key(StageSpec("other", "1", "cpu", ""), {"alpha": 0.0, "k": 3}, [a]) != base


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

    first = run_stage(ws, SPEC, {"k": 1}, {}, body)
    second = run_stage(ws, SPEC, {"k": 1}, {}, body)
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
        run_stage(ws, SPEC, {"k": 2}, {}, body)
    stage_dir = tmp_path / "artifacts" / "demo"
    assert [p.name for p in stage_dir.iterdir() if not p.name.endswith(".lock")] == []


def test_missing_input_artifact_is_a_clear_error(tmp_path: Path):
    ws = Workspace(tmp_path)
    ghost = Artifact(stage="embed", key="abc")
    with pytest.raises(ArtifactError, match="needs the 'embed' artifact abc"):
        run_stage(ws, SPEC, {}, {"embed": ghost}, lambda ctx: None)


def test_incomplete_leftover_is_replaced(tmp_path: Path):
    ws = Workspace(tmp_path)
    key = artifact_key(SPEC, {"k": 5}, [])
    leftover = ws.artifact_dir("demo", key)
    leftover.mkdir(parents=True)
    (leftover / "stale.txt").write_text("from a crash")
    assert not is_complete(leftover)
    outcome = run_stage(ws, SPEC, {"k": 5}, {}, lambda ctx: (ctx.out / "fresh.txt").write_text("ok") and None)
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
