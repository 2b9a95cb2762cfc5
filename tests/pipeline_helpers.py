"""The pipeline on tiny models, for tests of every layer: a pool, a configuration, and
readers of what a run left (task states, the newest artifact, its summary)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

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


def tiny_config(tmp_path: Path, tiny_llama: Path, pool: Path | None = None, workspace: str = "ws",
                rows_per_shard: int = 1000, keep_fraction: float = 0.8, **necessity: Any):
    from mods.config import PipelineConfig

    train = {"epochs": 1, "batch_size": 4, "max_length": 64, "device": "cpu"}
    return PipelineConfig.model_validate({
        "data": [str(pool or write_pool(tmp_path / "pool.jsonl"))],
        "workspace": str(tmp_path / workspace),
        "sample": {"rows": None, "max_chars": None},
        "quality": {"scorer": {"model": str(tiny_llama), "max_length": 64, "batch_size": 8, "device": "cpu"},
                    "keep_fraction": keep_fraction},
        "embedding": {"device": "cpu", "batch_size": 8},
        "seed_selection": {"k": 4},
        "base_model": str(tiny_llama),
        "seed_training": train,
        "final_training": train,
        "necessity": {"generation": {"max_new_tokens": 4, "batch_size": 8, "device": "cpu"}, "k": 3,
                      "fraction": 0.5, **necessity},
        "execution": {"progress": False, "rows_per_shard": rows_per_shard},
    })


def task_states(flow_state) -> dict[str, str]:
    """Task name -> state name; shard tasks collapse to '<stage>-shard' (last state wins)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.events.worker import EventsWorker

    flow_run_id = flow_state.state_details.flow_run_id
    # Prefect 3 creates task runs and records their states from events that this process sends
    # in the background and the server applies a moment later: read right after the flow ended,
    # a task run may have no state yet, or not exist yet (both seen in full runs: a warm run
    # listed its first 7 stages only). Send this process's events first, then read until every
    # run has a final state and two reads a second apart list the same runs (60 s at most).
    EventsWorker.drain_all(timeout=30, at_exit=False)
    deadline = time.monotonic() + 60
    previous: dict[object, str] | None = None
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            seen = {r.id: r.state.name if r.state else "" for r in runs}
            settled = all(r.state is not None and r.state.is_final() for r in runs) and seen == previous
            if settled or time.monotonic() > deadline:
                break
            previous = seen
            time.sleep(1)
    return {run.name.rsplit("-", 1)[0]: run.state.name if run.state else "no state"
            for run in sorted(runs, key=lambda r: r.start_time or r.created)}


def stage_states(flow_state) -> dict[str, str]:
    return {name: state for name, state in task_states(flow_state).items() if name in ALL}


ALL = ["ingest", "sample", "quality", "high_quality", "embed", "seed_select", "seed_train", "answers",
       "necessity", "ifd", "augment_select", "final_train", "export"]


ROWWISE = ["quality", "embed", "answers", "necessity"]


def newest(workspace: Path, stage: str) -> Path:
    """The newest artifact folder of a stage."""
    return max((workspace / "artifacts" / stage).glob("[!.]*"), key=lambda p: (p / "_SUCCESS.json").stat().st_mtime)


def summary(workspace: Path, stage: str) -> dict[str, Any]:
    """The _SUCCESS.json summary of the newest artifact of a stage."""
    return json.loads((newest(workspace, stage) / "_SUCCESS.json").read_text())["summary"]


ROWWISE_FILES = {"quality": "scores.parquet", "embed": "embeddings.parquet", "answers": "answers.parquet",
                 "necessity": "necessity.parquet", "export": "selected.jsonl"}


def artifact_bytes(workspace: Path) -> dict[str, bytes]:
    out = {}
    for stage, name in ROWWISE_FILES.items():
        (folder,) = [p for p in (workspace / "artifacts" / stage).iterdir() if not p.name.startswith(".")]
        out[stage] = (folder / name).read_bytes()
    return out
