"""The two shapes every stage task has: Prefect around ``mods.stages.execute`` (a whole
stage) and around ``mods.stages.run_shard`` (one shard of a row-wise stage).

The artifact on disk is the source of truth; Prefect's task cache is a fast path in front
of it. The cache key is the artifact key (stage name included, since Prefect keys are
global), and the cache records live in the workspace beside the artifacts. When a record's
artifact is gone or damaged, the record is dropped before Prefect looks it up, so the
stage reruns instead of handing out a name of nothing.

Retries are only for failures that can pass the next time (``mods.core.faults.is_transient``:
out of memory, a lost connection, an I/O timeout); a bad row or parameter fails at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext
from prefect.tasks import Task

from mods.core.artifacts import Workspace, artifact_problem
from mods.core.faults import is_transient
from mods.stages import get_stage, plan_key, run_shard

# Seconds before a transient failure is retried (memory freed, a connection back).
RETRY_DELAY_SECONDS = 10


def cache_key(stage: str, workspace: str, params: dict[str, Any], inputs: dict[str, Any], verify: bool = False) -> str:
    key = plan_key(stage, params, inputs)
    ws = Workspace(workspace)
    record_key = f"mods-{stage}-{key}"
    if artifact_problem(ws.artifact_dir(stage, key), verify_hashes=verify) is not None:
        (ws.prefect_results / record_key).unlink(missing_ok=True)
    return record_key


def _cache_key_fn(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return cache_key(context.task.name, parameters["workspace"], parameters["params"], parameters["inputs"],
                     parameters.get("verify", False))


def retry_if_transient(task_: Task, task_run: Any, state: Any) -> bool:
    error = state.data if isinstance(state.data, BaseException) else None
    if error is None:
        try:
            error = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - an unreadable result is not worth a retry
            return False
    return isinstance(error, BaseException) and is_transient(error)


def stage_task(stage: str, retries: int = 0) -> Task:
    """A Prefect task for one stage: cached by artifact key, tagged with its resource."""
    spec = get_stage(stage).spec

    @task(
        name=stage,
        description=spec.description,
        cache_key_fn=_cache_key_fn,
        persist_result=True,
        result_serializer="json",
        retries=retries,
        retry_delay_seconds=RETRY_DELAY_SECONDS,
        retry_condition_fn=retry_if_transient,
        tags=["mods", f"resource:{spec.resources}"],
    )
    def run(workspace: str, params: dict[str, Any], inputs: dict[str, Any], progress: bool = True,
            verify: bool = False, plan: dict[str, Any] | None = None) -> dict[str, Any]:
        from mods.stages import RowPlan, execute
        from tasks.reporting import publish_stage

        outcome = execute(workspace, stage, params, inputs, progress=progress, verify=verify,
                          plan=RowPlan(**plan) if plan else None)
        publish_stage(Workspace(workspace), stage, outcome)
        # "executed" tells the flow whether this call wrote the artifact (False when
        # another process wrote it meanwhile); the flow strips it before passing inputs on.
        return {**outcome.artifact.model_dump(), "executed": outcome.executed}

    return run


@task(name="shard", persist_result=False, retry_delay_seconds=RETRY_DELAY_SECONDS,
      retry_condition_fn=retry_if_transient, tags=["mods"])
def shard_task(workspace: str, stage: str, params: dict[str, Any], inputs: dict[str, Any], plan_id: str,
               index: int) -> dict[str, Any]:
    """One shard of a row-wise stage, in this process: its part file is its completion marker."""
    return run_shard(workspace, stage, params, inputs, plan_id, index)


def with_workspace_cache(task_: Task, workspace: str) -> Task:
    """The task with its cache records stored in the workspace."""
    return task_.with_options(result_storage=Path(Workspace(workspace).prefect_results))
