"""The engine: the one place that resolves a stage run, decides whether it is done, takes
its lock and writes its artifact (datatrove's executors check completion in one place too).

A stage run is resolved once (``Engine.resolve``): typed parameters, the input artifacts,
the key and, for a row-wise stage, the row store's fingerprint. The result, a ``StageRun``,
is plain JSON: executors hand it to a Prefect task or to a GPU worker as it is, so the key
is computed once per run, wherever the work happens.

Keys follow content (early cut-off, as build systems do it): key = hash(stage, version,
result-changing parameters, what the stage depends on beyond them, and the *content* of its
inputs — every input file's sha256, read from the input's completion marker, or the part of
the inputs the stage says it reads). An upstream stage that reran and wrote the same bytes,
or a training set that came out the same from a grown pool, keeps every key downstream.

Writing an artifact is safe against crashes and concurrent runs: a temporary folder renamed
into place after the marker is written; one writer per key (a lock file); damaged artifacts
rebuilt; leftovers of dead writers removed (mods/core/artifacts.py has those primitives).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd
from pydantic import BaseModel

from mods.core.artifacts import (
    MARKER,
    Artifact,
    ArtifactError,
    Workspace,
    artifact_problem,
    as_workspace,
    atomic_write_text,
    canonical,
    hash_json,
    manifest,
    read_marker,
    remove_leftovers,
    remove_stale_folders,
    remove_tree,
)
from mods.core.faults import MissingOutputError, is_out_of_memory, release_accelerator_memory, stop_if_interrupted
from mods.core.keys import in_key_only_when_set
from mods.core.rowstore import ROW_KEY, RowStore, blocks, cut_shards
from mods.core.stage import RowwiseStage, Stage, StageContext, get_stage, missing_outputs

log = logging.getLogger("mods.engine")

# Parameters that change where or how fast a stage runs, not what it writes. Training's
# `processes` is one: the global batch (`global_batch`, in the key) fixes the update for
# any number of processes, and the orchestrator could not know the resolved number (every
# visible GPU of whichever worker trains) anyway.
NOT_IN_KEY = {"device", "progress", "checkpoint_every", "gradient_checkpointing", "processes"}
# Also left out of a row store's fingerprint: batch sizes only change speed, so results
# computed with another batch size are reused.
NOT_IN_ROW_FINGERPRINT = NOT_IN_KEY | {"batch_size"}


def key_params(params: Any, drop: set[str] = NOT_IN_KEY) -> Any:
    """Parameters as JSON values, without those that do not change a stage's output, nor
    those added later that are at their default (``KEY_WHEN_SET``): older keys stay valid."""
    if isinstance(params, BaseModel):
        fields = type(params).model_fields
        values = {}
        for name, value in params.model_dump(mode="json").items():
            field = fields.get(name)
            attribute = getattr(params, name, value)
            if field is not None and in_key_only_when_set(field) and \
                    attribute == field.get_default(call_default_factory=True):
                continue
            values[name] = attribute if isinstance(attribute, BaseModel) else value
        params = values
    if isinstance(params, dict):
        return {k: key_params(v, drop) for k, v in params.items() if k not in drop}
    if isinstance(params, list):
        return [key_params(v, drop) for v in params]
    return params


def content_digest(folder: Path) -> str:
    """An artifact's content: its files' names, sizes and sha256 from its marker."""
    return hash_json(read_marker(folder)["files"])


def stage_key(stage: Stage, key_values: Any, input_content: Any, extra: list[str]) -> str:
    """The artifact key. The only function that computes one."""
    return hash_json({"stage": stage.name, "version": stage.version, "params": key_values,
                      "inputs": input_content, "extra": extra})


class StageRun(BaseModel):
    """One stage run, resolved: what every runner needs, as JSON (it travels to workers)."""

    stage: str
    params: dict[str, Any]
    inputs: dict[str, Artifact]
    key: str
    fingerprint: str | None = None  # a row-wise stage's row store

    @property
    def artifact(self) -> Artifact:
        return Artifact(stage=self.stage, key=self.key)


@dataclass
class StageOutcome:
    artifact: Artifact
    executed: bool
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class RowPlan:
    """What a row-wise stage still has to compute: shards of the rows its store lacks."""

    stage: str
    total: int
    missing: int
    plan_id: str | None
    shard_rows: list[int]

    @property
    def shards(self) -> int:
        return len(self.shard_rows)


# Runs the shards of a plan (in this process, or on workers); returns when all are stored.
ShardRunner = Callable[[StageRun, RowPlan], None]


class Engine:
    """Resolves and runs stages on one workspace."""

    def __init__(self, workspace: Workspace | str | Path, verify: bool = False, progress: bool = True) -> None:
        self.workspace = as_workspace(workspace)
        self.verify = verify
        self.progress = progress
        self._work: tuple[str, pd.DataFrame] | None = None  # the last row-wise run's rows, by key

    # -- resolving

    def resolve(self, stage: Stage | str, params: Any, inputs: Mapping[str, Any]) -> StageRun:
        """Typed parameters, input artifacts (checked), key and row fingerprint, once."""
        stage = get_stage(stage) if isinstance(stage, str) else stage
        typed = parse_params(stage, params)
        missing = [name for name in stage.inputs if name not in inputs]
        if missing:
            raise ValueError(f"stage {stage.name!r} needs input artifacts {missing}")
        artifacts = {name: Artifact.model_validate(inputs[name]) for name in stage.inputs}
        folders = self._input_folders(stage, artifacts)
        content = {name: content_digest(folder) for name, folder in folders.items()}
        read = self._read_digest(stage, typed, folders, content)
        key = stage_key(stage, key_params(typed), content if read is None else {"read": read}, stage.key_extra(typed))
        fingerprint = None
        if isinstance(stage, RowwiseStage):
            fingerprint = hash_json({"stage": stage.name, "version": stage.version,
                                     "params": key_params(typed, NOT_IN_ROW_FINGERPRINT),
                                     "extra": stage.row_fingerprint_extra(typed, artifacts)})
        return StageRun(stage=stage.name, params=typed.model_dump(mode="json"), inputs=artifacts, key=key,
                        fingerprint=fingerprint)

    def _read_digest(self, stage: Stage, typed: BaseModel, folders: Mapping[str, Path], content: Any) -> Any:
        """``stage.input_digest``, remembered by the inputs' content (from their markers): a
        rerun reads no input file to compute its key, as for any other stage, and a large
        pool is read once per content, not once per run."""
        if type(stage).input_digest is Stage.input_digest:
            return None
        memo = self.workspace.root / "digests" / stage.name / hash_json(
            {"version": stage.version, "params": key_params(typed), "inputs": content})
        try:
            return json.loads(memo.read_text())
        except (OSError, ValueError):
            pass
        value = stage.input_digest(typed, folders)
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo, json.dumps(value))
        return value

    def _input_folders(self, stage: Stage, artifacts: Mapping[str, Artifact]) -> dict[str, Path]:
        folders = {}
        for name, artifact in artifacts.items():
            folder = artifact.dir(self.workspace)
            problem = artifact_problem(folder, self.verify)
            if problem is not None:
                raise ArtifactError(f"stage {stage.name!r} needs the {artifact.stage!r} artifact {artifact.key}: {problem}")
            folders[name] = folder
        return folders

    # -- done?

    def problem(self, run: StageRun) -> str | None:
        """Why the run's artifact cannot be reused, or None when it is complete and intact."""
        return artifact_problem(run.artifact.dir(self.workspace), self.verify)

    def is_complete(self, run: StageRun) -> bool:
        return self.problem(run) is None

    def _reused(self, run: StageRun) -> StageOutcome:
        summary = read_marker(run.artifact.dir(self.workspace))["summary"]
        return StageOutcome(artifact=run.artifact, executed=False, seconds=0.0, summary=summary)

    # -- running

    def run(self, run: StageRun, run_shards: ShardRunner | None = None, rows_per_shard: int | None = None) -> StageOutcome:
        """Write the run's artifact unless it is complete; the single entry point of every runner.

        A row-wise stage first computes the rows its store lacks, cut into shards of
        ``rows_per_shard`` rows (one shard when None) that ``run_shards`` runs (here, one
        after the other, when None), then assembles the artifact from the store."""
        if self.is_complete(run):
            return self._reused(run)
        stop_if_interrupted()
        stage = get_stage(run.stage)
        final = run.artifact.dir(self.workspace)

        def waiting() -> None:
            log.info("%s %s: another process is writing it; waiting for it", run.stage, run.key)

        with self.workspace.lock(run.stage, run.key, on_wait=waiting):
            if self.is_complete(run):  # the other writer finished it
                return self._reused(run)
            folders = self._input_folders(stage, run.inputs)
            remove_leftovers(final, self.verify)
            remove_stale_folders(final.parent, except_key=run.key)
            typed = parse_params(stage, run.params)
            if isinstance(stage, RowwiseStage):
                plan = self.plan(run, rows_per_shard)
                if plan.shards:
                    (run_shards or self._run_shards_here)(run, plan)

                def body(ctx: StageContext) -> Mapping[str, Any] | None:
                    return self._assemble(stage, run, typed, ctx, plan)
            else:
                def body(ctx: StageContext) -> Mapping[str, Any] | None:
                    return stage.run(ctx, typed)
            # The marker's seconds: the body, or a row-wise stage's assembly (its shards time
            # themselves: the summary's shard_seconds).
            summary, seconds = self._write(run, stage, typed, folders, body, time.perf_counter())
        return StageOutcome(artifact=run.artifact, executed=True, seconds=seconds, summary=summary)

    def _write(self, run: StageRun, stage: Stage, typed: BaseModel, folders: dict[str, Path],
               body: Callable[[StageContext], Mapping[str, Any] | None], started: float) -> tuple[dict[str, Any], float]:
        """The body into a temporary folder, the marker, then the rename into place."""
        final = run.artifact.dir(self.workspace)
        tmp = final.parent / f".{run.key}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        scratch = self.workspace.scratch_dir(run.stage, run.key)
        try:
            context = StageContext(out=tmp, inputs=folders, scratch=scratch, workspace=self.workspace,
                                   progress=self.progress)
            summary = canonical(dict(body(context) or {}))
            stop_if_interrupted()  # never mark complete what an interrupt may have cut short
            missing = missing_outputs(stage, tmp)
            if missing:
                raise MissingOutputError(f"{run.stage} ran but did not write {', '.join(missing)} "
                                         f"(its declared outputs: {', '.join(stage.outputs)})")
            seconds = time.perf_counter() - started
            marker = {
                "stage": run.stage,
                "version": stage.version,
                "key": run.key,
                "params": canonical(key_params(typed)),
                "inputs": {a.stage: a.key for a in run.inputs.values()},
                "seconds": round(seconds, 3),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "summary": summary,
                "files": manifest(tmp),
            }
            (tmp / MARKER).write_text(json.dumps(marker, indent=2, ensure_ascii=False))
            os.replace(tmp, final)  # final is absent: remove_leftovers moved any broken one aside
        except BaseException:
            remove_tree(tmp)
            raise
        remove_tree(scratch)
        return summary, seconds

    # -- row-wise stages

    def row_store(self, run: StageRun) -> RowStore:
        assert run.fingerprint is not None, f"{run.stage} is not a row-wise stage"
        return RowStore(self.workspace, run.stage, run.fingerprint)

    def rows(self, run: StageRun) -> pd.DataFrame:
        """The run's rows with their store key and cost (loaded once per run and engine)."""
        if self._work is None or self._work[0] != f"{run.stage}/{run.key}":
            stage = get_stage(run.stage)
            assert isinstance(stage, RowwiseStage)
            folders = {name: a.dir(self.workspace) for name, a in run.inputs.items()}
            frame = stage.load(folders, parse_params(stage, run.params)).reset_index(drop=True)
            keys, cost = stage.row_keys(frame)
            self._work = (f"{run.stage}/{run.key}",
                          frame.assign(**{ROW_KEY: keys.to_numpy(), "cost": cost.to_numpy()}))
        return self._work[1]

    def missing_rows(self, run: StageRun) -> tuple[pd.DataFrame, pd.DataFrame]:
        """A row-wise run's distinct rows, and those of them its row store lacks."""
        unique = self.rows(run).drop_duplicates(ROW_KEY)
        return unique, unique[~unique[ROW_KEY].isin(self.row_store(run).known_keys())]

    def plan(self, run: StageRun, rows_per_shard: int | None = None) -> RowPlan:
        """Cut the rows missing from the store into shards of whole blocks, and record the plan."""
        stage = get_stage(run.stage)
        assert isinstance(stage, RowwiseStage)
        store = self.row_store(run)
        store.remove_stale_tmp()
        unique, missing = self.missing_rows(run)
        shards = cut_shards(missing, stage.block_rows(parse_params(stage, run.params)),
                            rows_per_shard or max(1, len(missing)))
        plan_id = store.write_plan(shards) if shards else None
        return RowPlan(stage=run.stage, total=len(unique), missing=len(missing), plan_id=plan_id,
                       shard_rows=[len(s.row_keys) for s in shards])

    def _run_shards_here(self, run: StageRun, plan: RowPlan) -> None:
        for index in range(plan.shards):
            stop_if_interrupted()
            self.run_shard(run, plan.plan_id or "", index)

    def run_shard(self, run: StageRun, plan_id: str, index: int) -> dict[str, Any]:
        """Compute one shard of a plan and store its part (skipped when the part exists)."""
        stage = get_stage(run.stage)
        assert isinstance(stage, RowwiseStage)
        store = self.row_store(run)
        shard = store.read_shard(plan_id, index)
        if store.has_part(shard):
            return {"shard": index, "rows": len(shard.row_keys), "computed": False}
        typed = parse_params(stage, run.params)
        rows = self.rows(run).drop_duplicates(ROW_KEY).set_index(ROW_KEY).loc[list(shard.row_keys)].reset_index()
        started = time.perf_counter()
        folders = stage.setup_folders({name: a.dir(self.workspace) for name, a in run.inputs.items()})
        state = _setup(stage, store.fingerprint, typed, folders)
        parts = []
        for block in blocks(rows, stage.block_rows(typed)):
            stop_if_interrupted()
            parts.append(compute_block(stage, state, block, typed))
        results = pd.concat(parts, ignore_index=True)
        results.insert(0, ROW_KEY, rows[ROW_KEY].to_numpy())
        store.write_part(shard, results, seconds=time.perf_counter() - started)
        return {"shard": index, "rows": len(shard.row_keys), "computed": True}

    def _assemble(self, stage: RowwiseStage, run: StageRun, typed: BaseModel, ctx: StageContext,
                  plan: RowPlan) -> dict[str, Any]:
        store = self.row_store(run)
        work = self.rows(run)
        if work.empty:
            # Nothing to do (e.g. every high-quality row is in the seed set): the artifact is
            # empty, and no model is loaded for it when the stage knows its result columns.
            results = stage.empty_results(typed)
            if results is None:
                state = _setup(stage, store.fingerprint, typed, stage.setup_folders(ctx.inputs))
                results = compute_block(stage, state, work, typed)
        else:
            results = store.read(work[ROW_KEY].tolist()).drop(columns=[ROW_KEY])
        summary = stage.assemble(ctx, typed, work, results)
        # The shards' own seconds (the marker's `seconds` is planning, shards and assembly
        # in this process): summed over shards, more than the wall time when several
        # workers shared the stage.
        shards = store.read_plan(plan.plan_id) if plan.plan_id else []
        return {**summary, "rows_computed": plan.missing, "rows_reused": plan.total - plan.missing,
                "shards": plan.shards, "shard_seconds": round(store.part_seconds(shards), 3)}


