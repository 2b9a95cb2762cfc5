"""One stage, or one shard of a row-wise stage, as a flow of its own: what a GPU worker
runs when the pipeline sends it work.

The parent flow resolved the stage run (its key included) and watches this run
(flows/executors.py, flows/gpu_runs.py); the worker needs the same workspace (shared disk
or mounted volume) and the same code. A failure that a retry cannot fix is raised as
``PermanentStageError``, so the parent stops at once instead of resubmitting it.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from pydantic import ValidationError

import mods.stages  # noqa: F401  (registers the method's stages, which runs look up by name)
from flows.executors import Executor
from mods.config import ExecutionConfig
from mods.core.engine import StageRun
from mods.core.faults import PermanentStageError, is_transient
from mods.core.stage import get_stage
from tasks import shard_task


@flow(name="mods-gpu-stage", log_prints=True)
def gpu_stage(workspace: str, run: dict[str, Any], verify: bool = False, plan_id: str | None = None,
              shard: int | None = None) -> dict[str, Any]:
    """Run one resolved MoDS stage (reused when its artifact is complete), or one shard of a row-wise stage."""
    try:
        stage_run = StageRun.model_validate(run)
        get_stage(stage_run.stage)
    except (ValidationError, ValueError) as error:
        raise PermanentStageError(f"not a stage run: {error}") from None
    try:
        executor = Executor(workspace, ExecutionConfig(verify=verify), progress=False)
        if plan_id is not None and shard is not None:
            return shard_task.with_options(name=f"{stage_run.stage}-shard")(
                run=stage_run, plan_id=plan_id, index=shard, engine=executor.engine)
        return executor.submit_resolved(stage_run).model_dump()
    except Exception as error:
        if is_transient(error):
            raise
        raise PermanentStageError(f"{stage_run.stage}: {type(error).__name__}: {error}") from error
