"""The MoDS stages, each one typed declaration (NeMo Curator style): name, version,
resources, input artifacts, a parameter model, and either a body that writes the
artifact or, for the row-wise stages, a batch function with setup. No Prefect here:
tasks/ wrap these for the orchestrator; the CLI and the GPU workers call the same code.

    ingest → sample → quality → high_quality → embed → seed_select → seed_train
      → answers → necessity → augment_select → final_train → export

Row-wise stages (quality, embed, answers, necessity) keep per-row results in a
``RowStore`` and compute only the rows it lacks, shard by shard (mods/rowstore.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from mods.core.artifacts import (
    Artifact,
    ArtifactError,
    StageContext,
    StageOutcome,
    StageSpec,
    Workspace,
    artifact_key,
    as_workspace,
    fingerprint_files,
    hash_json,
    run_stage,
    write_parquet,
)
from mods.config import PipelineConfig, SampleConfig, SeedSelectionConfig
from mods.embedding import EmbeddingConfig
from mods.core.faults import is_out_of_memory, release_accelerator_memory
from mods.generation import GenerationConfig
from mods.ingest import IngestConfig
from mods.core.rowstore import ROW_KEY, RowStore, Shard, blocks, cut_shards
from mods.models import model_fingerprint
from mods.readers import hub_ids, source_files
from mods.scoring import ScorerConfig, scorer_identity
from mods.selection import empty_selection, pickable_rows, selection_frame
from mods.training import TrainConfig, train_fitting_memory

log = logging.getLogger("mods.stages")

# Parameters that change where or how fast a stage runs, not what it writes. Training's
# `processes` is one: the global batch (`global_batch`, in the key) fixes the update for
# any number of processes, and the orchestrator could not know the resolved number (every
# visible GPU of whichever worker trains) anyway.
NOT_IN_KEY = {"device", "progress", "checkpoint_every", "gradient_checkpointing", "processes"}
# Also left out of a row store's fingerprint: batch sizes only change speed, so results
# computed with another batch size are reused.
NOT_IN_ROW_FINGERPRINT = NOT_IN_KEY | {"batch_size"}


def key_params(params: Any, drop: set[str] = NOT_IN_KEY) -> Any:
    if isinstance(params, BaseModel):
        params = params.model_dump(mode="json")
    if isinstance(params, dict):
        return {k: key_params(v, drop) for k, v in params.items() if k not in drop}
    if isinstance(params, list):
        return [key_params(v, drop) for v in params]
    return params


# --- stage parameter models (what each stage's function takes) ------------------------------


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class IngestParams(_Params):
    sources: list[str] = Field(description="Files, folders, globs or hub ids to read.")
    ingest: IngestConfig = IngestConfig()
    hash_content: bool = Field(False, description="Key the sources by their bytes instead of size and mtime.")


class ScoringParams(_Params):
    scorer: ScorerConfig = ScorerConfig()


class HighQualityParams(_Params):
    alpha: float | None = None
    keep_fraction: float | None = None


class TrainingParams(_Params):
    base_model: str
    train: TrainConfig = TrainConfig()


class AugmentParams(_Params):
    beta: float | None = None
    fraction: float | None = None
    k: int = 16
    relative_to_seed: bool = True
    seed: int = 0


class ExportParams(_Params):
    pass


# --- declarations ----------------------------------------------------------------------------

Body = Callable[[StageContext, Any], Mapping[str, Any] | None]


@dataclass(frozen=True)
class Rowwise:
    """A row-wise stage: rows in, one result row per row out, computed block by block.

    load:      the rows to process, from the input artifacts' folders
    keys:      each row's store key and its cost (the sort key that groups similar rows)
    resources: folders the batch function needs (the seed model), from the inputs
    setup:     load what the batch function needs (a model) once per process
    compute:   the batch function: result columns for one block, in row order
    assemble:  write the stage's usual artifact from the rows and their results
    empty:     the result columns for no rows, without a model (a stage with nothing to
               do loads none); None: setup and the batch function on an empty block
    """

    load: Callable[[Mapping[str, Path], Any], pd.DataFrame]
    keys: Callable[[pd.DataFrame], tuple[pd.Series, pd.Series]]
    setup: Callable[[Any, Mapping[str, Path]], Any]
    compute: Callable[[Any, pd.DataFrame, Any], pd.DataFrame]
    assemble: Callable[[StageContext, Any, pd.DataFrame, pd.DataFrame], dict[str, Any]]
    block_rows: Callable[[Any], int]
    fingerprint_extra: Callable[[Any, Mapping[str, Artifact]], list[str]]
    resources: Callable[[Mapping[str, Path]], dict[str, Path]] = lambda inputs: {}
    empty: Callable[[Any], pd.DataFrame] | None = None


@dataclass(frozen=True)
class Stage:
    spec: StageSpec
    inputs: tuple[str, ...]
    params: type[BaseModel]
    body: Body | None = None
    rowwise: Rowwise | None = None
    extra_key: Callable[[Any], list[str]] | None = None


STAGES: dict[str, Stage] = {}


def declare(stage_: Stage) -> Stage:
    STAGES[stage_.spec.name] = stage_
    return stage_


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name]


def parse_params(name: str, params: Any) -> BaseModel:
    model = get_stage(name).params
    return params if isinstance(params, model) else model.model_validate(params)


def _artifacts(stage_: Stage, inputs: Mapping[str, Any]) -> dict[str, Artifact]:
    missing = [name for name in stage_.inputs if name not in inputs]
    if missing:
        raise ValueError(f"stage {stage_.spec.name!r} needs input artifacts {missing}")
    return {name: Artifact.model_validate(inputs[name]) for name in stage_.inputs}


def _key_parts(stage_: Stage, params: BaseModel, artifacts: Mapping[str, Artifact]) -> tuple[Any, list[Any]]:
    extra = stage_.extra_key(params) if stage_.extra_key else []
    return key_params(params), [*artifacts.values(), *extra]


def plan_key(name: str, params: Any, inputs: Mapping[str, Any]) -> str:
    """The artifact key ``execute`` will use, without running anything."""
    stage_ = get_stage(name)
    typed = parse_params(name, params)
    key_values, key_inputs = _key_parts(stage_, typed, _artifacts(stage_, inputs))
    return artifact_key(stage_.spec, key_values, key_inputs)


# --- row-wise execution ----------------------------------------------------------------------


@dataclass
class RowPlan:
    """What a row-wise stage still has to compute: shards of the rows its store lacks."""

    stage: str
    key: str
    fingerprint: str
    total: int
    missing: int
    plan_id: str | None
    shard_rows: list[int]

    @property
    def shards(self) -> int:
        return len(self.shard_rows)


def row_store(workspace: Workspace | str | Path, name: str, params: Any, inputs: Mapping[str, Any]) -> RowStore:
    stage_ = get_stage(name)
    assert stage_.rowwise is not None, f"{name} is not a row-wise stage"
    typed = parse_params(name, params)
    artifacts = _artifacts(stage_, inputs)
    fingerprint = hash_json({
        "stage": name,
        "version": stage_.spec.version,
        "params": key_params(typed, NOT_IN_ROW_FINGERPRINT),
        "extra": stage_.rowwise.fingerprint_extra(typed, artifacts),
    })
    return RowStore(as_workspace(workspace), name, fingerprint)


def _work(stage_: Stage, workspace: Workspace, typed: BaseModel, artifacts: Mapping[str, Artifact]) -> pd.DataFrame:
    rowwise = stage_.rowwise
    assert rowwise is not None
    folders = {name: a.dir(workspace) for name, a in artifacts.items()}
    frame = rowwise.load(folders, typed).reset_index(drop=True)
    keys, cost = rowwise.keys(frame)
    return frame.assign(**{ROW_KEY: keys.to_numpy(), "cost": cost.to_numpy()})


def plan_rows(workspace: Workspace | str | Path, name: str, params: Any, inputs: Mapping[str, Any],
              rows_per_shard: int) -> RowPlan:
    """Cut the rows missing from the stage's store into shards, and record the plan."""
    workspace = as_workspace(workspace)
    stage_ = get_stage(name)
    typed = parse_params(name, params)
    artifacts = _artifacts(stage_, inputs)
    store = row_store(workspace, name, typed, artifacts)
    store.remove_stale_tmp()
    work = _work(stage_, workspace, typed, artifacts).drop_duplicates(ROW_KEY)
    known = store.known_keys()
    missing = work[~work[ROW_KEY].isin(known)]
    shards = cut_shards(missing, stage_.rowwise.block_rows(typed), rows_per_shard)  # type: ignore[union-attr]
    plan_id = store.write_plan(shards) if shards else None
    return RowPlan(stage=name, key=plan_key(name, typed, inputs), fingerprint=store.fingerprint, total=len(work),
                   missing=len(missing), plan_id=plan_id, shard_rows=[len(s.row_keys) for s in shards])


