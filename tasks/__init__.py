"""The Prefect task layer: one adapter that turns any stage into a Prefect task.

``stage_task(name)`` is the stage as a task: its name, description and tags (``mods``,
``resource:<cpu|gpu|gpus>``), retries of transient failures, and its summary as a UI
artifact. The task does not decide whether the stage is done and keeps no cache of its
own: the engine does, from the artifact on disk. A run whose artifact was complete ends
in the state *Cached*; one that wrote it, *Completed*.

Retries are only for failures that can pass the next time (``mods.core.faults.is_transient``:
out of memory, a lost connection, an I/O timeout); a bad row or parameter fails at once.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Callable

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed
from prefect.tasks import Task

import mods.stages  # noqa: F401  (registers the method's stages, which runs look up by name)
from mods.core.artifacts import Workspace
from mods.core.engine import Engine, StageOutcome, StageRun
from mods.core.faults import is_transient
from mods.core.stage import get_stage
from tasks.reporting import publish_stage

# Seconds before a transient failure is retried (memory freed, a connection back).
RETRY_DELAY_SECONDS = 10


def retry_if_transient(task_: Task, task_run: Any, state: Any) -> bool:
    error = state.data if isinstance(state.data, BaseException) else None
    if error is None:
        try:
            error = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - an unreadable result is not worth a retry
            return False
    return isinstance(error, BaseException) and is_transient(error)


@cache
def stage_task(name: str) -> Task:
    """The stage as a Prefect task; call it with a resolved run and the executor's ``execute``."""
    stage = get_stage(name)

    @task(name=name, description=stage.description, cache_policy=NO_CACHE, persist_result=False,
          retry_delay_seconds=RETRY_DELAY_SECONDS, retry_condition_fn=retry_if_transient,
          tags=["mods", f"resource:{stage.resources.kind}"])
    def run_stage(run: StageRun, execute: Callable[[StageRun], StageOutcome], workspace: Workspace) -> Any:
        outcome = execute(run)
        artifact = outcome.artifact.model_dump()
        if not outcome.executed:  # complete already (or written meanwhile by another run)
            return Completed(name="Cached", data=artifact, message=f"artifact {outcome.artifact.key} exists")
        publish_stage(workspace, name, outcome)
        return artifact

    return run_stage


@task(name="shard", cache_policy=NO_CACHE, persist_result=False, retry_delay_seconds=RETRY_DELAY_SECONDS,
      retry_condition_fn=retry_if_transient, tags=["mods"])
def shard_task(run: StageRun, plan_id: str, index: int, engine: Engine) -> dict[str, Any]:
    """One shard of a row-wise stage, in this process: its part file is its completion marker."""
    return engine.run_shard(run, plan_id, index)
