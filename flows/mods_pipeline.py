"""The MoDS pipeline as one Prefect flow: quality → coverage → necessity → final training.

The stages and their order are mods/pipeline.py's; each is resolved once and run as a
Prefect task by the executor (flows/executors.py), which sends GPU work to a work pool
when the deployment says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.executors import Executor, GpuRouting
from mods.config import PipelineConfig
from mods.core.artifacts import Artifact, Workspace
from mods.core.files import (
    COVERAGE_PNG,
    MODEL_DIR,
    REPORT_MD,
    SELECTED_JSONL,
    SELECTED_MESSAGES_JSONL,
    SELECTED_PARQUET,
    SELECTED_SHAREGPT_JSONL,
)
from mods.core.stage import get_stage
from mods.data.readers import demo_sources
from mods.pipeline import PIPELINE, stage_params


def resolve_sources(data: list[str]) -> list[str]:
    """Absolute paths for local files and folders (workers may run elsewhere), globs and
    hub ids as given; the embedded demo pool when empty."""
    if not data:
        return demo_sources()
    return [str(Path(p).expanduser().resolve()) if Path(p).expanduser().exists() else p for p in data]


@flow(name="mods-pipeline", log_prints=True)
def mods_pipeline(config: PipelineConfig = PipelineConfig(),  # noqa: B008 (the UI form)
                  until: str | None = None) -> dict[str, Any]:
    """Select instruction-tuning data for a target LLM with MoDS (arXiv 2311.15653). With
    ``until``, stop after that stage (e.g. quality, to choose α from the scores first)."""
    if until is not None and until not in PIPELINE:
        raise ValueError(f"until: {until!r} is not a stage of the pipeline ({', '.join(PIPELINE)})")
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
        if name == until:
            stopped = {"stopped_after": name, "artifact": str(artifacts[name].dir(workspace)),
                       "executed": executor.executed}
            logger.info("MoDS stopped after %s (until): %s", name, stopped)
            return stopped
    out = artifacts["export"].dir(workspace)
    result = {
        "selected_jsonl": str(out / SELECTED_JSONL),
        "selected_messages_jsonl": str(out / SELECTED_MESSAGES_JSONL),
        "selected_sharegpt_jsonl": str(out / SELECTED_SHAREGPT_JSONL),
        "selected_parquet": str(out / SELECTED_PARQUET),
        "report": str(out / REPORT_MD),
        "coverage_png": str(out / COVERAGE_PNG),
        "final_model": str(artifacts["final_train"].dir(workspace) / MODEL_DIR),
        "export_key": artifacts["export"].key,
        "executed": executor.executed,
    }
    logger.info("MoDS selection written: %s", result)
    return result
