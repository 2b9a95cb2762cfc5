"""The MoDS pipeline as one Prefect flow: quality → coverage → necessity → final training.

Every stage is a cached task whose result is an artifact folder in the workspace. The
row-wise stages are cut into shards (only the rows their store lacks). GPU work goes to
a GPU work pool when the deployment says so (GPU_DEPLOYMENT_ENV): each shard, and each
training stage, becomes a flow run of the gpu-stage deployment, all shards of a stage
submitted at once so every GPU worker takes part, and watched by flows/gpu_runs.py: a
run whose worker is lost is marked Crashed by the server's heartbeat automation
(deployments/deploy.py) and resubmitted.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment

from mods.core.artifacts import Workspace, artifact_problem
from mods.config import ExecutionConfig, PipelineConfig
from mods.readers import demo_sources
from mods.stages import PIPELINE, RowPlan, get_stage, plan_key, plan_rows, stage_params
from flows.gpu_runs import GpuRuns, RemoteJob, StageFailed
from tasks import STAGE_TASKS
from tasks._stage import shard_task, with_workspace_cache

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

    def deployment_for(self, resources: str) -> str | None:
        if resources == "gpus":
            return self.train or self.gpu
        return self.gpu if resources == "gpu" else None


def resolve_sources(data: list[str]) -> list[str]:
    """Absolute paths for local files and folders (workers may run elsewhere), globs and
    hub ids as given; the embedded demo pool when empty."""
    if not data:
        return demo_sources()
    return [str(Path(p).expanduser().resolve()) if Path(p).expanduser().exists() else p for p in data]


class StageRunner:
    """Runs each stage in this process, or its GPU work on the GPU pool's deployment."""

    def __init__(self, workspace: str, execution: ExecutionConfig, routing: GpuRouting | None = None) -> None:
        self.workspace = workspace
        self.ws = Workspace(workspace)
        self.execution = execution
        self.routing = routing or GpuRouting()
        self.logger = get_run_logger()
        self.executed: list[str] = []
        self._pools: dict[str, str] = {}  # deployment → its work pool

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
        deployment = self.routing.deployment_for(spec.spec.resources)
        remote = deployment is not None
        plan: RowPlan | None = None
        if spec.rowwise is not None and not was_complete:
            # One writer per artifact: hold the stage's lock over planning, shards and assembly.
            with self.ws.lock(stage, key, on_wait=lambda: self.logger.info("%s: another run is computing it; waiting", stage)):
                if artifact_problem(self.ws.artifact_dir(stage, key), self.execution.verify) is not None:
                    plan = plan_rows(self.ws, stage, params_json, inputs, self.execution.rows_per_shard)
                    if plan.shards:
                        self._run_shards(stage, params_json, inputs, plan, deployment)
                result = self._call_task(stage, params_json, inputs, plan)
        else:
            if remote and not was_complete:
                self._run_remote(deployment, [RemoteJob(stage, stage, self._remote_params(stage, params_json, inputs),
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

    def _run_shards(self, stage: str, params: dict[str, Any], inputs: dict[str, Any], plan: RowPlan,
                    deployment: str | None) -> None:
        from tasks.reporting import StageProgress

        progress = StageProgress(stage, plan.total, plan.total - plan.missing, plan.shards, self.logger)
        if deployment:
            jobs = [RemoteJob(stage, f"{stage}-shard-{i:04d}",
                              {**self._remote_params(stage, params, inputs), "plan_id": plan.plan_id, "shard": i},
                              self.execution.shard_retries, rows=rows)
                    for i, rows in enumerate(plan.shard_rows)]
            self._run_remote(deployment, jobs, on_done=lambda job: progress.shard_done(job.rows))
            return
        run = shard_task.with_options(name=f"{stage}-shard", retries=self.execution.shard_retries)
        for index, rows in enumerate(plan.shard_rows):
            run(workspace=self.workspace, stage=stage, params=params, inputs=inputs, plan_id=plan.plan_id, index=index)
            progress.shard_done(rows)

    # -- GPU work pool

    def _remote_params(self, stage: str, params: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
        return {"workspace": self.workspace, "stage": stage, "params": params, "inputs": inputs,
                "verify": self.execution.verify}

    def _run_remote(self, deployment: str, jobs: list[RemoteJob],
                    on_done: Callable[[RemoteJob], None] | None = None) -> None:
        from prefect.client.orchestration import get_client

        def submit(job: RemoteJob) -> Any:
            return run_deployment(
                deployment,
                parameters=job.parameters,
                flow_run_name=job.name if job.attempts == 1 else f"{job.name}-try{job.attempts}",
                tags=["mods", f"resource:{get_stage(job.stage).spec.resources}", f"stage:{job.stage}"],
                timeout=0,  # returns at once; GpuRuns waits and watches for lost workers
            ).id

        with get_client(sync_client=True) as client:
            if deployment not in self._pools:
                self._pools[deployment] = client.read_deployment_by_name(deployment).work_pool_name
            GpuRuns(deployment, self._pools[deployment], client, submit, self.execution.pending_timeout_s,
                    self.execution.start_timeout_s, self.logger).run(jobs, on_done)


@flow(name="mods-pipeline", log_prints=True)
def mods_pipeline(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:  # noqa: B008 (the UI form)
    """Select instruction-tuning data for a target LLM with MoDS (arXiv 2311.15653)."""
    logger = get_run_logger()
    workspace = str(Workspace(config.workspace).root)
    routing = GpuRouting.from_env()
    if routing.gpu:
        logger.info("GPU stages run on deployment %s; training on %s", routing.gpu, routing.train or routing.gpu)
    run = StageRunner(workspace, config.execution, routing)
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
