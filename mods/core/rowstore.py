"""Per-row results of the row-wise stages (quality, embed, answers, necessity).

A store is a folder per (stage, fingerprint), where the fingerprint names everything that
changes a row's result (stage version, result-changing parameters, model identity, the
seed model's key for answers). It holds atomic Parquet parts, one per finished shard,
each with a ``row_key`` column (the row's content id; for necessity, id + the answer's
hash). A part is the shard's completion marker (datatrove style): a kill loses at most
the shards in flight, and a stage only computes the rows its store lacks. Results are
reused across runs, samples, thresholds, pools and datasets in one workspace.

Work is cut deterministically: the missing rows are sorted by (cost, row_key) and cut
into blocks of the stage's batch size, and a shard is a run of whole blocks. Every block
is computed by one call of the stage's batch function, so a row's result does not depend
on how many shards or workers there were: the assembled artifacts are byte-identical for
any ``rows_per_shard`` and any number of workers.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import math
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mods.core.artifacts import Workspace, atomic_write_bytes, hash_json

# A part's metadata key for the seconds its shard took (the stage's summary sums them).
PART_SECONDS = "mods.seconds"

log = logging.getLogger("mods.core.rowstore")

ROW_KEY = "row_key"

# Temporary parts this process is writing now (a sweep in this process leaves them alone:
# where flock is emulated with POSIX locks (NFS), probing our own file would drop our lock).
_WRITING: set[str] = set()
_WRITING_GUARD = threading.Lock()


@contextlib.contextmanager
def _locked_tmp(path: Path):
    """A new temporary file beside ``path``, open for writing, that carries an exclusive
    flock for as long as its writer lives: a temporary part whose lock can be taken
    belongs to a writer that died (the kernel released its lock), so it can be removed
    at once instead of after some age. Yields (tmp path, handle); the caller renames the
    file into place before the block ends, or it is removed."""
    while True:
        tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        handle = open(tmp, "xb")
        fcntl.flock(handle, fcntl.LOCK_EX)
        if os.fstat(handle.fileno()).st_nlink:
            break
        # A sweep took it for a dead writer's between its creation and our lock: a new name.
        handle.close()
    with _WRITING_GUARD:
        _WRITING.add(str(tmp))
    try:
        yield tmp, handle
    finally:
        with _WRITING_GUARD:
            _WRITING.discard(str(tmp))
        try:
            tmp.unlink(missing_ok=True)  # only there when the block failed before its rename
        finally:
            handle.close()  # releases the lock


@dataclass(frozen=True)
class Shard:
    index: int
    row_keys: tuple[str, ...]

    @property
    def name(self) -> str:
        return "part-" + hash_json(sorted(self.row_keys))


class RowStore:
    def __init__(self, workspace: Workspace, stage: str, fingerprint: str) -> None:
        self.stage = stage
        self.fingerprint = fingerprint
        self.dir = workspace.rowstore / stage / fingerprint

    # -- parts

    def part_path(self, shard: Shard) -> Path:
        return self.dir / f"{shard.name}.parquet"

    def has_part(self, shard: Shard) -> bool:
        return self.part_path(shard).is_file()

    def write_part(self, shard: Shard, results: pd.DataFrame, seconds: float | None = None) -> Path:
        """Results of one shard (a ``row_key`` column + result columns), atomically; the
        seconds it took to compute travel in the part's metadata (``part_seconds``)."""
        if results[ROW_KEY].tolist() != list(shard.row_keys):
            raise ValueError(f"{self.stage}: shard {shard.index} results do not match its rows")
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.part_path(shard)
        table = pa.Table.from_pandas(results.reset_index(drop=True), preserve_index=False)
        if seconds is not None:
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), PART_SECONDS: f"{seconds:.3f}"})
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        with _locked_tmp(path) as (tmp, handle):
            handle.write(buffer.getvalue())
            handle.flush()
            os.replace(tmp, path)  # still locked: a sweep never sees an unlocked temporary part of ours
        return path

    def part_seconds(self, shards: Sequence[Shard]) -> float:
        """Seconds the parts of ``shards`` took to compute, summed (parts written without a
        time, or missing, count 0)."""
        total = 0.0
        for shard in shards:
            try:
                metadata = pq.read_schema(self.part_path(shard)).metadata or {}
                total += float(metadata.get(PART_SECONDS.encode(), b"0"))
            except (OSError, ValueError, pa.ArrowException):
                continue
        return total

    def read_plan(self, plan_id: str) -> list[Shard]:
        """Every shard of a recorded plan, in run order."""
        frame = pd.read_parquet(self.plan_path(plan_id))
        return [Shard(int(index), tuple(group[ROW_KEY])) for index, group in frame.groupby("shard", sort=True)]

    def _parts(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.parquet")) if self.dir.is_dir() else []

    def _readable(self, path: Path, columns: list[str] | None = None) -> pa.Table | None:
        try:
            return pq.read_table(path, columns=columns)
        except (OSError, pa.ArrowException) as error:
            # A damaged part (disk, truncation by hand): set it aside; its rows are recomputed.
            aside = path.with_name(f".{path.name}.broken-{uuid.uuid4().hex[:8]}")
            log.warning("%s is damaged (%s); moved to %s, its rows will be recomputed", path, error, aside.name)
            try:
                os.replace(path, aside)
            except OSError:
                pass
            return None

    def known_keys(self) -> set[str]:
        keys: set[str] = set()
        for path in self._parts():
            table = self._readable(path, [ROW_KEY])
            if table is not None:
                keys.update(table.column(ROW_KEY).to_pylist())
        return keys

    def read(self, row_keys: Sequence[str]) -> pd.DataFrame:
        """Results for ``row_keys``, in that order (every key must be in the store).

        When two parts hold the same row (two runs computed it at once), the part whose
        name sorts first wins, so the answer depends only on the store's contents."""
        wanted = set(row_keys)
        frames = []
        for path in self._parts():
            table = self._readable(path)
            if table is None:
                continue
            frame = table.to_pandas()
            frames.append(frame[frame[ROW_KEY].isin(wanted)])
        if not frames:
            found = pd.DataFrame({ROW_KEY: pd.Series([], dtype=str)})
        else:
            found = pd.concat(frames, ignore_index=True).drop_duplicates(ROW_KEY, keep="first")
        missing = wanted - set(found[ROW_KEY])
        if missing:
            raise LookupError(f"{self.stage}: {len(missing)} rows are missing from {self.dir}")
        return found.set_index(ROW_KEY).loc[list(row_keys)].reset_index()

    def remove_stale_tmp(self) -> list[Path]:
        """Remove the temporary parts of writers that died: each carries its writer's flock
        (``_locked_tmp``), so one whose lock can be taken at once has no live writer. A live
        writer's part (here or on another worker sharing the workspace) is left alone."""
        removed: list[Path] = []
        if not self.dir.is_dir():
            return removed
        for tmp in sorted(self.dir.glob(".part-*.tmp-*")):
            with _WRITING_GUARD:
                if str(tmp) in _WRITING:
                    continue
            try:
                handle = open(tmp, "ab")  # for writing: NFS's emulated flock needs it
            except OSError:
                continue  # gone meanwhile (renamed into place), or not ours to open
            with handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # a live writer holds it
                try:
                    tmp.unlink()  # while locked: its writer, if any, sees it gone and starts anew
                except OSError:
                    continue
            log.warning("removed %s, left by a writer that died", tmp)
            removed.append(tmp)
        return removed

    # -- plans: which missing rows go to which shard (read by the workers)

    def plan_path(self, plan_id: str) -> Path:
        return self.dir / "plans" / f"{plan_id}.parquet"

    def write_plan(self, shards: Sequence[Shard]) -> str:
        frame = pd.DataFrame(
            {ROW_KEY: [k for s in shards for k in s.row_keys], "shard": [s.index for s in shards for _ in s.row_keys]}
        )
        plan_id = hash_json(frame.to_dict("list"))
        path = self.plan_path(plan_id)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            sink = pa.BufferOutputStream()
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
            atomic_write_bytes(path, sink.getvalue().to_pybytes())
        return plan_id

    def read_shard(self, plan_id: str, index: int) -> Shard:
        path = self.plan_path(plan_id)
        if not path.is_file():
            raise FileNotFoundError(f"{self.stage}: shard plan {path} is missing (is the workspace shared with this worker?)")
        frame = pd.read_parquet(path)
        keys = frame.loc[frame["shard"] == index, ROW_KEY].tolist()
        if not keys:
            raise ValueError(f"{self.stage}: plan {plan_id} has no shard {index}")
        return Shard(index, tuple(keys))


def run_order(pieces: int) -> list[int]:
    """The order shards run in, as positions in cost order: the costliest first, then the
    cheapest, the next costliest, ... A batch that does not fit in memory fails in the
    first shard rather than hours in, and rows done track work done, so a rate read off
    the progress holds and a run killed at half its rows has about half its work left."""
    order: list[int] = []
    low, high = 0, pieces - 1
    while low <= high:
        order.append(high)
        if low != high:
            order.append(low)
        low, high = low + 1, high - 1
    return order


def cut_shards(work: pd.DataFrame, block_rows: int, rows_per_shard: int) -> list[Shard]:
    """Shards of whole blocks over ``work`` (columns row_key, cost) cut in (cost, row_key)
    order, numbered in ``run_order``. Which rows a block holds does not depend on the
    order shards run in, nor (after a resume) on which of them finished: finished shards
    are whole blocks, so the rows left still fall into the same blocks."""
    if work.empty:
        return []
    ordered = work.sort_values(["cost", ROW_KEY], kind="stable")[ROW_KEY].tolist()
    blocks_per_shard = max(1, math.ceil(rows_per_shard / block_rows))
    size = blocks_per_shard * block_rows
    pieces = [tuple(ordered[start : start + size]) for start in range(0, len(ordered), size)]
    return [Shard(i, pieces[position]) for i, position in enumerate(run_order(len(pieces)))]


def blocks(shard_rows: pd.DataFrame, block_rows: int) -> list[pd.DataFrame]:
    """A shard's rows (already in plan order) as the blocks the batch function sees."""
    return [shard_rows.iloc[i : i + block_rows] for i in range(0, len(shard_rows), block_rows)]
