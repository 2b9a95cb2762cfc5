"""Executors: where a stage's work runs. They only move work; the engine (mods/core/engine.py)
decides whether a stage is done, takes its lock and writes its artifact.

- In this process: the engine runs the stage; a row-wise stage's shards run one after
  the other, each a Prefect task (``tasks.shard_task``).
- On a Prefect work pool, when the deployment says so (``GPU_DEPLOYMENT_ENV``): each shard
  of a GPU stage, and each whole GPU stage (training), becomes a flow run of the gpu-stage
  deployment (flows/gpu_stage.py). All shards of a stage are submitted at once, so every
  GPU worker takes part, and are watched by flows/gpu_runs.py: a run whose worker is lost
  is marked Crashed by the server's heartbeat automation (deployments/deploy.py) and
  resubmitted. The work pool's worker gets the resolved ``StageRun``: it never
  recomputes the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from prefect import get_run_logger
from prefect.deployments import run_deployment

import mods.stages  # noqa: F401  (registers the method's stages, which runs look up by name)
from flows.gpu_runs import GpuRuns, RemoteJob, StageFailed
from mods.config import ExecutionConfig
from mods.core.artifacts import Artifact, Workspace
from mods.core.engine import Engine, RowPlan, StageOutcome, StageRun
from mods.core.faults import first_line, stop_if_interrupted
from mods.core.stage import Resources, RowwiseStage, get_stage
from tasks import shard_task, stage_task
from tasks.reporting import StageProgress

# Where GPU stages run comes from the deployment (its job variables set this in the flow
# run's environment), never from the caller's config: Prefect merges a caller's
# parameters one level deep, so a field inside `config` would be lost.
GPU_DEPLOYMENT_ENV = "MODS_GPU_DEPLOYMENT"
# Stages that use every GPU of a machine (training) go here when it is set: a pool whose
# workers each own a whole machine, while per-GPU workers take the shards.
TRAIN_DEPLOYMENT_ENV = "MODS_TRAIN_DEPLOYMENT"


@dataclass(frozen=True)
class GpuRouting:
    """Where GPU work goes: None runs it in this process."""

    gpu: str | None = None  # shards and one-GPU stages
    train: str | None = None  # whole-machine stages; the gpu deployment when not set

    @classmethod
    def from_env(cls) -> "GpuRouting":
        gpu = os.environ.get(GPU_DEPLOYMENT_ENV) or None
        return cls(gpu, (os.environ.get(TRAIN_DEPLOYMENT_ENV) or None) if gpu else None)

    def deployment_for(self, resources: Resources) -> str | None:
        if resources.kind == "gpus":
            return self.train or self.gpu
        return self.gpu if resources.kind == "gpu" else None


class Executor:
    """Runs a flow's stages: each resolved once, then run as a Prefect task, here or on a pool."""

    def __init__(self, workspace: str | Workspace, execution: ExecutionConfig, routing: GpuRouting | None = None,
                 progress: bool | None = None) -> None:
        self.engine = Engine(workspace, verify=execution.verify,
                             progress=execution.progress if progress is None else progress)
        self.workspace = self.engine.workspace
        self.execution = execution
        self.routing = routing or GpuRouting()
        self.logger = get_run_logger()
        self.executed: list[str] = []  # stages whose artifact this flow run wrote
        self._pools: dict[str, str] = {}  # deployment → its work pool

    def submit(self, stage: str, params: Any, inputs: dict[str, Any]) -> Artifact:
        """The stage's artifact: resolved here (its key computed once), then run as a task."""
        stop_if_interrupted()
        with self._one_line(stage):
            run = self.engine.resolve(stage, params, inputs)
        return self.submit_resolved(run)

    def submit_resolved(self, run: StageRun) -> Artifact:
        with self._one_line(run.stage):
            task = stage_task(run.stage).with_options(retries=self.execution.stage_retries)
            state = task(run=run, execute=self.execute, workspace=self.workspace, return_state=True)
            artifact = Artifact.model_validate(state.result())
        if state.name != "Cached":
            self.executed.append(run.stage)
        return artifact

    @contextlib.contextmanager
    def _one_line(self, stage: str) -> Iterator[None]:
        """Name the stage in the one line the user sees; the traceback stays in the log."""
        try:
            yield
        except StageFailed:
            raise
        except Exception as error:
            raise StageFailed(f"stage {stage}: {first_line(error)}") from error

    def execute(self, run: StageRun) -> StageOutcome:
        """One stage run: whole on the pool, its shards on the pool, or all here."""
        stage = get_stage(run.stage)
        deployment = self.routing.deployment_for(stage.resources)
        if deployment and not isinstance(stage, RowwiseStage):
            if self.engine.is_complete(run):
                return self.engine.run(run)  # reused
            self._run_remote(deployment, [RemoteJob(run.stage, run.stage, self._remote_params(run),
                                                    self.execution.stage_retries)])
            problem = self.engine.problem(run)
            if problem is not None:  # never run it here instead: this may be a machine without GPUs
                raise StageFailed(f"stage {run.stage}: its GPU run completed, but the artifact is not in this "
                                  f"workspace ({problem}); do the workers share the workspace?")
            return dataclasses.replace(self.engine.run(run), executed=True)  # the worker wrote it
        shards = self._remote_shards(deployment) if deployment else self._local_shards
        return self.engine.run(run, run_shards=shards, rows_per_shard=self.execution.rows_per_shard)

    # -- shards

    def _progress(self, plan: RowPlan) -> Any:
        return StageProgress(plan.stage, plan.total, plan.total - plan.missing, plan.shards, self.logger)

    def _local_shards(self, run: StageRun, plan: RowPlan) -> None:
        progress = self._progress(plan)
        task = shard_task.with_options(name=f"{run.stage}-shard", retries=self.execution.shard_retries)
        for index, rows in enumerate(plan.shard_rows):
            stop_if_interrupted()
            task(run=run, plan_id=plan.plan_id, index=index, engine=self.engine)
            progress.shard_done(rows)

    def _remote_shards(self, deployment: str) -> Callable[[StageRun, RowPlan], None]:
        def run_shards(run: StageRun, plan: RowPlan) -> None:
            progress = self._progress(plan)
            jobs = [RemoteJob(run.stage, f"{run.stage}-shard-{i:04d}",
                              {**self._remote_params(run), "plan_id": plan.plan_id, "shard": i},
                              self.execution.shard_retries, rows=rows)
                    for i, rows in enumerate(plan.shard_rows)]
            self._run_remote(deployment, jobs, on_done=lambda job: progress.shard_done(job.rows))

        return run_shards

    # -- GPU work pool

    def _remote_params(self, run: StageRun) -> dict[str, Any]:
        return {"workspace": str(self.workspace.root), "run": run.model_dump(mode="json"),
                "verify": self.execution.verify}

    def _run_remote(self, deployment: str, jobs: list[RemoteJob],
                    on_done: Callable[[RemoteJob], None] | None = None) -> None:
        from prefect.client.orchestration import get_client

        def submit(job: RemoteJob) -> Any:
            return run_deployment(
                deployment,
                parameters=job.parameters,
                flow_run_name=job.name if job.attempts == 1 else f"{job.name}-try{job.attempts}",
                tags=["mods", f"resource:{get_stage(job.stage).resources.kind}", f"stage:{job.stage}"],
                timeout=0,  # returns at once; GpuRuns waits and watches for lost workers
            ).id

        with get_client(sync_client=True) as client:
            if deployment not in self._pools:
                self._pools[deployment] = client.read_deployment_by_name(deployment).work_pool_name
            GpuRuns(deployment, self._pools[deployment], client, submit, self.execution.pending_timeout_s,
                    self.execution.start_timeout_s, self.logger).run(jobs, on_done)