# One loaded model per process: the flow's in-process shards share it. (A process worker runs
# each flow run in a new process, so each GPU shard loads its model: a shard is sized to make
# that cost small, `execution.rows_per_shard`.)
_SETUP_CACHE: dict[tuple[str, str], Any] = {}


def _setup(stage_: Stage, store: RowStore, typed: BaseModel, resources: Mapping[str, Path]) -> Any:
    key = (stage_.spec.name, store.fingerprint + hash_json({k: str(v) for k, v in resources.items()}))
    if key not in _SETUP_CACHE:
        _SETUP_CACHE.clear()  # free the previous stage's model first
        _SETUP_CACHE[key] = stage_.rowwise.setup(typed, resources)  # type: ignore[union-attr]
    return _SETUP_CACHE[key]


def release_models() -> None:
    _SETUP_CACHE.clear()


def compute_block(rowwise: Rowwise, state: Any, block: pd.DataFrame, typed: BaseModel, stage: str) -> pd.DataFrame:
    """The batch function on one block; on out-of-memory, the block in halves (down to one
    row) before giving up."""
    try:
        result = rowwise.compute(state, block, typed).reset_index(drop=True)
    except BaseException as error:  # noqa: BLE001 - only out-of-memory is handled
        if not is_out_of_memory(error) or len(block) <= 1:
            raise
        release_accelerator_memory()
        half = len(block) // 2
        log.warning("%s: out of memory on a block of %d rows; retrying as two blocks of %d and %d",
                    stage, len(block), half, len(block) - half)
        result = pd.concat([compute_block(rowwise, state, block.iloc[:half], typed, stage),
                            compute_block(rowwise, state, block.iloc[half:], typed, stage)], ignore_index=True)
    if len(result) != len(block):
        raise RuntimeError(f"{stage}: the batch function returned {len(result)} rows for {len(block)}")
    return result


