"""The MoDS pipeline as one Prefect flow: quality → coverage → necessity → final training.

Every stage is a cached task whose result is an artifact folder in the workspace. The
row-wise stages are cut into shards (only the rows their store lacks). GPU work goes to
a GPU work pool when the deployment says so (GPU_DEPLOYMENT_ENV): each shard, and each
training stage, becomes a flow run of the gpu-stage deployment, all shards of a stage
submitted at once so every GPU worker takes part. A run whose worker is lost is marked
Crashed by the server's heartbeat automation (deployments/deploy.py) and resubmitted.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment

from mods.artifacts import Workspace, artifact_problem
from mods.config import ExecutionConfig, PipelineConfig
from mods.stages import PIPELINE, RowPlan, demo_sources, get_stage, plan_key, plan_rows, stage_params
from tasks import STAGE_TASKS
from flows.gpu_stage import PermanentStageError
from tasks._stage import shard_task, with_workspace_cache

# Where GPU stages run comes from the deployment (its job variables set this in the flow
# run's environment), never from the caller's config: Prefect merges a caller's
# parameters one level deep, so a field inside `config` would be lost.
GPU_DEPLOYMENT_ENV = "MODS_GPU_DEPLOYMENT"
# How often the states of GPU runs are read while waiting for them, and how many per read.
POLL_SECONDS = 2.0
READ_PAGE = 200
# Marks a GPU run that failed in a way a retry cannot fix (flows/gpu_stage.py raises it).
PERMANENT_FAILURE = PermanentStageError.__name__


def resolve_sources(data: list[str]) -> list[str]:
    """Absolute paths for local files and folders (workers may run elsewhere), globs and
    hub ids as given; the embedded demo pool when empty."""
    if not data:
        return demo_sources()
    return [str(Path(p).expanduser().resolve()) if Path(p).expanduser().exists() else p for p in data]


class StageFailed(RuntimeError):
    """A stage failed for good (after its retries); the message names stage, worker, reason."""


@dataclass
class RemoteJob:
    """One flow run of the gpu-stage deployment (a shard or a whole stage) and its attempts."""

    stage: str
    name: str
    parameters: dict[str, Any]
    retries: int
    rows: int = 0
    attempts: int = 0
    flow_run_id: Any = None
    submitted_at: float = 0.0
    history: list[str] = field(default_factory=list)


class StageRunner:
    """Runs each stage in this process, or its GPU work on the GPU pool's deployment."""

    def __init__(self, workspace: str, execution: ExecutionConfig, gpu_deployment: str | None) -> None:
        self.workspace = workspace
        self.ws = Workspace(workspace)
        self.execution = execution
        self.gpu_deployment = gpu_deployment
        self.logger = get_run_logger()
        self.executed: list[str] = []

    def _task(self, stage: str):
        return with_workspace_cache(STAGE_TASKS[stage], self.workspace).with_options(retries=self.execution.stage_retries)

    def __call__(self, stage: str, params: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._run(stage, params, inputs)
        except StageFailed:
            raise
        except Exception as error:
            # Name the stage in the one line the user sees; the traceback stays in the log.
            text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise StageFailed(f"stage {stage}: {text}") from error

    def _run(self, stage: str, params: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        spec = get_stage(stage)
        params_json = params.model_dump(mode="json")
        key = plan_key(stage, params_json, inputs)
        was_complete = artifact_problem(self.ws.artifact_dir(stage, key), self.execution.verify) is None
        remote = bool(self.gpu_deployment) and spec.spec.resources == "gpu"
        plan: RowPlan | None = None
        if spec.rowwise is not None and not was_complete:
            # One writer per artifact: hold the stage's lock over planning, shards and assembly.
            with self.ws.lock(stage, key, on_wait=lambda: self.logger.info("%s: another run is computing it; waiting", stage)):
                if artifact_problem(self.ws.artifact_dir(stage, key), self.execution.verify) is not None:
                    plan = plan_rows(self.ws, stage, params_json, inputs, self.execution.rows_per_shard)
                    if plan.shards:
                        self._run_shards(stage, params_json, inputs, plan, remote)
                result = self._call_task(stage, params_json, inputs, plan)
        else:
            if remote and not was_complete:
                self._run_remote([RemoteJob(stage, stage, self._remote_params(stage, params_json, inputs),
                                            self.execution.stage_retries)])
            result = self._call_task(stage, params_json, inputs, None)
        executed = result.pop("executed", False)
        if not was_complete and (executed or (remote and spec.rowwise is None)):
            self.executed.append(stage)
        return result

    def _call_task(self, stage: str, params: dict[str, Any], inputs: dict[str, Any], plan: RowPlan | None) -> dict[str, Any]:
        """The stage's task; "executed" is True only when this call wrote the artifact (a
        cached record, or an artifact another run wrote meanwhile, is not this run's work)."""
        state = self._task(stage)(workspace=self.workspace, params=params, inputs=inputs,
                                  progress=self.execution.progress, verify=self.execution.verify,
                                  plan=asdict(plan) if plan else None, return_state=True)
        result = dict(state.result())
        if state.name == "Cached":
            result["executed"] = False
        return result

    # -- shards

    def _run_shards(self, stage: str, params: dict[str, Any], inputs: dict[str, Any], plan: RowPlan, remote: bool) -> None:
        from tasks.reporting import StageProgress

        progress = StageProgress(stage, plan.total, plan.total - plan.missing, plan.shards, self.logger)
        if remote:
            jobs = [RemoteJob(stage, f"{stage}-shard-{i:04d}",
                              {**self._remote_params(stage, params, inputs), "plan_id": plan.plan_id, "shard": i},
                              self.execution.shard_retries, rows=rows)
                    for i, rows in enumerate(plan.shard_rows)]
            self._run_remote(jobs, on_done=lambda job: progress.shard_done(job.rows))
            return
        run = shard_task.with_options(name=f"{stage}-shard", retries=self.execution.shard_retries)
        for index, rows in enumerate(plan.shard_rows):
            run(workspace=self.workspace, stage=stage, params=params, inputs=inputs, plan_id=plan.plan_id, index=index)
            progress.shard_done(rows)

    # -- GPU work pool

    def _remote_params(self, stage: str, params: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
        return {"workspace": self.workspace, "stage": stage, "params": params, "inputs": inputs,
                "verify": self.execution.verify}

    def _submit(self, job: RemoteJob) -> None:
        job.attempts += 1
        run = run_deployment(
            self.gpu_deployment,
            parameters=job.parameters,
            flow_run_name=job.name if job.attempts == 1 else f"{job.name}-try{job.attempts}",
            tags=["mods", "resource:gpu", f"stage:{job.stage}"],
            timeout=0,  # returns at once; this runner waits and watches for lost workers
        )
        job.flow_run_id, job.submitted_at = run.id, time.monotonic()

    def _run_remote(self, jobs: list[RemoteJob], on_done=None) -> None:
        """Submit every job at once, then watch them: a Completed run is done; a Crashed or
        Failed one is resubmitted up to its retries; a run no worker picks up within
        ``pending_timeout_s`` fails the stage. Nothing here waits for ever."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        for job in jobs:
            self._submit(job)
        waiting = {job.flow_run_id: job for job in jobs}
        with get_client(sync_client=True) as client:
            while waiting:
                time.sleep(POLL_SECONDS)
                ids = list(waiting)
                runs = []  # in pages: the server answers at most 200 runs per read
                for start in range(0, len(ids), READ_PAGE):
                    runs += client.read_flow_runs(flow_run_filter=FlowRunFilter(
                        id=FlowRunFilterId(any_=ids[start:start + READ_PAGE])), limit=READ_PAGE)
                for run in runs:
                    job = waiting[run.id]
                    state = run.state
                    if state is None:
                        continue
                    if state.is_completed():
                        del waiting[run.id]
                        if on_done:
                            on_done(job)
                    elif state.is_final():
                        del waiting[run.id]
                        where = f"worker {run.infrastructure_pid or '?'} of pool {run.work_pool_name or '?'}"
                        job.history.append(f"{state.name} on {where}: {(state.message or '').strip()[:300]}")
                        permanent = PERMANENT_FAILURE in (state.message or "") or state.is_cancelled()
                        if permanent or job.attempts > job.retries:
                            raise StageFailed(
                                f"GPU stage {job.stage!r} ({job.name}) failed after {job.attempts} attempt(s); "
                                f"last: {job.history[-1]}"
                            )
                        self.logger.warning("%s ended %s on %s; resubmitting (attempt %d of %d)", job.name, state.name,
                                            where, job.attempts + 1, job.retries + 1)
                        self._submit(job)
                        waiting[job.flow_run_id] = job
                    elif (state.is_scheduled() or state.is_pending()) and \
                            time.monotonic() - job.submitted_at > self.execution.pending_timeout_s:
                        raise StageFailed(
                            f"GPU stage {job.stage!r} ({job.name}): no worker of deployment {self.gpu_deployment!r} "
                            f"picked it up in {self.execution.pending_timeout_s:.0f} s; start a worker on its pool"
                        )


@flow(name="mods-pipeline", log_prints=True)
def mods_pipeline(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:  # noqa: B008 (the UI form)
    """Select instruction-tuning data for a target LLM with MoDS (arXiv 2311.15653)."""
    logger = get_run_logger()
    workspace = str(Workspace(config.workspace).root)
    gpu_deployment = os.environ.get(GPU_DEPLOYMENT_ENV) or None
    if gpu_deployment:
        logger.info("GPU stages run on deployment %s", gpu_deployment)
    run = StageRunner(workspace, config.execution, gpu_deployment)
    params = stage_params(config, resolve_sources(config.data))
    artifacts: dict[str, dict[str, Any]] = {}
    for name in PIPELINE:
        artifacts[name] = run(name, params[name], {i: artifacts[i] for i in get_stage(name).inputs})
    ws = Workspace(workspace)
    out = ws.artifact_dir("export", artifacts["export"]["key"])
    result = {
        "selected_jsonl": str(out / "selected.jsonl"),
        "selected_parquet": str(out / "selected.parquet"),
        "report": str(out / "report.md"),
        "coverage_png": str(out / "coverage.png"),
        "final_model": str(ws.artifact_dir("final_train", artifacts["final_train"]["key"]) / "model"),
        "export_key": artifacts["export"]["key"],
        "executed": run.executed,
    }
    logger.info("MoDS selection written: %s", result)
    return result
