"""The one place that declares work pools and deployments (knowledge-graph style).

    python deployments/deploy.py                  # pools + deployments on $PREFECT_API_URL
    python deployments/deploy.py --image mods:gpu # docker pools instead of process pools

Two pools: ``mods-cpu`` runs the pipeline flow (and every CPU stage in its process);
``mods-gpu`` runs ``mods-gpu-stage``, one stage per flow run, on a machine with a GPU.
A global concurrency limit ``gpu:0`` keeps one stage per GPU.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class PoolSpec:
    name: str
    resources: str  # "cpu" | "gpu": what the machines behind it have
    concurrency: int | None


@dataclass(frozen=True)
class DeploymentSpec:
    flow_name: str
    name: str
    entrypoint: str
    pool: str
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)
    cron: str | None = None
    concurrency_limit: int | None = None


POOLS = [
    PoolSpec("mods-cpu", "cpu", concurrency=None),
    PoolSpec("mods-gpu", "gpu", concurrency=1),
]

GPU_STAGE_DEPLOYMENT = "mods-gpu-stage/gpu"

DEPLOYMENTS = [
    DeploymentSpec(
        flow_name="mods-pipeline",
        name="weekly",
        entrypoint="flows/mods_pipeline.py:mods_pipeline",
        pool="mods-cpu",
        description="MoDS selection; GPU stages are sent to the mods-gpu pool.",
        parameters={"config": {"execution": {"gpu_deployment": GPU_STAGE_DEPLOYMENT, "progress": False}}},
        cron="0 3 * * 1",  # Mondays 03:00: picks up new data (source keys change), else all cached
    ),
    DeploymentSpec(
        flow_name="mods-gpu-stage",
        name="gpu",
        entrypoint="flows/gpu_stage.py:gpu_stage",
        pool="mods-gpu",
        description="One MoDS stage on a GPU worker (called by mods-pipeline).",
        concurrency_limit=1,
    ),
]


def ensure_pools(pool_type: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        for pool in POOLS:
            try:
                client.create_work_pool(WorkPoolCreate(name=pool.name, type=pool_type, concurrency_limit=pool.concurrency))
            except ObjectAlreadyExists:
                pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="gpu:0", limit=1))
        except ObjectAlreadyExists:
            pass


def deploy_all(image: str | None = None) -> list[str]:
    """Create pools and deployments; returns the deployment ids."""
    from prefect import Flow

    ensure_pools("docker" if image else "process")
    ids = []
    for spec in DEPLOYMENTS:
        flow = Flow.from_source(source=str(ROOT), entrypoint=spec.entrypoint)
        ids.append(str(flow.deploy(
            name=spec.name,
            work_pool_name=spec.pool,
            description=spec.description,
            parameters=spec.parameters or None,
            cron=spec.cron,
            concurrency_limit=spec.concurrency_limit,
            image=image,
            build=False,
            push=False,
            job_variables={"image": image} if image else None,
            print_next_steps=False,
            ignore_warnings=True,
        )))
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", help="docker image for docker-type pools (default: process pools)")
    args = parser.parse_args()
    for deployment_id in deploy_all(args.image):
        print(f"deployed {deployment_id}")
    print("start workers:  prefect worker start --pool mods-cpu   |   prefect worker start --pool mods-gpu")


if __name__ == "__main__":
    main()
