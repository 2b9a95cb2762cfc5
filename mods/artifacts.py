"""Content-addressed artifacts: every arrow of the pipeline is a folder on disk named by a key.

key(stage) = hash(stage name, the stage's code version, its parameters, the keys of its
input artifacts). So a rerun with nothing changed finds every artifact; changing one
parameter changes the keys of that stage and of everything downstream, nothing upstream;
the same key on another machine sharing the workspace finds the same artifact.

A stage writes into a temporary sibling folder and renames it into place after writing a
completion marker, so a half-written artifact never carries a key (datatrove's
completion markers, applied per artifact).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

from pydantic import BaseModel

MARKER = "_SUCCESS.json"
KEY_LENGTH = 16

Resource = Literal["cpu", "gpu"]


class Artifact(BaseModel):
    """A finished stage output: small, JSON-serialisable, safe to pass between processes."""

    stage: str
    key: str
    path: str

    @property
    def dir(self) -> Path:
        return Path(self.path)

    def file(self, name: str) -> Path:
        return Path(self.path) / name


@dataclass(frozen=True)
class StageSpec:
    """What the orchestration needs to know about a stage, declared next to its code.

    ``version`` is the stage's code version: bump it when the stage's output for the same
    inputs changes, so old artifacts stop matching. ``resources`` says where the stage
    may run (a GPU worker or any CPU); the core never decides that.
    """

    name: str
    version: str
    resources: Resource
    description: str


def _canonical(value: Any) -> Any:
    """Parameters as plain JSON values, with stable ordering, for hashing."""
    if isinstance(value, BaseModel):
        return _canonical(value.model_dump(mode="json"))
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return "NaN"
    return value


def hash_json(value: Any, length: int = KEY_LENGTH) -> str:
    blob = json.dumps(_canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


def artifact_key(spec: StageSpec, params: Any, inputs: Sequence[Artifact | str]) -> str:
    """The stage's key from its code version, parameters and input keys (order matters)."""
    input_keys = [a.key if isinstance(a, Artifact) else str(a) for a in inputs]
    return hash_json({"stage": spec.name, "version": spec.version, "params": params, "inputs": input_keys})


def fingerprint_files(paths: Iterable[Path], hash_content: bool = False) -> str:
    """A key for source files: size and mtime of each (fast), or their bytes (exact)."""
    entries = []
    for path in sorted({Path(p).resolve() for p in paths}):
        stat = path.stat()
        if hash_content:
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            entries.append([str(path), digest.hexdigest()])
        else:
            entries.append([str(path), stat.st_size, stat.st_mtime_ns])
    return hash_json(entries)


class Workspace:
    """A folder of artifacts: ``<root>/artifacts/<stage>/<key>/``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def artifact_dir(self, stage: str, key: str) -> Path:
        return self.root / "artifacts" / stage / key

    @property
    def prefect_results(self) -> Path:
        """Where Prefect keeps its cache records for this workspace (beside the artifacts,
        so that whoever shares the artifacts shares the cache)."""
        return self.root / "prefect-results"


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def read_marker(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / MARKER).read_text())


@dataclass
class StageOutcome:
    artifact: Artifact
    executed: bool
    seconds: float


def run_stage(
    workspace: Workspace,
    spec: StageSpec,
    params: Any,
    inputs: Sequence[Artifact],
    body: Callable[[Path], Mapping[str, Any] | None],
    extra_key_inputs: Sequence[str] = (),
) -> StageOutcome:
    """Run ``body(tmp_dir)`` unless the artifact for this key is already complete.

    ``body`` writes its files into ``tmp_dir`` and may return a small summary that goes
    into the completion marker (row counts, timings). The folder is renamed into place
    only after the marker is written.
    """
    for artifact in inputs:
        if not is_complete(artifact.path):
            raise FileNotFoundError(
                f"stage {spec.name!r} needs the {artifact.stage!r} artifact {artifact.key}, "
                f"but {artifact.path} is missing or incomplete; rerun the pipeline to rebuild it"
            )
    key = artifact_key(spec, params, [*inputs, *extra_key_inputs])
    final = workspace.artifact_dir(spec.name, key)
    artifact = Artifact(stage=spec.name, key=key, path=str(final))
    if is_complete(final):
        return StageOutcome(artifact=artifact, executed=False, seconds=0.0)

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    started = time.perf_counter()
    try:
        summary = body(tmp) or {}
        seconds = time.perf_counter() - started
        marker = {
            "stage": spec.name,
            "version": spec.version,
            "key": key,
            "params": _canonical(params),
            "inputs": {a.stage: a.key for a in inputs},
            "seconds": round(seconds, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "summary": _canonical(summary),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, ensure_ascii=False))
        if final.exists():  # an incomplete leftover of a crashed run
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return StageOutcome(artifact=artifact, executed=True, seconds=seconds)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_parquet(frame: "Any", path: Path) -> None:
    """Write a DataFrame to Parquet through a temporary name, then rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)