def parse_params(stage: Stage, params: Any) -> BaseModel:
    return params if isinstance(params, stage.params) else stage.params.model_validate(params)


# One loaded model per process: a process's shards share it. (A process worker runs each
# flow run in a new process, so each GPU shard loads its model: a shard is sized to make
# that cost small, `execution.rows_per_shard`.)
_SETUP_CACHE: dict[tuple[str, str], tuple[RowwiseStage, Any]] = {}  # key -> (stage, what its setup made)


def _setup(stage: RowwiseStage, fingerprint: str, typed: BaseModel, folders: Mapping[str, Path]) -> Any:
    key = (stage.name, fingerprint + hash_json({k: str(v) for k, v in folders.items()}))
    if key not in _SETUP_CACHE:
        release_models()  # free the previous stage's model first
        _SETUP_CACHE[key] = (stage, stage.setup(typed, folders))
    return _SETUP_CACHE[key][1]


def release_models() -> None:
    """Tear down every loaded model; also at exit (Ctrl-C included), so that a model served
    by a child process (vLLM) never outlives this one."""
    while _SETUP_CACHE:
        _, (stage, state) = _SETUP_CACHE.popitem()
        stage.teardown(state)


atexit.register(release_models)


def compute_block(stage: RowwiseStage, state: Any, block: pd.DataFrame, typed: BaseModel) -> pd.DataFrame:
    """``process_batch`` on one block; on out-of-memory, the block in halves (down to one
    row) before giving up."""
    try:
        result = stage.process_batch(state, block, typed).reset_index(drop=True)
    except BaseException as error:  # noqa: BLE001 - only out-of-memory is handled
        if not is_out_of_memory(error) or len(block) <= 1:
            raise
        release_accelerator_memory()
        half = len(block) // 2
        log.warning("%s: out of memory on a block of %d rows; retrying as two blocks of %d and %d",
                    stage.name, len(block), half, len(block) - half)
        result = pd.concat([compute_block(stage, state, block.iloc[:half], typed),
                            compute_block(stage, state, block.iloc[half:], typed)], ignore_index=True)
    if len(result) != len(block):
        raise RuntimeError(f"{stage.name}: the batch function returned {len(result)} rows for {len(block)}")
    return result