def _compute_shard(stage_: Stage, store: RowStore, typed: BaseModel, work: pd.DataFrame, shard: Shard,
                   resources: Mapping[str, Path]) -> None:
    rowwise = stage_.rowwise
    assert rowwise is not None
    rows = work.set_index(ROW_KEY).loc[list(shard.row_keys)].reset_index()
    started = time.perf_counter()
    state = _setup(stage_, store, typed, resources)
    parts = [compute_block(rowwise, state, block, typed, stage_.spec.name)
             for block in blocks(rows, rowwise.block_rows(typed))]
    results = pd.concat(parts, ignore_index=True)
    results.insert(0, ROW_KEY, rows[ROW_KEY].to_numpy())
    store.write_part(shard, results, seconds=time.perf_counter() - started)


def run_shard(workspace: Workspace | str | Path, name: str, params: Any, inputs: Mapping[str, Any],
              plan_id: str, index: int) -> dict[str, Any]:
    """Compute one shard of a plan and write its part (skipped when the part exists)."""
    workspace = as_workspace(workspace)
    stage_ = get_stage(name)
    typed = parse_params(name, params)
    artifacts = _artifacts(stage_, inputs)
    store = row_store(workspace, name, typed, artifacts)
    shard = store.read_shard(plan_id, index)
    if store.has_part(shard):
        return {"shard": index, "rows": len(shard.row_keys), "computed": False}
    folders = {n: a.dir(workspace) for n, a in artifacts.items()}
    work = _work(stage_, workspace, typed, artifacts).drop_duplicates(ROW_KEY)
    _compute_shard(stage_, store, typed, work, shard, stage_.rowwise.resources(folders))  # type: ignore[union-attr]
    return {"shard": index, "rows": len(shard.row_keys), "computed": True}


