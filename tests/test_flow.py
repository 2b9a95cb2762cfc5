"""The Prefect flow's cache behaviour, on tiny models (one harness for the session)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

pytestmark = pytest.mark.flow

TOPICS = ["rivers", "volcanoes", "taxes", "poetry", "chess", "bread", "vaccines", "jazz", "glaciers", "robots",
          "tides", "coffee", "bridges", "owls", "fractions", "deserts", "opera", "soap", "comets", "tennis"]


def write_pool(path: Path) -> Path:
    if path.exists():  # rewriting would change its mtime, hence the source key
        return path
    rows = []
    for i, topic in enumerate(TOPICS):
        rows.append({"instruction": f"Write two sentences about {topic}.", "input": "",
                     "output": f"{topic.capitalize()} are interesting. Many people study {topic} every day."})
        rows.append({"instruction": f"Give one fact about {topic}.", "input": f"Audience: group {i}",
                     "output": f"A fact: {topic} appear in many books."})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def tiny_config(tmp_path: Path, tiny_llama: Path, **necessity: Any):
    from mods.config import PipelineConfig

    train = {"epochs": 1, "batch_size": 4, "max_length": 64, "device": "cpu"}
    return PipelineConfig.model_validate({
        "data": [str(write_pool(tmp_path / "pool.jsonl"))],
        "workspace": str(tmp_path / "ws"),
        "sample": {"rows": None, "max_chars": None},
        "quality": {"scorer": {"model": str(tiny_llama), "max_length": 64, "batch_size": 8, "device": "cpu"},
                    "keep_fraction": 0.8},
        "embedding": {"device": "cpu"},
        "seed_selection": {"k": 4},
        "base_model": str(tiny_llama),
        "seed_training": train,
        "final_training": train,
        "necessity": {"generation": {"max_new_tokens": 4, "batch_size": 8, "device": "cpu"}, "k": 3,
                      "fraction": 0.5, **necessity},
        "execution": {"progress": False},
    })


def task_states(flow_state) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


ALL = ["ingest", "sample", "quality", "high_quality", "embed", "seed_select", "seed_train", "answers",
       "necessity", "augment_select", "final_train", "export"]


def test_cache_cold_warm_beta_change_and_lost_artifact(prefect_harness, tiny_llama_dir: Path, tmp_path: Path):
    from flows.mods_pipeline import mods_pipeline

    config = tiny_config(tmp_path, tiny_llama_dir)

    cold = mods_pipeline(config=config, return_state=True)
    assert cold.is_completed(), cold.message
    assert task_states(cold) == {name: "Completed" for name in ALL}
    result = cold.result()
    selected = pd.read_parquet(result["selected_parquet"])
    assert set(selected["selected_by"]) == {"seed", "augmented"}
    assert len(selected) == 4 + 3 and selected["id"].is_unique
    jsonl = [json.loads(line) for line in Path(result["selected_jsonl"]).read_text().splitlines()]
    assert [r["instruction"] for r in jsonl] == selected["instruction"].tolist()
    assert Path(result["final_model"], "adapter_model.safetensors").is_file()
    assert Path(result["coverage_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    warm = mods_pipeline(config=config, return_state=True)
    assert task_states(warm) == {name: "Cached" for name in ALL}
    assert warm.result() == result

    # Changing only the necessity threshold reruns the selection from necessity on.
    changed = tiny_config(tmp_path, tiny_llama_dir, fraction=0.9)
    third = mods_pipeline(config=changed, return_state=True)
    states = task_states(third)
    rerun = {"augment_select", "final_train", "export"}
    assert {n for n, s in states.items() if s == "Completed"} == rerun
    assert all(states[n] == "Cached" for n in ALL if n not in rerun)

    # A cache record whose artifact is gone reruns that stage instead of failing.
    shutil.rmtree(Path(result["selected_parquet"]).parent.parent.parent / "seed_select")
    fourth = mods_pipeline(config=config, return_state=True)
    states = task_states(fourth)
    assert states["seed_select"] == "Completed"
    assert all(states[n] == "Cached" for n in ALL if n != "seed_select")
    assert fourth.result() == result


def test_gpu_stages_go_to_the_gpu_deployment(prefect_harness, tiny_llama_dir: Path, tmp_path: Path, monkeypatch):
    """With execution.gpu_deployment set, GPU stages are sent as runs of the gpu-stage
    deployment (here a stand-in running that flow in-process); CPU stages stay local."""
    import flows.mods_pipeline as pipeline
    from flows.gpu_stage import gpu_stage

    sent: list[str] = []

    class FakeRun:
        def __init__(self, state):
            self.state = state

    def fake_run_deployment(name, parameters, **kwargs):
        assert name == "mods-gpu-stage/gpu"
        sent.append(parameters["stage"])
        return FakeRun(gpu_stage(**parameters, return_state=True))

    monkeypatch.setattr(pipeline, "run_deployment", fake_run_deployment)
    config = tiny_config(tmp_path, tiny_llama_dir).model_copy(deep=True)
    config.execution.gpu_deployment = "mods-gpu-stage/gpu"
    state = pipeline.mods_pipeline(config=config, return_state=True)
    assert state.is_completed(), state.message
    assert sent == ["quality", "embed", "seed_train", "answers", "necessity", "final_train"]
