"""Artifacts that cannot be corrupted, raced or half-written (no Prefect; real processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mods.artifacts import (
    MARKER,
    Artifact,
    ArtifactError,
    StageSpec,
    Workspace,
    artifact_problem,
    read_marker,
    run_stage,
)

SPEC = StageSpec("demo", "1", "cpu", "a test stage")


def write_files(ctx) -> dict:
    (ctx.out / "data.txt").write_text("x" * 1000)
    (ctx.out / "sub").mkdir()
    (ctx.out / "sub" / "more.bin").write_bytes(b"\0" * 10)
    return {"rows": 1}


def test_marker_records_every_file_with_size_and_sha256(tmp_path: Path):
    outcome = run_stage(Workspace(tmp_path), SPEC, {"a": 1}, {}, write_files)
    folder = outcome.artifact.dir(tmp_path)
    marker = read_marker(folder)
    assert set(marker["files"]) == {"data.txt", "sub/more.bin"}
    assert marker["files"]["data.txt"]["size"] == 1000 and len(marker["files"]["data.txt"]["sha256"]) == 64
    assert artifact_problem(folder, verify_hashes=True) is None
    # The artifact names no absolute path: (stage, key) is all there is.
    assert outcome.artifact.model_dump() == {"stage": "demo", "key": folder.name}


def test_truncated_file_is_rebuilt_and_a_flipped_byte_is_caught_by_verify(tmp_path: Path):
    ws = Workspace(tmp_path)
    first = run_stage(ws, SPEC, {"a": 1}, {}, write_files)
    data = first.artifact.dir(ws) / "data.txt"
    data.write_text("x" * 10)  # truncated, marker intact
    assert "has 10 bytes" in artifact_problem(data.parent)
    again = run_stage(ws, SPEC, {"a": 1}, {}, write_files)
    assert again.executed and data.read_text() == "x" * 1000

    data.write_text("y" * 1000)  # same size, other bytes: only the hash sees it
    assert artifact_problem(data.parent) is None
    assert "sha256" in artifact_problem(data.parent, verify_hashes=True)
    assert not run_stage(ws, SPEC, {"a": 1}, {}, write_files).executed
    assert run_stage(ws, SPEC, {"a": 1}, {}, write_files, verify_hashes=True).executed
    assert data.read_text() == "x" * 1000


def test_garbage_marker_is_named_and_rebuilt(tmp_path: Path):
    ws = Workspace(tmp_path)
    folder = run_stage(ws, SPEC, {"a": 1}, {}, write_files).artifact.dir(ws)
    (folder / MARKER).write_bytes(b"\x00garbage{")
    problem = artifact_problem(folder)
    assert str(folder / MARKER) in problem and "unreadable" in problem
    assert run_stage(ws, SPEC, {"a": 1}, {}, write_files).executed
    assert artifact_problem(folder) is None


def test_damaged_input_stops_the_next_stage_with_one_line(tmp_path: Path):
    ws = Workspace(tmp_path)
    upstream = run_stage(ws, SPEC, {"a": 1}, {}, write_files).artifact
    (upstream.dir(ws) / "data.txt").unlink()
    with pytest.raises(ArtifactError, match="data.txt is missing"):
        run_stage(ws, StageSpec("next", "1", "cpu", ""), {}, {"demo": upstream}, write_files)


def test_stale_temporary_folders_of_dead_writers_are_removed(tmp_path: Path):
    ws = Workspace(tmp_path)
    first = run_stage(ws, SPEC, {"a": 2}, {}, write_files)
    key = first.artifact.key
    # What a kill -9 during a save leaves: a temporary folder with a partial model.
    import shutil

    shutil.rmtree(first.artifact.dir(ws))
    stale = ws.artifact_dir("demo", key).parent / f".{key}.tmp-otherhost-999999-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert run_stage(ws, SPEC, {"a": 2}, {}, write_files).executed
    assert not stale.exists()


def test_a_moved_workspace_still_serves_its_artifacts(tmp_path: Path):
    ws = Workspace(tmp_path / "a")
    artifact = run_stage(ws, SPEC, {"a": 1}, {}, write_files).artifact
    os.rename(tmp_path / "a", tmp_path / "b")
    moved = Workspace(tmp_path / "b")
    assert artifact_problem(artifact.dir(moved)) is None
    assert not run_stage(moved, SPEC, {"a": 1}, {}, write_files).executed


RACER = textwrap.dedent("""
    import sys, time, json
    from pathlib import Path
    from mods.artifacts import StageSpec, Workspace, run_stage
    ws, go = Workspace(sys.argv[1]), float(sys.argv[2])
    def body(ctx):
        for i in range(20):
            (ctx.out / f"f{i}.txt").write_text(str(i) * 5000)
            time.sleep(0.02)
        return {}
    while time.time() < go:
        time.sleep(0.005)
    outcome = run_stage(ws, StageSpec("race", "1", "cpu", ""), {"p": 1}, {}, body)
    print(json.dumps({"executed": outcome.executed, "key": outcome.artifact.key}))
""")

READER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mods.artifacts import artifact_problem
    stage_dir, until = Path(sys.argv[1]), float(sys.argv[2])
    seen = errors = 0
    while time.time() < until:
        for folder in [p for p in stage_dir.glob("[!.]*")] if stage_dir.exists() else []:
            try:
                for i in range(20):
                    assert (folder / f"f{i}.txt").read_text() == str(i) * 5000
                seen += 1
            except Exception as error:
                errors += 1
                print(repr(error), file=sys.stderr)
        time.sleep(0.001)
    print(seen, errors)
""")


def test_four_processes_one_writer_no_reader_ever_sees_a_missing_file(tmp_path: Path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    go = time.time() + 3.0
    writers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), str(go)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    reader = subprocess.Popen([sys.executable, "-c", READER, str(tmp_path / "artifacts" / "race"), str(go + 8)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = []
    for writer in writers:
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    out, err = reader.communicate(timeout=120)
    seen, errors = map(int, out.split())
    assert [r["executed"] for r in results].count(True) == 1  # one writer; three waited and reused
    assert len({r["key"] for r in results}) == 1
    assert errors == 0, err
    assert seen > 0  # the reader did read the complete artifact while the others finished
    leftovers = [p.name for p in (tmp_path / "artifacts" / "race").iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_artifact_is_plain_stage_and_key():
    assert Artifact.model_validate({"stage": "s", "key": "k"}).dir("/x") == Path("/x").resolve() / "artifacts" / "s" / "k"