def _rowwise_body(stage_: Stage, typed: BaseModel, artifacts: Mapping[str, Artifact],
                  counts: Mapping[str, int] | None, rows_per_shard: int | None) -> Body:
    """The artifact of a row-wise stage: compute what the store still lacks (in this
    process, shard by shard, each shard's part written as it finishes), then assemble
    from the store."""
    rowwise = stage_.rowwise
    assert rowwise is not None

    def body(ctx: StageContext, _: Any) -> dict[str, Any]:
        store = row_store(ctx.workspace, stage_.spec.name, typed, artifacts)
        store.remove_stale_tmp()
        work = _work(stage_, ctx.workspace, typed, artifacts)
        unique = work.drop_duplicates(ROW_KEY)
        known = store.known_keys()
        missing = unique[~unique[ROW_KEY].isin(known)]
        shards = cut_shards(missing, rowwise.block_rows(typed), rows_per_shard or max(1, len(missing)))
        for shard in shards:
            _compute_shard(stage_, store, typed, unique, shard, rowwise.resources(ctx.inputs))
        if work.empty:
            # Nothing to do (e.g. every high-quality row is in the seed set): the artifact
            # is empty, and no model is loaded for it when the stage knows its result
            # columns; otherwise the batch function on no rows gives them.
            if rowwise.empty is not None:
                results = rowwise.empty(typed)
            else:
                state = _setup(stage_, store, typed, rowwise.resources(ctx.inputs))
                results = compute_block(rowwise, state, work, typed, stage_.spec.name)
        else:
            results = store.read(work[ROW_KEY].tolist()).drop(columns=[ROW_KEY])
        summary = rowwise.assemble(ctx, typed, work, results)
        computed = counts["missing"] if counts else len(missing)
        # The shards' own seconds (the marker's `seconds` is this assembly only): summed
        # over shards, so more than the wall time when several workers shared the stage.
        planned = store.read_plan(counts["plan_id"]) if counts and counts.get("plan_id") else shards
        return {**summary, "rows_computed": computed, "rows_reused": len(unique) - computed,
                "shards": counts["shards"] if counts else len(shards),
                "shard_seconds": round(store.part_seconds(planned), 3)}

    return body


# --- running a stage -------------------------------------------------------------------------


def execute(workspace: str | Path | Workspace, name: str, params: Any, inputs: Mapping[str, Any],
            progress: bool = True, verify: bool = False, plan: RowPlan | None = None,
            rows_per_shard: int | None = None) -> StageOutcome:
    """Run one stage unless its artifact exists; the single entry point for every runner.

    For a row-wise stage the rows its store lacks are computed here, in shards of
    ``rows_per_shard`` (one shard when None), unless the caller already ran the shards
    of ``plan`` (the flow does, to spread them over workers)."""
    stage_ = get_stage(name)
    typed = parse_params(name, params)
    artifacts = _artifacts(stage_, inputs)
    key_values, key_inputs = _key_parts(stage_, typed, artifacts)
    if stage_.rowwise is not None:
        counts = {"missing": plan.missing, "shards": plan.shards, "plan_id": plan.plan_id} if plan else None
        body = _rowwise_body(stage_, typed, artifacts, counts, rows_per_shard)
    else:
        body = stage_.body  # type: ignore[assignment]
    return run_stage(
        as_workspace(workspace), stage_.spec, key_values, artifacts,
        lambda ctx: body(ctx, typed), extra_key_inputs=key_inputs[len(artifacts):],
        verify_hashes=verify, progress=progress,
    )


def compute_rows(name: str, params: Any, frame: pd.DataFrame, resources: Mapping[str, Path] | None = None,
                 progress: bool = True) -> pd.DataFrame:
    """A row-wise stage's results for a frame of rows, without a workspace (the per-stage CLI).

    One result row per input row, in input order: rows with the same key (exact duplicates)
    are computed once and share the result."""
    stage_ = get_stage(name)
    rowwise = stage_.rowwise
    assert rowwise is not None
    typed = parse_params(name, params)
    keys, cost = rowwise.keys(frame.reset_index(drop=True))
    work = frame.reset_index(drop=True).assign(**{ROW_KEY: keys.to_numpy(), "cost": cost.to_numpy()})
    unique = work.drop_duplicates(ROW_KEY)
    state = rowwise.setup(typed, resources or {})
    ordered = unique.sort_values(["cost", ROW_KEY], kind="stable")
    parts = []
    from tqdm.auto import tqdm

    with tqdm(total=len(ordered), desc=name, unit="row", disable=not progress) as bar:
        for block in blocks(ordered, rowwise.block_rows(typed)):
            result = compute_block(rowwise, state, block, typed, name)
            result.insert(0, ROW_KEY, block[ROW_KEY].to_numpy())
            parts.append(result)
            bar.update(len(block))
    results = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({ROW_KEY: []})
    return results.set_index(ROW_KEY).loc[work[ROW_KEY].tolist()].reset_index(drop=True)


def read_table(folder: Path, filename: str) -> pd.DataFrame:
    return pd.read_parquet(Path(folder) / filename)