def compute_rows(name: str, params: Any, frame: pd.DataFrame, folders: Mapping[str, Path] | None = None,
                 progress: bool = True) -> pd.DataFrame:
    """A row-wise stage's results for a frame of rows, without a workspace (the per-stage
    commands). One result row per input row, in input order: rows with the same key (exact
    duplicates) are computed once and share the result."""
    from tqdm.auto import tqdm

    stage = get_stage(name)
    assert isinstance(stage, RowwiseStage), f"{name} is not a row-wise stage"
    typed = parse_params(stage, params)
    keys, cost = stage.row_keys(frame.reset_index(drop=True))
    work = frame.reset_index(drop=True).assign(**{ROW_KEY: keys.to_numpy(), "cost": cost.to_numpy()})
    ordered = work.drop_duplicates(ROW_KEY).sort_values(["cost", ROW_KEY], kind="stable")
    state = stage.setup(typed, folders or {})
    parts = []
    try:
        with tqdm(total=len(ordered), desc=name, unit="row", disable=not progress) as bar:
            for block in blocks(ordered, stage.block_rows(typed)):
                result = compute_block(stage, state, block, typed)
                result.insert(0, ROW_KEY, block[ROW_KEY].to_numpy())
                parts.append(result)
                bar.update(len(block))
    finally:
        stage.teardown(state)
    results = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({ROW_KEY: []})
    return results.set_index(ROW_KEY).loc[work[ROW_KEY].tolist()].reset_index(drop=True)


def execute(workspace: Workspace | str | Path, stage: Stage | str, params: Any, inputs: Mapping[str, Any],
            progress: bool = True, verify: bool = False, rows_per_shard: int | None = None) -> StageOutcome:
    """Resolve and run one stage in this process (scripts, benchmarks, tests)."""
    engine = Engine(workspace, verify=verify, progress=progress)
    return engine.run(engine.resolve(stage, params, inputs), rows_per_shard=rows_per_shard)
