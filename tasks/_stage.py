"""The one shape every stage task has: Prefect around ``mods.stages.execute``.

The artifact on disk is the source of truth; Prefect's task cache is a fast path in front
of it. The cache key is the artifact key (stage name included, since Prefect keys are
global), and the cache records live in the workspace beside the artifacts. When a record's
artifact is gone, the record is dropped before Prefect looks it up, so the stage reruns
instead of handing out a path to nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext
from prefect.tasks import Task

from mods.artifacts import Workspace, is_complete
from mods.stages import STAGES, execute, plan_key


def cache_key(stage: str, workspace: str, params: dict[str, Any], inputs: dict[str, Any]) -> str:
    key = plan_key(stage, params, inputs)
    ws = Workspace(workspace)
    record_key = f"mods-{stage}-{key}"
    if not is_complete(ws.artifact_dir(stage, key)):
        (ws.prefect_results / record_key).unlink(missing_ok=True)
    return record_key


def _cache_key_fn(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return cache_key(context.task.name, parameters["workspace"], parameters["params"], parameters["inputs"])


def stage_task(stage: str, retries: int = 0, retry_delay_seconds: float = 30) -> Task:
    """A Prefect task for one stage: cached by artifact key, tagged with its resource."""
    spec = STAGES[stage].spec

    @task(
        name=stage,
        description=spec.description,
        cache_key_fn=_cache_key_fn,
        persist_result=True,
        result_serializer="json",
        retries=retries,
        retry_delay_seconds=retry_delay_seconds,
        tags=["mods", f"resource:{spec.resources}"],
    )
    def run(workspace: str, params: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
        from tasks.reporting import publish_stage

        outcome = execute(workspace, stage, params, inputs)
        publish_stage(stage, outcome)
        return outcome.artifact.model_dump()

    return run


def with_workspace_cache(task_: Task, workspace: str) -> Task:
    """The task with its cache records stored in the workspace."""
    return task_.with_options(result_storage=Path(Workspace(workspace).prefect_results))