# --- model fingerprints: a local folder's files, or a packaged model's name -------------


def _scorer_identity(params: ScoringParams, _: Mapping[str, Artifact] | None = None) -> list[str]:
    return scorer_identity(params.scorer)


def _train_key(params: TrainingParams) -> list[str]:
    return [model_fingerprint(params.base_model)]


# --- sources -------------------------------------------------------------------------------


def _ingest_key(params: IngestParams) -> list[str]:
    files = source_files(params.sources)
    decontam = params.ingest.decontaminate_against or []
    decontam_files = source_files(decontam) if decontam else []
    return ["sources:" + fingerprint_files(files, params.hash_content), "eval:" + fingerprint_files(decontam_files),
            "hub:" + ",".join(hub_ids(params.sources))]


def ingest_body(ctx: StageContext, params: IngestParams) -> dict[str, Any]:
    from mods.ingest import ingest, write_ingest

    result = ingest(params.sources, params.ingest, progress=ctx.progress)
    write_ingest(result, ctx.out)
    totals = {k: result.report.get(k) for k in ("read", "kept", "duplicates", "quarantined", "decontaminated")}
    return {"rows": len(result.rows), **totals}


declare(Stage(StageSpec("ingest", "1", "cpu", "Read every source file into canonical rows; quarantine the rest."),
              (), IngestParams, body=ingest_body, extra_key=_ingest_key))


def sample_body(ctx: StageContext, params: SampleConfig) -> dict[str, Any]:
    rows = read_table(ctx.inputs["ingest"], "rows.parquet")
    eligible = rows
    if params.max_chars:
        size = rows["instruction"].str.len() + rows["input"].str.len() + rows["output"].str.len()
        eligible = rows[size <= params.max_chars]
    sampled = eligible
    if params.rows and params.rows < len(eligible):
        sampled = eligible.sample(n=params.rows, random_state=params.seed).sort_index()
    if sampled.empty:
        raise ValueError(f"sample: no row fits sample.max_chars={params.max_chars} (of {len(rows)} ingested rows)")
    write_parquet(sampled.reset_index(drop=True), ctx.out / "rows.parquet")
    return {"pool": len(rows), "eligible": len(eligible), "rows": len(sampled)}


declare(Stage(StageSpec("sample", "1", "cpu", "Seeded subsample of the pool (optional)."),
              ("ingest",), SampleConfig, body=sample_body))


# --- quality (row-wise) -------------------------------------------------------------------------


def _text_cost(*columns: pd.Series) -> pd.Series:
    total = None
    for column in columns:
        length = column.fillna("").astype(str).str.len()
        total = length if total is None else total + length
    return total


def _score_setup(params: ScoringParams, resources: Mapping[str, Path]) -> Any:
    from mods.scoring import build_scorer

    return build_scorer(params.scorer)


def _score_block(answer_column: str) -> Callable[[Any, pd.DataFrame, ScoringParams], pd.DataFrame]:
    def compute(scorer: Any, block: pd.DataFrame, params: ScoringParams) -> pd.DataFrame:
        return scorer.score(block["instruction"].tolist(), block["input"].tolist(), block[answer_column].tolist(),
                            progress=False)

    return compute


def _quality_assemble(ctx: StageContext, params: ScoringParams, rows: pd.DataFrame, results: pd.DataFrame) -> dict[str, Any]:
    scores = results.reset_index(drop=True)
    scores.insert(0, "id", rows["id"].to_numpy())
    write_parquet(scores, ctx.out / "scores.parquet")
    values = scores["quality_score"].to_numpy(dtype=np.float64) if len(scores) else np.zeros(0)
    return {"rows": len(scores), "score_mean": float(np.nanmean(values)) if len(values) else None}


def _scoring_stage(name: str, description: str, source: str, table: str, answer_column: str,
                   keys: Callable[[pd.DataFrame], tuple[pd.Series, pd.Series]],
                   assemble: Callable[..., dict[str, Any]],
                   empty: Callable[[Any], pd.DataFrame] | None = None) -> Stage:
    """quality and necessity: the same scorer on (instruction, input, some answer column)."""
    return Stage(
        StageSpec(name, "2", "gpu", description), (source,), ScoringParams,
        rowwise=Rowwise(
            load=lambda inputs, params: read_table(inputs[source], table),
            keys=keys,
            setup=_score_setup,
            compute=_score_block(answer_column),
            assemble=assemble,
            block_rows=lambda params: params.scorer.batch_size,
            fingerprint_extra=_scorer_identity,
            empty=empty,
        ),
        extra_key=_scorer_identity,
    )


