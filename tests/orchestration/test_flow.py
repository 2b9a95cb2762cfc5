"""The Prefect flow's cache behaviour, on tiny models (one harness for the session)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from pipeline_helpers import (
    ALL,
    ROWWISE,
    artifact_bytes,
    newest,
    stage_states,
    summary,
    task_states,
    tiny_config,
    write_pool,
)

pytestmark = pytest.mark.flow


def count_keys(monkeypatch) -> dict[str, int]:
    """Stage name -> how often its artifact key was computed, and how often the source files
    were walked for ingest's key ("ingest:sources")."""
    import mods.core.engine as engine
    from mods.stages.data import Ingest

    counts: dict[str, int] = {}
    real_key, real_sources = engine.stage_key, Ingest.key_extra

    def counting_key(stage, *args):
        counts[stage.name] = counts.get(stage.name, 0) + 1
        return real_key(stage, *args)

    def counting_sources(self, params):
        counts["ingest:sources"] = counts.get("ingest:sources", 0) + 1
        return real_sources(self, params)

    monkeypatch.setattr(engine, "stage_key", counting_key)
    monkeypatch.setattr(Ingest, "key_extra", counting_sources)
    return counts


def test_cache_cold_warm_beta_change_and_lost_artifact(prefect_harness, tiny_llama_dir: Path, tmp_path: Path,
                                                       monkeypatch):
    from prefect.cache_policies import NO_CACHE

    from flows.mods_pipeline import mods_pipeline
    from tasks import stage_task

    config = tiny_config(tmp_path, tiny_llama_dir)
    # Prefect keeps no cache of its own (nothing to go stale, no cache function deleting files):
    # the engine decides from the artifacts, and computes each stage's key once per run.
    assert all(stage_task(name).cache_policy is NO_CACHE and stage_task(name).cache_key_fn is None for name in ALL)
    keys = count_keys(monkeypatch)

    cold = mods_pipeline(config=config, return_state=True)
    assert cold.is_completed(), cold.message
    assert keys == {**{name: 1 for name in ALL}, "ingest:sources": 1}
    assert stage_states(cold) == {name: "Completed" for name in ALL}
    # Each row-wise stage ran its rows as shard tasks before assembling its artifact.
    assert {f"{name}-shard" for name in ROWWISE} <= set(task_states(cold))
    result = cold.result()
    assert result["executed"] == ALL
    selected = pd.read_parquet(result["selected_parquet"])
    assert set(selected["selected_by"]) == {"seed", "augmented"}
    assert len(selected) == 4 + 3 and selected["id"].is_unique
    jsonl = [json.loads(line) for line in Path(result["selected_jsonl"]).read_text().splitlines()]
    assert [r["instruction"] for r in jsonl] == selected["instruction"].tolist()
    assert Path(result["final_model"], "adapter_model.safetensors").is_file()
    assert Path(result["coverage_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    workspace = Path(config.workspace)
    for name in ROWWISE:
        info = summary(workspace, name)
        assert info["rows_reused"] == 0 and info["rows_computed"] == info["rows"] and info["shards"] == 1

    keys.clear()
    warm = mods_pipeline(config=config, return_state=True)
    assert task_states(warm) == {name: "Cached" for name in ALL}
    assert keys == {**{name: 1 for name in ALL}, "ingest:sources": 1}
    assert warm.result() == {**result, "executed": []}

    # Changing only the necessity threshold reruns the selection from necessity on.
    changed = tiny_config(tmp_path, tiny_llama_dir, fraction=0.9)
    third = mods_pipeline(config=changed, return_state=True)
    states = task_states(third)
    rerun = {"augment_select", "final_train", "export"}
    assert {n for n, s in states.items() if s == "Completed"} == rerun
    assert all(states[n] == "Cached" for n in ALL if n not in rerun)

    # A cache record whose artifact is gone reruns that stage instead of failing.
    shutil.rmtree(workspace / "artifacts" / "seed_select")
    fourth = mods_pipeline(config=config, return_state=True)
    states = task_states(fourth)
    assert states["seed_select"] == "Completed"
    assert all(states[n] == "Cached" for n in ALL if n != "seed_select")
    assert fourth.result() == {**result, "executed": ["seed_select"]}


def test_one_shard_and_many_shards_give_identical_bytes(prefect_harness, tiny_llama_dir: Path, tmp_path: Path):
    from flows.mods_pipeline import mods_pipeline

    one = tiny_config(tmp_path, tiny_llama_dir, workspace="one", rows_per_shard=1000)
    many = tiny_config(tmp_path, tiny_llama_dir, workspace="many", rows_per_shard=8)  # a shard per batch of 8
    assert mods_pipeline(config=one, return_state=True).is_completed()
    assert mods_pipeline(config=many, return_state=True).is_completed()
    assert summary(Path(many.workspace), "quality")["shards"] == 5  # 40 rows / 8
    assert summary(Path(one.workspace), "quality")["shards"] == 1
    # The shards' own time reaches the summary and the report (the marker times assembly).
    for workspace in (Path(one.workspace), Path(many.workspace)):
        quality = newest(workspace, "quality")
        marker = json.loads((quality / "_SUCCESS.json").read_text())
        assert marker["summary"]["shard_seconds"] > 0
        report = json.loads((newest(workspace, "export") / "report.json").read_text())
        assert report["stages"]["quality"]["seconds"] == round(marker["seconds"] + marker["summary"]["shard_seconds"], 3)
    assert artifact_bytes(Path(one.workspace)) == artifact_bytes(Path(many.workspace))


def embedded_ids(workspace: Path) -> set[str]:
    """Ids in every embedding artifact of the workspace so far."""
    return {i for f in (workspace / "artifacts" / "embed").glob("[!.]*/embeddings.parquet")
            for i in pd.read_parquet(f, columns=["id"])["id"]}


def test_grown_pool_computes_only_new_rows_and_alpha_rescores_nothing(prefect_harness, tiny_llama_dir: Path,
                                                                       tmp_path: Path):
    from prefect.client.orchestration import get_client

    from flows.mods_pipeline import mods_pipeline

    pool = write_pool(tmp_path / "pool.jsonl")
    assert mods_pipeline(config=tiny_config(tmp_path, tiny_llama_dir, pool=pool), return_state=True).is_completed()
    workspace = tmp_path / "ws"
    embedded_before = embedded_ids(workspace)

    grown = tmp_path / "grown.jsonl"
    new_rows = [{"instruction": f"Name a use of {thing}.", "input": "", "output": f"{thing} can be used for work."}
                for thing in ("copper", "sand", "wool", "salt", "glass")]
    grown.write_text(pool.read_text() + "".join(json.dumps(r) + "\n" for r in new_rows))
    state = mods_pipeline(config=tiny_config(tmp_path, tiny_llama_dir, pool=grown), return_state=True)
    assert state.is_completed(), state.message
    quality = summary(workspace, "quality")
    assert (quality["rows_computed"], quality["rows_reused"]) == (5, 40)
    # Exactly the high-quality rows never embedded before are embedded now.
    kept = set(pd.read_parquet(newest(workspace, "high_quality") / "rows.parquet", columns=["id"])["id"])
    embed = summary(workspace, "embed")
    assert embed["rows_computed"] == len(kept - embedded_before) and embed["rows_reused"] == len(kept & embedded_before)
    # The UI's progress artifact of the sharded stage ends at 100 %.
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        [progress] = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["mods-quality-progress"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert progress.type == "progress" and progress.data == 100.0

    # Another quality threshold keeps other rows: nothing is scored again, and only the
    # newly kept rows are embedded — by fraction, and by α.
    for threshold in ({"keep_fraction": 0.9}, {"alpha": float(pd.read_parquet(
            newest(workspace, "quality") / "scores.parquet")["quality_score"].quantile(0.3)), "keep_fraction": None}):
        embedded_before = embedded_ids(workspace)
        config = tiny_config(tmp_path, tiny_llama_dir, pool=grown).model_copy(deep=True)
        for field, value in threshold.items():
            setattr(config.quality, field, value)
        state = mods_pipeline(config=config, return_state=True)
        assert state.is_completed(), state.message
        states = task_states(state)
        assert states["quality"] == "Cached" and "quality-shard" not in states, (threshold, states)
        kept = set(pd.read_parquet(newest(workspace, "high_quality") / "rows.parquet", columns=["id"])["id"])
        embed = summary(workspace, "embed")
        assert embed["rows_computed"] == len(kept - embedded_before), threshold

def test_a_grown_pool_with_the_same_seed_set_keeps_the_seed_model_and_its_answers(prefect_harness, tiny_llama_dir: Path,
                                                                                   tmp_path: Path):
    """Early cut-off: keys follow the content a stage reads. A grown pool changes the pool's
    artifacts and the embeddings, but when the seed set comes out the same, seed_train reads
    the same rows: it keeps its key and its model, and the old rows' answers are reused."""
    from flows.mods_pipeline import mods_pipeline
    from mods.selection.kcenter import first_center

    pool = write_pool(tmp_path / "pool.jsonl")  # 40 rows
    originals = [json.loads(line) for line in pool.read_text().splitlines()[:4]]
    # Four rows asking what four pool rows ask, with other answers: they embed exactly as those
    # rows do and come after them, so k-center never prefers them. The first pick is a seeded
    # index into the rows: a seed whose first pick is the same row for 40 and 44 rows keeps it.
    new_rows = [{**row, "output": f"Another answer, number {i}."} for i, row in enumerate(originals)]
    grown = tmp_path / "grown.jsonl"
    grown.write_text(pool.read_text() + "".join(json.dumps(r) + "\n" for r in new_rows))
    seed = next(s for s in range(1000) if first_center(40, s) == first_center(44, s))

    def config(data: Path):
        value = tiny_config(tmp_path, tiny_llama_dir, pool=data, keep_fraction=1.0)
        value.seed_selection.seed = seed
        return value

    assert mods_pipeline(config=config(pool), return_state=True).is_completed()
    workspace = tmp_path / "ws"
    seed_before = pd.read_parquet(newest(workspace, "seed_select") / "selected.parquet")["id"].tolist()
    answered_before = len(pd.read_parquet(newest(workspace, "answers") / "answers.parquet"))

    state = mods_pipeline(config=config(grown), return_state=True)
    assert state.is_completed(), state.message
    states = task_states(state)
    # Every stage up to the seed selection reran on the grown pool (its rows are new) ...
    assert all(states[name] == "Completed" for name in ("ingest", "sample", "quality", "high_quality", "embed",
                                                        "seed_select"))
    assert pd.read_parquet(newest(workspace, "seed_select") / "selected.parquet")["id"].tolist() == seed_before
    # ... and the same seed set kept the seed model: nothing was trained again,
    assert states["seed_train"] == "Cached"
    assert len(list((workspace / "artifacts" / "seed_train").glob("[!.]*"))) == 1
    # and only the four new rows were answered (the old rows' answers came from the row store).
    answers = summary(workspace, "answers")
    assert (answers["rows_computed"], answers["rows_reused"]) == (4, answered_before)


def test_until_stops_after_the_stage_it_names(prefect_harness, tiny_llama_dir: Path, tmp_path: Path):
    """Score first, choose alpha, then run on: `until` ends the flow after that stage."""
    from flows.mods_pipeline import mods_pipeline

    config = tiny_config(tmp_path, tiny_llama_dir)
    stopped = mods_pipeline(config=config, until="quality")
    assert stopped["stopped_after"] == "quality" and stopped["executed"] == ["ingest", "sample", "quality"]
    assert Path(stopped["artifact"], "scores.parquet").is_file()
    assert not (Path(config.workspace) / "artifacts" / "high_quality").exists()
    with pytest.raises(ValueError, match="until: 'qualty' is not a stage of the pipeline"):
        mods_pipeline(config=config, until="qualty")
    # What `mods plan` shows now: the three stages cached, the next to run with every row of its
    # inputs known, the rest to run after it; nothing is computed or written by looking.
    from flows.mods_pipeline import resolve_sources
    from mods.pipeline import plan_pipeline

    plan = {line.stage: line for line in plan_pipeline(config, resolve_sources(config.data))}
    assert [plan[name].status for name in ("ingest", "sample", "quality")] == ["cached"] * 3
    assert plan["quality"].rows == summary(Path(config.workspace), "quality")["rows"] > 0
    assert plan["high_quality"].status == "to run"
    assert plan["embed"].status == "to run, after high_quality"
    assert plan["augment_select"].status.startswith("to run, after embed, seed_select")
    assert not (Path(config.workspace) / "artifacts" / "high_quality").exists()
