"""The declared pools and deployments register on a Prefect server as declared."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.flow


def test_deploy_all_creates_pools_deployments_and_gpu_limit(prefect_harness):
    from prefect.client.orchestration import get_client

    from deployments.deploy import DEPLOYMENTS, GPU_STAGE_DEPLOYMENT, POOLS, deploy_all

    ids = deploy_all()
    assert len(ids) == len(DEPLOYMENTS)
    with get_client(sync_client=True) as client:
        pools = {pool.name: pool for pool in client.read_work_pools()}
        assert {p.name for p in POOLS} <= set(pools)
        assert pools["mods-gpu"].concurrency_limit == 1
        pipeline = client.read_deployment_by_name("mods-pipeline/weekly")
        gpu = client.read_deployment_by_name(GPU_STAGE_DEPLOYMENT)
        assert pipeline.work_pool_name == "mods-cpu" and gpu.work_pool_name == "mods-gpu"
        # The UI form: the typed config, with the GPU deployment preset.
        assert "config" in pipeline.parameter_openapi_schema["properties"]
        assert pipeline.parameters["config"]["execution"]["gpu_deployment"] == GPU_STAGE_DEPLOYMENT
        assert [s.schedule.cron for s in pipeline.schedules] == ["0 3 * * 1"]
        assert set(gpu.parameter_openapi_schema["properties"]) == {"workspace", "stage", "params", "inputs"}
        limits = {limit.name: limit.limit for limit in client.read_global_concurrency_limits()}
        assert limits.get("gpu:0") == 1
    # Idempotent: running it again updates, does not fail.
    assert len(deploy_all()) == len(DEPLOYMENTS)