declare(_scoring_stage(
    "quality", "Score every (instruction, output) pair.", "sample", "rows.parquet", "output",
    keys=lambda rows: (rows["id"].astype(str), _text_cost(rows["instruction"], rows["input"], rows["output"])),
    assemble=_quality_assemble,
))


def high_quality_body(ctx: StageContext, params: HighQualityParams) -> dict[str, Any]:
    from mods.selection import keep_above

    rows = read_table(ctx.inputs["sample"], "rows.parquet")
    scores = read_table(ctx.inputs["quality"], "scores.parquet")[["id", "quality_score"]]
    scored = rows.merge(scores, on="id", how="left", validate="one_to_one")
    mask = keep_above(scored["quality_score"].to_numpy(), params.alpha, params.keep_fraction)
    kept = scored[mask].reset_index(drop=True)
    if kept.empty:
        raise ValueError(
            f"no row passed the quality filter (alpha={params.alpha}, keep_fraction={params.keep_fraction}) "
            f"out of {len(scored)}; lower quality.alpha"
        )
    write_parquet(kept, ctx.out / "rows.parquet")
    return {"scored": len(scored), "kept": len(kept), "threshold": float(kept["quality_score"].min())}


declare(Stage(StageSpec("high_quality", "1", "cpu", "Keep rows above alpha (or the top fraction)."),
              ("sample", "quality"), HighQualityParams, body=high_quality_body))


# --- embed (row-wise) ---------------------------------------------------------------------------


def _embed_assemble(ctx: StageContext, params: EmbeddingConfig, rows: pd.DataFrame, results: pd.DataFrame) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from mods.embedding import embeddings_table

    vectors = (np.stack([np.asarray(v, dtype=np.float32) for v in results["embedding"]])
               if len(results) else np.zeros((0, 0), dtype=np.float32))
    pq.write_table(embeddings_table(rows["id"].tolist(), vectors), ctx.out / "embeddings.parquet")
    return {"rows": len(rows), "dim": int(vectors.shape[1])}


def _embed_compute(model: Any, block: pd.DataFrame, params: EmbeddingConfig) -> pd.DataFrame:
    from mods.embedding import encode_texts

    vectors = encode_texts(model, block["text"].tolist(), params, progress=False)
    return pd.DataFrame({"embedding": list(vectors)})


def _embed_load(inputs: Mapping[str, Path], params: EmbeddingConfig) -> pd.DataFrame:
    from mods.embedding import embedding_texts

    rows = read_table(inputs["high_quality"], "rows.parquet")
    return pd.DataFrame({"id": rows["id"], "text": embedding_texts(rows, params.text)})


def _embed_setup(params: EmbeddingConfig, resources: Mapping[str, Path]) -> Any:
    from mods.embedding import load_embedder

    return load_embedder(params)


declare(Stage(
    StageSpec("embed", "2", "gpu", "Embed the high-quality instructions."),
    ("high_quality",), EmbeddingConfig,
    rowwise=Rowwise(
        load=_embed_load,
        keys=lambda rows: (rows["id"].astype(str), _text_cost(rows["text"])),
        setup=_embed_setup,
        compute=_embed_compute,
        assemble=_embed_assemble,
        block_rows=lambda params: params.batch_size,
        fingerprint_extra=lambda params, inputs: [model_fingerprint(params.model)],
    ),
))


def seed_select_body(ctx: StageContext, params: SeedSelectionConfig) -> dict[str, Any]:
    from mods.embedding import read_embeddings
    from mods.kcenter import k_center_greedy

    ids, vectors = read_embeddings(ctx.inputs["embed"] / "embeddings.parquet")
    k = min(params.k, pickable_rows(vectors, []))
    if k < params.k:
        log.warning("seed_selection.k=%d, but only %d distinct high-quality rows: the seed set is all of them, "
                    "and the necessity step has nothing left to add", params.k, k)
    result = k_center_greedy(vectors, k, seed=params.seed)
    write_parquet(selection_frame(ids, result), ctx.out / "selected.parquet")
    return {"candidates": len(ids), "k_requested": params.k, "k": k, "capped": k < params.k,
            "radius": float(result.radii[-1]) if k else None}


declare(Stage(StageSpec("seed_select", "1", "cpu", "k-center greedy seed set (coverage)."),
              ("embed",), SeedSelectionConfig, body=seed_select_body))


