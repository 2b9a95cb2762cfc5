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
from stage_helpers import run_body

from mods.core.artifacts import (
    MARKER,
    Artifact,
    ArtifactError,
    Workspace,
    artifact_problem,
    read_marker,
)


def write_files(ctx) -> dict:
    (ctx.out / "data.txt").write_text("x" * 1000)
    (ctx.out / "sub").mkdir()
    (ctx.out / "sub" / "more.bin").write_bytes(b"\0" * 10)
    return {"rows": 1}


def test_marker_records_every_file_with_size_and_sha256(tmp_path: Path):
    outcome = run_body(Workspace(tmp_path), "demo", {"a": 1}, {}, write_files)
    folder = outcome.artifact.dir(tmp_path)
    marker = read_marker(folder)
    assert set(marker["files"]) == {"data.txt", "sub/more.bin"}
    assert marker["files"]["data.txt"]["size"] == 1000 and len(marker["files"]["data.txt"]["sha256"]) == 64
    assert artifact_problem(folder, verify_hashes=True) is None
    # The artifact names no absolute path: (stage, key) is all there is.
    assert outcome.artifact.model_dump() == {"stage": "demo", "key": folder.name}


def test_truncated_file_is_rebuilt_and_a_flipped_byte_is_caught_by_verify(tmp_path: Path):
    ws = Workspace(tmp_path)
    first = run_body(ws, "demo", {"a": 1}, {}, write_files)
    data = first.artifact.dir(ws) / "data.txt"
    data.write_text("x" * 10)  # truncated, marker intact
    assert "has 10 bytes" in artifact_problem(data.parent)
    again = run_body(ws, "demo", {"a": 1}, {}, write_files)
    assert again.executed and data.read_text() == "x" * 1000

    data.write_text("y" * 1000)  # same size, other bytes: only the hash sees it
    assert artifact_problem(data.parent) is None
    assert "sha256" in artifact_problem(data.parent, verify_hashes=True)
    assert not run_body(ws, "demo", {"a": 1}, {}, write_files).executed
    assert run_body(ws, "demo", {"a": 1}, {}, write_files, verify=True).executed
    assert data.read_text() == "x" * 1000


def test_garbage_marker_is_named_and_rebuilt(tmp_path: Path):
    ws = Workspace(tmp_path)
    folder = run_body(ws, "demo", {"a": 1}, {}, write_files).artifact.dir(ws)
    (folder / MARKER).write_bytes(b"\x00garbage{")
    problem = artifact_problem(folder)
    assert str(folder / MARKER) in problem and "unreadable" in problem
    assert run_body(ws, "demo", {"a": 1}, {}, write_files).executed
    assert artifact_problem(folder) is None


def test_damaged_input_stops_the_next_stage_with_one_line(tmp_path: Path):
    ws = Workspace(tmp_path)
    upstream = run_body(ws, "demo", {"a": 1}, {}, write_files).artifact
    (upstream.dir(ws) / "data.txt").unlink()
    with pytest.raises(ArtifactError, match="data.txt is missing"):
        run_body(ws, "next", {}, {"demo": upstream}, write_files)


def test_stale_temporary_folders_of_dead_writers_are_removed(tmp_path: Path):
    ws = Workspace(tmp_path)
    first = run_body(ws, "demo", {"a": 2}, {}, write_files)
    key = first.artifact.key
    # What a kill -9 during a save leaves: a temporary folder with a partial model.
    import shutil

    shutil.rmtree(first.artifact.dir(ws))
    stale = ws.artifact_dir("demo", key).parent / f".{key}.tmp-otherhost-999999-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert run_body(ws, "demo", {"a": 2}, {}, write_files).executed
    assert not stale.exists()


def test_a_moved_workspace_still_serves_its_artifacts(tmp_path: Path):
    ws = Workspace(tmp_path / "a")
    artifact = run_body(ws, "demo", {"a": 1}, {}, write_files).artifact
    os.rename(tmp_path / "a", tmp_path / "b")
    moved = Workspace(tmp_path / "b")
    assert artifact_problem(artifact.dir(moved)) is None
    assert not run_body(moved, "demo", {"a": 1}, {}, write_files).executed


RACER = textwrap.dedent("""
    import sys, time, json
    from pathlib import Path
    from mods.core.artifacts import Workspace
    from stage_helpers import run_body
    ws, go = Workspace(sys.argv[1]), float(sys.argv[2])
    def body(ctx):
        for i in range(20):
            (ctx.out / f"f{i}.txt").write_text(str(i) * 5000)
            time.sleep(0.02)
        return {}
    while time.time() < go:
        time.sleep(0.005)
    outcome = run_body(ws, "race", {"p": 1}, {}, body)
    print(json.dumps({"executed": outcome.executed, "key": outcome.artifact.key}))
""")

READER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mods.core.artifacts import artifact_problem
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
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}:{root / 'tests'}"}
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


UNREADABLE_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from mods.core.artifacts import Workspace, artifact_problem
    from stage_helpers import run_body
    ws, folder = Workspace(sys.argv[1]), Path(sys.argv[2])
    def body(ctx):
        (ctx.out / "data.txt").write_text("x" * 1000)
        (ctx.out / "sub").mkdir()
        (ctx.out / "sub" / "more.bin").write_bytes(b"\\0" * 10)
        return {"rows": 1}
    report = {"plain": artifact_problem(folder), "verify": artifact_problem(folder, verify_hashes=True)}
    outcome = run_body(ws, "demo", {"a": 1}, {}, body)
    report["executed"] = outcome.executed
    report["after"] = artifact_problem(folder, verify_hashes=True)
    report["data"] = (folder / "data.txt").read_text() == "x" * 1000
    print(json.dumps(report))
