"""The MoDS pipeline as one Prefect flow: quality → coverage → necessity → final training.

The stages and their order are mods/pipeline.py's; each is resolved once and run as a
Prefect task by the executor (flows/executors.py), which sends GPU work to a work pool
when the deployment says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from mods.config import PipelineConfig
from mods.core.artifacts import Artifact, Workspace
from mods.core.stage import get_stage
from mods.pipeline import PIPELINE, stage_params
from mods.readers import demo_sources
from flows.executors import Executor, GpuRouting


def resolve_sources(data: list[str]) -> list[str]:
    """Absolute paths for local files and folders (workers may run elsewhere), globs and
    hub ids as given; the embedded demo pool when empty."""
    if not data:
        return demo_sources()
    return [str(Path(p).expanduser().resolve()) if Path(p).expanduser().exists() else p for p in data]


@flow(name="mods-pipeline", log_prints=True)
def mods_pipeline(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:  # noqa: B008 (the UI form)
    """Select instruction-tuning data for a target LLM with MoDS (arXiv 2311.15653)."""
    logger = get_run_logger()
    workspace = Workspace(config.workspace)
    routing = GpuRouting.from_env()
    if routing.gpu:
        logger.info("GPU stages run on deployment %s; training on %s", routing.gpu, routing.train or routing.gpu)
    executor = Executor(workspace, config.execution, routing)
    params = stage_params(config, resolve_sources(config.data))
    artifacts: dict[str, Artifact] = {}
    for name in PIPELINE:
        artifacts[name] = executor.submit(name, params[name], {i: artifacts[i] for i in get_stage(name).inputs})
    out = artifacts["export"].dir(workspace)
    result = {
        "selected_jsonl": str(out / "selected.jsonl"),
        "selected_messages_jsonl": str(out / "selected_messages.jsonl"),
        "selected_sharegpt_jsonl": str(out / "selected_sharegpt.jsonl"),
        "selected_parquet": str(out / "selected.parquet"),
        "report": str(out / "report.md"),
        "coverage_png": str(out / "coverage.png"),
        "final_model": str(artifacts["final_train"].dir(workspace) / "model"),
        "export_key": artifacts["export"].key,
        "executed": executor.executed,
    }
    logger.info("MoDS selection written: %s", result)
    return result
