"""One stage, or one shard of a row-wise stage, as a flow of its own: what a GPU worker
runs when the pipeline sends it work.

The parent flow submits this deployment's runs and watches them (flows/mods_pipeline.py);
the worker needs the same workspace (shared disk or mounted volume) and the same code.
A failure that a retry cannot fix is raised as ``PermanentStageError``, so the parent
stops at once instead of resubmitting it.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from mods.core.faults import is_transient
from tasks import STAGE_TASKS
from tasks._stage import shard_task, with_workspace_cache


class PermanentStageError(RuntimeError):
    """A deterministic failure (bad data, bad parameter): resubmitting would fail again."""


@flow(name="mods-gpu-stage", log_prints=True)
def gpu_stage(workspace: str, stage: str, params: dict[str, Any], inputs: dict[str, Any], verify: bool = False,
              plan_id: str | None = None, shard: int | None = None) -> dict[str, Any]:
    """Run one MoDS stage (cached by its artifact key), or one shard of a row-wise stage."""
    if stage not in STAGE_TASKS:
        raise PermanentStageError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_TASKS)}")
    try:
        if plan_id is not None and shard is not None:
            return shard_task.with_options(name=f"{stage}-shard")(
                workspace=workspace, stage=stage, params=params, inputs=inputs, plan_id=plan_id, index=shard)
        result = with_workspace_cache(STAGE_TASKS[stage], workspace)(
            workspace=workspace, params=params, inputs=inputs, progress=False, verify=verify)
        return dict(result)
    except Exception as error:
        if is_transient(error):
            raise
        raise PermanentStageError(f"{stage}: {type(error).__name__}: {error}") from error