def _train(ctx: StageContext, params: TrainingParams, selections: list[str]) -> dict[str, Any]:
    rows = read_table(ctx.inputs["high_quality"], "rows.parquet")
    chosen: list[str] = []
    for name in selections:
        chosen += read_table(ctx.inputs[name], "selected.parquet")["id"].tolist()
    chosen = list(dict.fromkeys(chosen))  # seed ∪ augmented, deduplicated, pick order kept
    train_rows = rows.set_index("id").loc[chosen].reset_index()
    return train_fitting_memory(params.base_model, train_rows, params.train, ctx.out / "model", ctx.scratch,
                                progress=ctx.progress)


# Version 2: global_batch replaces gradient_accumulation, processes leaves the key, and
# a short last step is no longer diluted by its padding (other weights).
declare(Stage(StageSpec("seed_train", "2", "gpus", "Fine-tune the base LLM on the seed set."),
              ("high_quality", "seed_select"), TrainingParams,
              body=lambda ctx, params: _train(ctx, params, ["seed_select"]), extra_key=_train_key))


# --- answers (row-wise) -------------------------------------------------------------------------


def _answers_load(inputs: Mapping[str, Path], params: GenerationConfig) -> pd.DataFrame:
    rows = read_table(inputs["high_quality"], "rows.parquet")
    seed_ids = set(read_table(inputs["seed_select"], "selected.parquet")["id"])
    # Seed rows are selected already; asking the model about them would only cost time.
    return rows[~rows["id"].isin(seed_ids)][["id", "instruction", "input"]].reset_index(drop=True)


def _answers_setup(params: GenerationConfig, resources: Mapping[str, Path]) -> Any:
    from mods.training import load_trained_model

    return load_trained_model(resources["seed_model"], device=params.device)


def _answers_compute(state: Any, block: pd.DataFrame, params: GenerationConfig) -> pd.DataFrame:
    from mods.generation import generate_answers

    model, tokenizer = state
    answers = generate_answers(model, tokenizer, block["instruction"].tolist(), block["input"].tolist(), params,
                               progress=False)
    return pd.DataFrame({"seed_answer": pd.Series(answers, dtype=str)})


def _answers_assemble(ctx: StageContext, params: GenerationConfig, rows: pd.DataFrame, results: pd.DataFrame) -> dict[str, Any]:
    frame = pd.DataFrame({"id": rows["id"].astype(str), "instruction": rows["instruction"].astype(str),
                          "input": rows["input"].astype(str), "seed_answer": results["seed_answer"].astype(str)})
    write_parquet(frame, ctx.out / "answers.parquet")
    return {"rows": len(frame), "empty_answers": int((frame["seed_answer"].str.len() == 0).sum())}


declare(Stage(
    StageSpec("answers", "2", "gpu", "The seed model answers every high-quality instruction not in the seed set."),
    ("high_quality", "seed_select", "seed_train"), GenerationConfig,
    rowwise=Rowwise(
        load=_answers_load,
        keys=lambda rows: (rows["id"].astype(str), _text_cost(rows["instruction"], rows["input"])),
        setup=_answers_setup,
        compute=_answers_compute,
        assemble=_answers_assemble,
        block_rows=lambda params: params.batch_size,
        # The seed model is part of what an answer depends on.
        fingerprint_extra=lambda params, inputs: [f"seed_model:{inputs['seed_train'].key}"],
        resources=lambda inputs: {"seed_model": Path(inputs["seed_train"]) / "model"},
        # Nothing to answer (k at or above the high-quality rows): no seed model to load.
        empty=lambda params: pd.DataFrame({"seed_answer": pd.Series([], dtype=str)}),
    ),
))


# --- necessity (row-wise) -----------------------------------------------------------------------


def necessity_key(ids: pd.Series, answers: pd.Series) -> pd.Series:
    """A row's key for necessity: its id and the hash of the answer being scored."""
    return pd.Series([hash_json([str(i), str(a)]) for i, a in zip(ids, answers)], index=ids.index, dtype=str)


def _necessity_assemble(ctx: StageContext, params: ScoringParams, rows: pd.DataFrame, results: pd.DataFrame) -> dict[str, Any]:
    frame = pd.DataFrame({"id": rows["id"].astype(str),
                          "necessity_score": results["quality_score"].to_numpy(dtype=np.float64)})
    write_parquet(frame, ctx.out / "necessity.parquet")
    return {"rows": len(frame)}