""")


@pytest.mark.parametrize("what", ["file", "folder"])
def test_unreadable_file_or_folder_in_an_artifact_is_named_and_rebuilt(tmp_path: Path, what: str):
    from unreadable import child_kwargs, make_unreadable

    kwargs = child_kwargs()
    ws = Workspace(tmp_path)
    folder = run_body(ws, "demo", {"a": 1}, {}, write_files).artifact.dir(ws)
    target = make_unreadable(folder / ("data.txt" if what == "file" else "sub"))
    named = target if what == "file" else target / "more.bin"
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", UNREADABLE_CHILD, str(tmp_path), str(folder)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": f"{root}:{root / 'tests'}"}, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # Sizes match; without --verify the file is still found unreadable (it is opened).
    assert report["plain"] == report["verify"] == f"unreadable: {named} (Permission denied)", report
    assert report["executed"] and report["after"] is None and report["data"]
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")] == [f".{folder.name}.lock"]


HOLDER = textwrap.dedent("""
    import os, sys, time
    from mods.core.artifacts import Workspace
    ws, key = Workspace(sys.argv[1]), sys.argv[2]
    with ws.lock("demo", key):
        tmp = ws.artifact_dir("demo", key).parent / f".{key}.tmp-host-{os.getpid()}-0000"
        tmp.mkdir(parents=True)
        (tmp / "model.safetensors").write_bytes(b"partial")
        print(tmp, flush=True)
        time.sleep(600)
""")


def _holders(tmp_path: Path, script: str, *args_per_holder: list[str]) -> list[tuple[subprocess.Popen, Path]]:
    root = Path(__file__).resolve().parents[2]
    started = []
    for args in args_per_holder:
        proc = subprocess.Popen([sys.executable, "-c", script, *args], env={**os.environ, "PYTHONPATH": str(root)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline().strip()
        assert line, proc.stderr.read()
        started.append((proc, Path(line)))
    return started


def test_stale_folders_of_dead_writers_under_other_keys_are_removed_when_the_stage_starts(tmp_path: Path):
    ws = Workspace(tmp_path)
    stage_dir = ws.artifact_dir("demo", "x").parent
    (dead, dead_tmp), (live, live_tmp) = _holders(tmp_path, HOLDER, [str(tmp_path), "0000dead0000dead"],
                                                  [str(tmp_path), "00001ive00001ive"])
    try:
        dead.kill()  # kill -9 while it writes: its lock goes with it, its folder stays
        dead.wait()
        assert dead_tmp.is_dir() and live_tmp.is_dir()
        # A complete artifact whose scratch outlived it, an incomplete key's checkpoints,
        # and a damaged artifact that was being removed.
        complete = run_body(ws, "demo", {"a": 3}, {}, write_files).artifact.key
        (stage_dir / f".{complete}.scratch" / "checkpoints").mkdir(parents=True)
        (stage_dir / ".0000c4ec0000c4ec.scratch" / "checkpoints").mkdir(parents=True)
        (stage_dir / ".0000b40e0000b40e.broken-12345678").mkdir()

        assert run_body(ws, "demo", {"a": 4}, {}, write_files).executed  # the stage starts, under another key
        assert not dead_tmp.exists()
        assert live_tmp.is_dir() and (live_tmp / "model.safetensors").read_bytes() == b"partial"
        assert not (stage_dir / f".{complete}.scratch").exists()
        assert (stage_dir / ".0000c4ec0000c4ec.scratch" / "checkpoints").is_dir()  # resumed from later
        assert not (stage_dir / ".0000b40e0000b40e.broken-12345678").exists()
        assert artifact_problem(stage_dir / complete) is None  # a complete artifact is never touched
    finally:
        live.kill()
        live.wait()
    # Once the live writer is gone too, the next start removes its folder.
    assert run_body(ws, "demo", {"a": 5}, {}, write_files).executed
    assert not live_tmp.exists()


PART_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mods.core.rowstore import _locked_tmp
    with _locked_tmp(Path(sys.argv[1]) / f"part-{sys.argv[2]}.parquet") as (tmp, handle):
        handle.write(b"partial")
        handle.flush()
        print(tmp, flush=True)
        time.sleep(600)
""")


def test_temporary_parts_of_dead_writers_are_removed_and_a_live_writers_kept(tmp_path: Path):
    import pandas as pd

    from mods.core.rowstore import ROW_KEY, RowStore, Shard

    store = RowStore(Workspace(tmp_path), "quality", "fingerprint")
    store.dir.mkdir(parents=True)
    (dead, dead_tmp), (live, live_tmp) = _holders(tmp_path, PART_HOLDER, [str(store.dir), "dead"],
                                                  [str(store.dir), "live"])
    try:
        dead.kill()
        dead.wait()
        assert dead_tmp.is_file() and live_tmp.is_file()
        assert store.remove_stale_tmp() == [dead_tmp]  # at once: no age rule
        assert not dead_tmp.exists() and live_tmp.read_bytes() == b"partial"
    finally:
        live.kill()
        live.wait()
    assert store.remove_stale_tmp() == [live_tmp]
    shard = Shard(0, ("a", "b"))
    store.write_part(shard, pd.DataFrame({ROW_KEY: ["a", "b"], "quality_score": [1.0, 2.0]}))
    assert store.read(["b", "a"])["quality_score"].tolist() == [2.0, 1.0]
    assert [p.name for p in store.dir.iterdir()] == [store.part_path(shard).name]
