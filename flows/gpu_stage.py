"""One stage as a flow of its own: what a GPU worker runs when the pipeline sends it a stage.

The parent flow calls this deployment with ``run_deployment`` (it shows as a subflow); the
worker needs the same workspace (shared disk or mounted volume) and the same code.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks import STAGE_TASKS
from tasks._stage import with_workspace_cache


@flow(name="mods-gpu-stage", log_prints=True)
def gpu_stage(workspace: str, stage: str, params: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """Run one MoDS stage (cached by its artifact key) and return its artifact."""
    if stage not in STAGE_TASKS:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_TASKS)}")
    return with_workspace_cache(STAGE_TASKS[stage], workspace)(workspace=workspace, params=params, inputs=inputs)