declare(_scoring_stage(
    "necessity", "Score the seed model's answers with the quality scorer.", "answers", "answers.parquet",
    "seed_answer",
    keys=lambda rows: (necessity_key(rows["id"], rows["seed_answer"]),
                       _text_cost(rows["instruction"], rows["input"], rows["seed_answer"])),
    assemble=_necessity_assemble,
    # Nothing answered: the artifact has only id and necessity_score, so no scorer is loaded.
    empty=lambda params: pd.DataFrame({"quality_score": pd.Series([], dtype=np.float64)}),
))


def augment_select_body(ctx: StageContext, params: AugmentParams) -> dict[str, Any]:
    from mods.embedding import read_embeddings
    from mods.kcenter import k_center_greedy
    from mods.selection import keep_below

    ids, vectors = read_embeddings(ctx.inputs["embed"] / "embeddings.parquet")
    position = {row_id: i for i, row_id in enumerate(ids)}
    necessity = read_table(ctx.inputs["necessity"], "necessity.parquet")
    needed_mask = keep_below(necessity["necessity_score"].to_numpy(), params.beta, params.fraction)
    needed = necessity["id"][needed_mask].tolist()
    seed_ids = read_table(ctx.inputs["seed_select"], "selected.parquet")["id"].tolist() if params.relative_to_seed else []
    candidate_ids = seed_ids + needed
    matrix = vectors[[position[i] for i in candidate_ids]] if candidate_ids else vectors[:0]
    already = list(range(len(seed_ids)))
    k = min(params.k, pickable_rows(matrix, already)) if needed else 0
    if k < params.k:
        log.warning("necessity.k=%d, but only %d of the %d answered rows are still needed and distinct from "
                    "the seed set: the augmented set is all of them", params.k, k, len(necessity))
    if k == 0:
        frame = empty_selection()
    else:
        result = k_center_greedy(matrix, k, already_selected=already, seed=params.seed)
        frame = selection_frame(candidate_ids, result)
    write_parquet(frame, ctx.out / "selected.parquet")
    return {"answered": len(necessity), "needed": len(needed), "k_requested": params.k, "k": k,
            "capped": k < params.k}


declare(Stage(StageSpec("augment_select", "1", "cpu", "k-center augmented set from the rows the seed model still lacks."),
              ("embed", "seed_select", "necessity"), AugmentParams, body=augment_select_body))

declare(Stage(StageSpec("final_train", "2", "gpus", "Fine-tune the base LLM on seed ∪ augmented."),
              ("high_quality", "seed_select", "augment_select"), TrainingParams,
              body=lambda ctx, params: _train(ctx, params, ["seed_select", "augment_select"]), extra_key=_train_key))


def export_body(ctx: StageContext, params: ExportParams) -> dict[str, Any]:
    from mods.report import build_report

    return build_report(ctx.out, ctx.inputs)


declare(Stage(StageSpec("export", "3", "cpu", "selected.jsonl (Alpaca format), selected.parquet with provenance, the run report."),
              ("ingest", "sample", "quality", "high_quality", "embed", "seed_select", "seed_train", "answers",
               "necessity", "augment_select", "final_train"), ExportParams, body=export_body))

# The pipeline's order (each stage after its inputs).
PIPELINE: tuple[str, ...] = tuple(STAGES)


def stage_params(config: PipelineConfig, sources: list[str]) -> dict[str, BaseModel]:
    """Every stage's parameters from the pipeline configuration: the one place that maps
    the user's settings onto the stages."""
    scoring = ScoringParams(scorer=config.quality.scorer)
    return {
        "ingest": IngestParams(sources=sources, ingest=config.ingest),
        "sample": config.sample,
        "quality": scoring,
        "high_quality": HighQualityParams(alpha=config.quality.alpha, keep_fraction=config.quality.keep_fraction),
        "embed": config.embedding,
        "seed_select": config.seed_selection,
        "seed_train": TrainingParams(base_model=config.base_model, train=config.seed_training),
        "answers": config.necessity.generation,
        "necessity": scoring,
        "augment_select": AugmentParams(**config.necessity.model_dump(include=set(AugmentParams.model_fields))),
        "final_train": TrainingParams(base_model=config.base_model, train=config.final_training),
        "export": ExportParams(),
    }


__all__ = ["STAGES", "PIPELINE", "ArtifactError", "execute", "plan_key", "plan_rows", "run_shard", "compute_rows",
           "stage_params"]
