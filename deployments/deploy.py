"""The one place that declares work pools, deployments and automations.

    python deployments/deploy.py                  # pools + deployments + automation on $PREFECT_API_URL
    python deployments/deploy.py --gpus 4         # the mods-gpu pool runs at most 4 stages at once
    python deployments/deploy.py --train-pool     # training stages on mods-train (whole machines)
    python deployments/deploy.py --gpu-image mods:gpu --volume mods_work:/opt/mods/work --network mods_default
                                                  # GPU stages as containers (docker work pools)

Pools: ``mods-cpu`` runs the pipeline flow (and every CPU stage in its process);
``mods-gpu`` runs ``mods-gpu-stage``, one stage (or one shard of a row-wise stage) per
flow run; ``mods-train`` (with ``--train-pool``) runs the training stages, on workers
that each own a whole machine, so DDP/FSDP spans all its GPUs. The pipeline finds the
GPU deployments through env variables that the ``mods-pipeline/weekly`` deployment sets
in its job variables, so a caller's ``config`` cannot lose the routing (Prefect merges a
run's parameters one level deep).

Concurrency is bounded by GPUs, nothing else: the ``mods-gpu`` pool's limit is the number
of GPUs declared with ``--gpus``, and each GPU worker owns one GPU and takes one flow run
at a time (README, "Deploying"):

    CUDA_VISIBLE_DEVICES=0 prefect worker start --pool mods-gpu --limit 1 --name gpu-host-0
    CUDA_VISIBLE_DEVICES=1 prefect worker start --pool mods-gpu --limit 1 --name gpu-host-1
    prefect worker start --pool mods-train --limit 1 --name train-host      # sees every GPU

A training stage and shards on the same machine share its GPUs: one pipeline runs them
one after the other (training waits for the stage before it), two pipelines at once may not.

Lost workers: every flow run sends a heartbeat event every ``--heartbeat`` seconds
(``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` in the deployments' job variables), and the
automation ``mods: crash flow runs without heartbeats`` (Prefect's documented zombie-flow
automation) marks a flow run *Crashed* when neither a heartbeat nor a terminal state event
arrived for ``--crash-after`` seconds; the pipeline then resubmits the stage. The automation
watches only flow runs tagged ``mods`` (every run of these deployments and every GPU run
the pipeline submits), never other flows on the same server.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from flows.executors import GPU_DEPLOYMENT_ENV, TRAIN_DEPLOYMENT_ENV  # the env variables the pipeline reads

ROOT = Path(__file__).resolve().parents[1]
GPU_STAGE_DEPLOYMENT = "mods-gpu-stage/gpu"
TRAIN_STAGE_DEPLOYMENT = "mods-gpu-stage/train"
# Every deployment's runs carry this tag (and the pipeline tags its GPU runs with it): the
# zombie automation matches it, so it never touches other flows on the same server.
MODS_TAG = "mods"
ZOMBIE_AUTOMATION = "mods: crash flow runs without heartbeats"
# Prefect refuses heartbeat frequencies under 30 s (settings: flows.heartbeat_frequency ge=30).
MIN_HEARTBEAT_SECONDS = 30
# Production defaults: a heartbeat every 30 s; Crashed after 90 s of silence (three missed beats,
# so a busy machine that delays one heartbeat is not declared dead).
DEFAULT_HEARTBEAT_SECONDS = 30
DEFAULT_CRASH_AFTER_SECONDS = 90
# Created by earlier versions of this file and never acquired by anything: removed on deploy.
_OBSOLETE_GLOBAL_LIMITS = ("gpu:0",)


@dataclass(frozen=True)
class PoolSpec:
    name: str
    resources: str  # "cpu" | "gpu" | "gpus": a CPU, one GPU, or a whole GPU machine per worker


@dataclass(frozen=True)
class DeploymentSpec:
    flow_name: str
    name: str
    entrypoint: str
    pool: str
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    cron: str | None = None


@dataclass(frozen=True)
class Reliability:
    """How fast a silent flow run is declared Crashed (parameters of deploy_all)."""

    heartbeat_seconds: int = DEFAULT_HEARTBEAT_SECONDS
    crash_after_seconds: int = DEFAULT_CRASH_AFTER_SECONDS

    def __post_init__(self) -> None:
        if self.heartbeat_seconds < MIN_HEARTBEAT_SECONDS:
            raise ValueError(f"heartbeat must be at least {MIN_HEARTBEAT_SECONDS} s (Prefect's minimum), "
                             f"got {self.heartbeat_seconds}")
        if self.crash_after_seconds <= self.heartbeat_seconds:
            raise ValueError(f"crash-after ({self.crash_after_seconds} s) must be longer than the heartbeat "
                             f"({self.heartbeat_seconds} s), or healthy runs are crashed")


POOLS = [PoolSpec("mods-cpu", "cpu"), PoolSpec("mods-gpu", "gpu"), PoolSpec("mods-train", "gpus")]
# With --gpu-image the GPU deployments go to docker-type pools of their own (a pool's type
# cannot change, and the process pools keep serving process workers).
DOCKER_POOLS = {"mods-gpu": PoolSpec("mods-gpu-docker", "gpu"), "mods-train": PoolSpec("mods-train-docker", "gpus")}
# Where the image holds the code (docker/Dockerfile's WORKDIR): flow runs start there.
IMAGE_CODE_DIR = "/opt/mods"


@dataclass(frozen=True)
class DockerGpuPool:
    """How the docker work pools run GPU flow runs: one container per flow run."""

    image: str
    # "SOURCE:TARGET[:mode]"; the workspace must be at the same path as in the pipeline's process
    volumes: tuple[str, ...] = ()
    network: str | None = None  # a user-defined network (compose's), or "host"
    user: str | None = None  # "uid:gid" inside the container (default: the image's user)
    gpu_driver: str = "nvidia"

    def job_variables(self, resources: str) -> dict[str, Any]:
        # Docker's device request: one GPU for a stage or shard, every GPU for a whole-machine training.
        request = {"driver": self.gpu_driver, "count": 1 if resources == "gpu" else -1, "capabilities": [["gpu"]]}
        create: dict[str, Any] = {"device_requests": [request]}
        if self.user:
            create["user"] = self.user
        variables: dict[str, Any] = {"image": self.image, "image_pull_policy": "IfNotPresent",
                                     "volumes": list(self.volumes), "auto_remove": True,
                                     "container_create_kwargs": create}
        if self.network == "host":
            variables["network_mode"] = "host"
        elif self.network:
            variables["networks"] = [self.network]
        return variables

DEPLOYMENTS = [
    DeploymentSpec(
        flow_name="mods-pipeline",
        name="weekly",
        entrypoint="flows/mods_pipeline.py:mods_pipeline",
        pool="mods-cpu",
        description="MoDS selection; GPU stages are sent to the mods-gpu pool (routing set by this deployment).",
        parameters={"config": {"execution": {"progress": False}}},
        env={GPU_DEPLOYMENT_ENV: GPU_STAGE_DEPLOYMENT},
        cron="0 3 * * 1",  # Mondays 03:00: picks up new data (source keys change), else all cached
    ),
    DeploymentSpec(
        flow_name="mods-gpu-stage",
        name="gpu",
        entrypoint="flows/gpu_stage.py:gpu_stage",
        pool="mods-gpu",
        description="One MoDS stage (or one shard of a row-wise stage) on a GPU worker (called by mods-pipeline).",
    ),
    DeploymentSpec(
        flow_name="mods-gpu-stage",
        name="train",
        entrypoint="flows/gpu_stage.py:gpu_stage",
        pool="mods-train",
        description="One training stage on a worker that owns a whole GPU machine (DDP/FSDP over all its GPUs; "
        "called by mods-pipeline when deployed with --train-pool).",
    ),
    DeploymentSpec(
        flow_name="mods-evaluate",
        name="evaluate",
        entrypoint="flows/evaluate.py:mods_evaluate",
        pool="mods-cpu",
        description="Does the selection help? MoDS vs same-size baselines on the paper's test sets (GPU stages to mods-gpu).",
        parameters={"config": {"progress": False}},
        env={GPU_DEPLOYMENT_ENV: GPU_STAGE_DEPLOYMENT},
    ),
]


def zombie_automation(reliability: Reliability) -> Any:
    """Prefect's documented zombie-flow automation (docs: "Detect and respond to zombie flows"):
    after a heartbeat (or the run's start), expect another heartbeat or a terminal state
    within the window; if none comes, change the flow run to CRASHED."""
    from prefect.automations import AutomationCore
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description=f"Flow runs send a heartbeat every {reliability.heartbeat_seconds} s; one silent for "
        f"{reliability.crash_after_seconds} s lost its worker and is marked Crashed, so the pipeline retries it.",
        trigger=EventTrigger(
            # Also from the moment a run starts: a worker killed before the run's first
            # heartbeat must not leave it Running for ever.
            after={"prefect.flow-run.heartbeat", "prefect.flow-run.Running"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            # Only our flow runs: a flow elsewhere on the server may send no heartbeats.
            match_related=ResourceSpecification({"prefect.resource.role": "tag",
                                                 "prefect.resource.id": f"prefect.tag.{MODS_TAG}"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=reliability.crash_after_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {reliability.crash_after_seconds} s: the worker was lost "
                f"(automation {ZOMBIE_AUTOMATION!r})",
            )
        ],
    )


def ensure_pools(gpus: int, docker: bool = False) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    limits = {"cpu": None, "gpu": gpus, "gpus": None}
    pools = [(pool, "process") for pool in POOLS]
    if docker:
        pools += [(pool, "docker") for pool in DOCKER_POOLS.values()]
    with get_client(sync_client=True) as client:
        for pool, pool_type in pools:
            limit = limits[pool.resources]
            try:
                client.create_work_pool(WorkPoolCreate(name=pool.name, type=pool_type, concurrency_limit=limit,
                                                       base_job_template=_base_job_template(pool_type)))
            except ObjectAlreadyExists:
                # a redeploy with another --gpus changes the limit (None clears it)
                client.update_work_pool(pool.name, WorkPoolUpdate(concurrency_limit=limit))
        # Older versions created 'gpu:0' and never acquired it: it only misled readers.
        for name in _OBSOLETE_GLOBAL_LIMITS:
            try:
                client.delete_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                pass


def _base_job_template(pool_type: str) -> dict[str, Any]:
    """The worker type's own template (what `prefect work-pool create --type` uses): without
    it the server knows no job variables, and a docker pool would ignore the image."""
    if pool_type == "docker":
        try:
            from prefect_docker.worker import DockerWorker
        except ImportError as error:
            raise ValueError("docker work pools need prefect-docker: pip install 'mods-select[docker]'") from error
        return DockerWorker.get_default_base_job_template()
    from prefect.workers.process import ProcessWorker

    return ProcessWorker.get_default_base_job_template()


def ensure_automation(reliability: Reliability) -> str:
    """Create or update (by name) the zombie-flow automation; returns its id."""
    from prefect.client.orchestration import get_client

    automation = zombie_automation(reliability)
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(ZOMBIE_AUTOMATION)
        for duplicate in existing[1:]:
            client.delete_automation(duplicate.id)
        if existing:
            client.update_automation(existing[0].id, automation)
            return str(existing[0].id)
        return str(client.create_automation(automation))


def deploy_all(gpus: int = 1,
               heartbeat_seconds: int = DEFAULT_HEARTBEAT_SECONDS,
               crash_after_seconds: int = DEFAULT_CRASH_AFTER_SECONDS,
               train_pool: bool = False, docker: DockerGpuPool | None = None) -> list[str]:
    """Create pools, deployments and the zombie-flow automation; returns the deployment ids.

    ``gpus``: how many GPU stages may run at once (the GPUs behind the mods-gpu pool).
    ``train_pool``: send training stages to mods-train (whole machines) instead of mods-gpu.
    ``docker``: run the GPU deployments as containers on the docker pools instead.
    """
    from prefect import Flow
    from prefect.runner.storage import LocalStorage

    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, got {gpus}")
    reliability = Reliability(heartbeat_seconds, crash_after_seconds)
    ensure_pools(gpus, docker=docker is not None)
    ensure_automation(reliability)
    resources = {pool.name: pool.resources for pool in POOLS}
    ids = []
    for spec in DEPLOYMENTS:
        flow = Flow.from_source(source=str(ROOT), entrypoint=spec.entrypoint)
        # Job variables reach the flow run's process environment: the routing and the
        # heartbeat travel with the deployment, whatever parameters a caller passes.
        env = {**spec.env, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(reliability.heartbeat_seconds)}
        if train_pool and GPU_DEPLOYMENT_ENV in spec.env:
            env[TRAIN_DEPLOYMENT_ENV] = TRAIN_STAGE_DEPLOYMENT
        job_variables: dict[str, Any] = {"env": env}
        pool = spec.pool
        in_container = docker is not None and pool in DOCKER_POOLS
        if in_container:
            job_variables.update(docker.job_variables(resources[pool]))
            pool = DOCKER_POOLS[pool].name
        deployment = flow.to_deployment(
            name=spec.name,
            work_pool_name=pool,
            description=spec.description,
            parameters=spec.parameters or None,
            cron=spec.cron,
            job_variables=job_variables,
            tags=[MODS_TAG],
        )
        if in_container:
            # The flow's code is the image's, not this checkout's path on the deploying machine.
            deployment.storage = LocalStorage(IMAGE_CODE_DIR)
        ids.append(str(deployment.apply(image=docker.image if in_container else None)))
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-image", help="run the GPU stages as containers of this image on the docker pools "
                        "mods-gpu-docker / mods-train-docker (default: process workers on mods-gpu / mods-train)")
    parser.add_argument("--volume", action="append", default=[], metavar="SOURCE:TARGET",
                        help="with --gpu-image: a volume for each container (repeat); the workspace must be mounted "
                        "at the path the pipeline uses")
    parser.add_argument("--network", help="with --gpu-image: the containers' network (compose's, or 'host')")
    parser.add_argument("--container-user", metavar="UID:GID",
                        help="with --gpu-image: the user inside the containers (default: the image's)")
    parser.add_argument("--gpus", type=int, default=1,
                        help="GPUs behind the mods-gpu pool: at most this many GPU stages run at once (default 1)")
    parser.add_argument("--heartbeat", type=int, default=DEFAULT_HEARTBEAT_SECONDS,
                        help=f"seconds between flow-run heartbeats (default {DEFAULT_HEARTBEAT_SECONDS}, "
                        f"Prefect's minimum {MIN_HEARTBEAT_SECONDS})")
    parser.add_argument("--train-pool", action="store_true",
                        help="send training stages to the mods-train pool: one worker per GPU machine, seeing all "
                        "its GPUs (needed for full fine-tuning with FSDP when mods-gpu workers own one GPU each)")
    parser.add_argument("--crash-after", type=int, default=DEFAULT_CRASH_AFTER_SECONDS,
                        help=f"seconds without a heartbeat before a flow run is marked Crashed "
                        f"(default {DEFAULT_CRASH_AFTER_SECONDS})")
    args = parser.parse_args()
    if (args.volume or args.network or args.container_user) and not args.gpu_image:
        parser.error("--volume, --network and --container-user need --gpu-image")
    docker = (DockerGpuPool(args.gpu_image, tuple(args.volume), args.network, args.container_user)
              if args.gpu_image else None)
    try:
        ids = deploy_all(args.gpus, args.heartbeat, args.crash_after, args.train_pool, docker)
    except ValueError as error:
        parser.error(str(error))
    for deployment_id in ids:
        print(f"deployed {deployment_id}")
    gpu_workers = ("prefect worker start --pool mods-gpu-docker --type docker   (where the GPUs and Docker are)"
                   if docker else
                   "CUDA_VISIBLE_DEVICES=<i> prefect worker start --pool mods-gpu --limit 1   (one per GPU)")
    print("start workers:  prefect worker start --pool mods-cpu\n"
          f"                {gpu_workers}"
          + ("\n                prefect worker start --pool mods-train --limit 1   (one per GPU machine)"
             if args.train_pool else ""))


if __name__ == "__main__":
    main()
