"""Artifacts on disk: every arrow of the pipeline is a folder named by (stage, key).

An artifact is named by (stage, key) only, never by an absolute path, so a workspace can
be copied, moved or mounted elsewhere (another worker, a container) and still serves it.
The key is computed by the engine (mods/core/engine.py); this module holds the primitives
that make writing safe against crashes, corruption and concurrent runs:
- completion markers: a stage writes into a temporary sibling folder and renames it into
  place after writing ``_SUCCESS.json``, so a half-written artifact never carries a key
  (datatrove's completion markers, applied per artifact);
- the marker records every file's size and sha256; a reused artifact is checked against
  it (sizes always, hashes on request), and a damaged one is rebuilt;
- one writer per artifact: an exclusive lock file per key. A second process waits for the
  first and then reuses its artifact; a complete artifact is never deleted or replaced;
- when a stage starts, its writer removes the temporary folders that dead writers left
  behind, for every key of the stage: a key whose lock can be taken at once has no live
  writer (the kernel releases a dead process's flock).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from pydantic import BaseModel

log = logging.getLogger("mods.core.artifacts")

MARKER = "_SUCCESS.json"
KEY_LENGTH = 16

class ArtifactError(Exception):
    """A stage cannot run: an input artifact is missing or damaged (one-line message)."""


class Artifact(BaseModel):
    """A finished stage output, named by (stage, key): small, JSON-serialisable, and the
    same wherever the workspace is mounted."""

    stage: str
    key: str

    def dir(self, workspace: "Workspace | str | Path") -> Path:
        return as_workspace(workspace).artifact_dir(self.stage, self.key)


def canonical(value: Any) -> Any:
    """Parameters as plain JSON values, with stable ordering, for hashing."""
    if isinstance(value, BaseModel):
        return canonical(value.model_dump(mode="json"))
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return "NaN"
    return value


def hash_json(value: Any, length: int = KEY_LENGTH) -> str:
    blob = json.dumps(canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_files(paths: Iterable[Path], hash_content: bool = False) -> str:
    """A key for source files: size and mtime of each (fast), or their bytes (exact)."""
    entries = []
    for path in sorted({Path(p).resolve() for p in paths}):
        stat = path.stat()
        if hash_content:
            entries.append([str(path), sha256_file(path)])
        else:
            entries.append([str(path), stat.st_size, stat.st_mtime_ns])
    return hash_json(entries)


class Workspace:
    """A folder of artifacts: ``<root>/artifacts/<stage>/<key>/``, per-row results under
    ``<root>/rowstore/``, run logs under ``<root>/logs/``, remembered input digests (derived,
    safe to delete) under ``<root>/digests/``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def artifact_dir(self, stage: str, key: str) -> Path:
        return self.root / "artifacts" / stage / key

    def scratch_dir(self, stage: str, key: str) -> Path:
        """Per-key working space that survives a crash (training checkpoints), removed
        once the artifact is complete."""
        return self.root / "artifacts" / stage / f".{key}.scratch"

    @property
    def rowstore(self) -> Path:
        return self.root / "rowstore"

    @contextlib.contextmanager
    def lock(self, stage: str, key: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        path = self.root / "artifacts" / stage / f".{key}.lock"
        with file_lock(path, on_wait=on_wait):
            yield


def as_workspace(workspace: "Workspace | str | Path") -> Workspace:
    return workspace if isinstance(workspace, Workspace) else Workspace(workspace)


def check_workspace(root: str | Path) -> Path:
    """The workspace folder, created if needed; a one-line ValueError when it cannot be one."""
    path = Path(root).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"workspace {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"workspace {path} is not writable: {error.strerror or error}") from None
    return path.resolve()


# Locks this process holds, by path, with the thread holding each. A flock on a second
# descriptor of the same file waits for the first, so the same thread taking a lock twice
# would wait for itself for ever: that is a bug, raised at once. (The engine takes a
# stage's lock once per run.)
_HELD_LOCKS: dict[str, int] = {}
_HELD_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive advisory lock (flock) held while the block runs; released by the kernel
    if the process dies, so a killed writer never blocks the next one."""
    name = str(Path(path).resolve())
    with _HELD_LOCKS_GUARD:
        if _HELD_LOCKS.get(name) == threading.get_ident():
            raise RuntimeError(f"{path}: this thread holds the lock already")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        with _HELD_LOCKS_GUARD:
            _HELD_LOCKS[name] = threading.get_ident()
        try:
            yield
        finally:
            with _HELD_LOCKS_GUARD:
                _HELD_LOCKS.pop(name, None)
    finally:
        handle.close()  # releases the lock


# --- completion markers ------------------------------------------------------------------


def manifest(folder: Path, with_hashes: bool = True) -> dict[str, dict[str, Any]]:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER):
        entry: dict[str, Any] = {"size": path.stat().st_size}
        if with_hashes:
            entry["sha256"] = sha256_file(path)
        files[path.relative_to(folder).as_posix()] = entry
    return files


def read_marker(path: str | Path) -> dict[str, Any]:
    """The completion marker of an artifact folder; ValueError naming the file if unreadable."""
    marker = Path(path) / MARKER
    try:
        value = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{marker}: unreadable completion marker ({error})") from None
    if not isinstance(value, dict) or not isinstance(value.get("files"), dict) or "key" not in value:
        raise ValueError(f"{marker}: not a completion marker (no 'key' or 'files')")
    return value


def _unreadable(path: Path, error: OSError) -> str:
    return f"unreadable: {path} ({error.strerror or error})"


def artifact_problem(path: str | Path, verify_hashes: bool = False) -> str | None:
    """Why the artifact folder cannot be reused, or None when it is complete and intact.

    Sizes are always compared with the marker (cheap, catches truncation) and every file
    is opened for reading (a file nobody may read is as good as missing; os.access is not
    used: it says yes to root whatever the file's mode); sha256 only with
    ``verify_hashes`` (reads every byte)."""
    folder = Path(path)
    try:
        if not (folder / MARKER).exists():
            return f"{folder} has no {MARKER}" if folder.exists() else f"{folder} does not exist"
    except OSError as error:  # a folder that cannot be searched
        return _unreadable(folder, error)
    try:
        marker = read_marker(folder)
    except ValueError as error:
        return str(error)
    if marker.get("key") != folder.name:
        return f"{folder / MARKER} belongs to key {marker.get('key')!r}, not {folder.name!r}"
    for name, expected in marker["files"].items():
        file = folder / name
        try:
            size = file.stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return f"{file} is missing"
        except OSError as error:
            return _unreadable(file, error)
        if size != expected.get("size"):
            return f"{file} has {size} bytes, its marker says {expected.get('size')}"
        try:
            if verify_hashes and expected.get("sha256"):
                if sha256_file(file) != expected["sha256"]:
                    return f"{file} does not match its sha256 in {MARKER}"
            else:
                with open(file, "rb"):
                    pass
        except OSError as error:
            return _unreadable(file, error)
    return None


def is_complete(path: str | Path, verify_hashes: bool = False) -> bool:
    return artifact_problem(path, verify_hashes) is None


def remove_tree(path: Path) -> None:
    """shutil.rmtree that also gets through folders their owner left without permissions
    (chmod 000 inside a damaged artifact): it gives them back to the owner and goes on."""
    top = os.path.abspath(path)
    tried: set[str] = set()

    def retry(function: Callable[..., Any], failed: str, _: Any) -> None:
        failed = os.path.abspath(failed)
        if failed in tried:  # its permissions could not be given back: leave it
            return
        tried.add(failed)
        for target in (os.path.dirname(failed), failed):
            if target == top or target.startswith(top + os.sep):  # never the folders around it
                with contextlib.suppress(OSError):
                    os.chmod(target, 0o700)
        with contextlib.suppress(OSError):
            if os.path.isdir(failed) and not os.path.islink(failed):
                shutil.rmtree(failed, onerror=retry)
                os.rmdir(failed)
            else:
                os.unlink(failed)

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=retry)


def remove_leftovers(final: Path, verify_hashes: bool) -> None:
    """Temporary and damaged folders of this key. Only called with the key's lock held:
    then nobody else can be writing them. A damaged artifact is moved aside first (a
    rename, which needs no permission on its files) and then removed; a complete one is
    never touched."""
    for leftover in final.parent.glob(f".{final.name}.tmp-*"):
        log.warning("removing %s, left by a writer that died", leftover)
        remove_tree(leftover)
    if final.exists():
        problem = artifact_problem(final, verify_hashes)
        if problem is not None:
            log.warning("rebuilding %s: %s", final, problem)
            aside = final.parent / f".{final.name}.broken-{uuid.uuid4().hex[:8]}"
            os.replace(final, aside)
            remove_tree(aside)


# What a stage folder holds beside its artifacts: .<key>.lock, and the per-key folders
# .<key>.tmp-<host>-<pid>-<id> (being written), .<key>.broken-<id> (a damaged artifact
# being removed) and .<key>.scratch (checkpoints a crashed writer resumes from).
_KEY_FOLDER = re.compile(r"^\.(?P<key>[0-9A-Za-z_-]+)\.(?P<kind>tmp-.+|broken-.+|scratch)$")


@contextlib.contextmanager
def _lock_if_free(path: Path) -> Iterator[bool]:
    """Take the lock at ``path`` without waiting: True (held for the block) when no live
    process holds it, False when one does."""
    if _HELD_LOCKS.get(str(path.resolve())):
        # Ours: a second descriptor would be refused anyway, and closing it would drop our
        # own lock where flock is emulated with POSIX locks (NFS).
        yield False
        return
    try:
        handle = open(path, "a+")
    except OSError:
        yield False
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: a live writer holds it
            yield False
            return
        yield True


def remove_stale_folders(stage_dir: Path, except_key: str | None = None) -> list[Path]:
    """What dead writers left in a stage's folder, for every key but ``except_key``: the
    temporary and broken folders of a key nobody holds the lock of, and the scratch folder
    of such a key when its artifact is complete (an incomplete one's scratch holds the
    checkpoints the next writer resumes from). Each key's lock is tried without waiting,
    and held while its folders are removed, so no writer can start on them meanwhile."""
    by_key: dict[str, list[Path]] = {}
    try:
        entries = list(stage_dir.iterdir()) if stage_dir.is_dir() else []
    except OSError:
        return []
    for entry in entries:
        match = _KEY_FOLDER.match(entry.name)
        if match and match["key"] != except_key:
            by_key.setdefault(match["key"], []).append(entry)
    removed: list[Path] = []
    for key, folders in sorted(by_key.items()):
        with _lock_if_free(stage_dir / f".{key}.lock") as free:
            if not free:
                continue
            complete: bool | None = None
            for folder in sorted(folders):
                if folder.name.endswith(".scratch"):
                    if complete is None:
                        complete = artifact_problem(stage_dir / key) is None
                    if not complete:
                        continue
                log.warning("removing %s, left by a writer that died", folder)
                remove_tree(folder)
                removed.append(folder)
    return removed


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = _tmp_name(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_parquet(frame: "Any", path: Path) -> None:
    """Write a DataFrame to Parquet through a temporary name, then rename."""
    tmp = _tmp_name(path)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
