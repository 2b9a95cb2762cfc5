"""The declared pools, deployments and automation register on a Prefect server as declared."""

from __future__ import annotations

import json

import pytest


@pytest.mark.flow
def test_deploy_all_declares_pools_routing_heartbeats_and_zombie_automation(prefect_harness):
    from prefect import Flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.client.schemas.objects import StateType
    from prefect.events.schemas.automations import Posture
    from prefect.exceptions import ObjectAlreadyExists

    from deployments.deploy import (
        DEPLOYMENTS,
        GPU_STAGE_DEPLOYMENT,
        MODS_TAG,
        POOLS,
        ROOT,
        TRAIN_STAGE_DEPLOYMENT,
        ZOMBIE_AUTOMATION,
        deploy_all,
        ensure_pools,
    )
    from flows.executors import GPU_DEPLOYMENT_ENV, TRAIN_DEPLOYMENT_ENV

    # What earlier versions left on a server (a 'gpu:0' limit, the GPU deployment limited to
    # one run at a time): the next deploy removes both.
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="gpu:0", limit=1))
        except ObjectAlreadyExists:
            pass
    ensure_pools(gpus=1)
    Flow.from_source(source=str(ROOT), entrypoint="flows/gpu_stage.py:gpu_stage").deploy(
        name="gpu", work_pool_name="mods-gpu", concurrency_limit=1, build=False, push=False,
        print_next_steps=False, ignore_warnings=True)
    with get_client(sync_client=True) as client:
        assert client.read_deployment_by_name(GPU_STAGE_DEPLOYMENT).global_concurrency_limit.limit == 1

    ids = deploy_all(gpus=2, heartbeat_seconds=30, crash_after_seconds=45)
    assert len(ids) == len(DEPLOYMENTS)
    with get_client(sync_client=True) as client:
        pools = {pool.name: pool for pool in client.read_work_pools()}
        assert {p.name for p in POOLS} <= set(pools)
        # GPU stages are bounded by the GPUs declared, nothing else.
        assert pools["mods-gpu"].concurrency_limit == 2
        assert pools["mods-cpu"].concurrency_limit is None
        assert "gpu:0" not in {limit.name for limit in client.read_global_concurrency_limits()}
        pipeline = client.read_deployment_by_name("mods-pipeline/weekly")
        gpu = client.read_deployment_by_name(GPU_STAGE_DEPLOYMENT)
        assert pipeline.work_pool_name == "mods-cpu" and gpu.work_pool_name == "mods-gpu"
        assert gpu.global_concurrency_limit is None
        # Routing and heartbeats travel in the job variables (the flow run's environment),
        # never in parameters that a caller's `config` would replace.
        assert pipeline.job_variables["env"][GPU_DEPLOYMENT_ENV] == GPU_STAGE_DEPLOYMENT
        assert "gpu_deployment" not in json.dumps(pipeline.parameters)
        for deployment in (pipeline, gpu):
            assert deployment.job_variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
        assert GPU_DEPLOYMENT_ENV not in gpu.job_variables["env"]
        # Without --train-pool, training goes where the other GPU stages go.
        assert TRAIN_DEPLOYMENT_ENV not in pipeline.job_variables["env"]
        assert client.read_deployment_by_name(TRAIN_STAGE_DEPLOYMENT).work_pool_name == "mods-train"
        # Every run of every deployment carries the tag the zombie automation watches.
        assert all(MODS_TAG in client.read_deployment(i).tags for i in ids)
        # The UI form: the typed config.
        assert "config" in pipeline.parameter_openapi_schema["properties"]
        assert [s.schedule.cron for s in pipeline.schedules] == ["0 3 * * 1"]
        assert set(gpu.parameter_openapi_schema["properties"]) == {"workspace", "run", "verify", "plan_id", "shard"}

        [automation] = client.read_automations_by_name(ZOMBIE_AUTOMATION)
        trigger = automation.trigger
        assert trigger.posture == Posture.Proactive and trigger.within.total_seconds() == 45
        assert trigger.after == {"prefect.flow-run.heartbeat", "prefect.flow-run.Running"}
        assert {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                "prefect.flow-run.Crashed", "prefect.flow-run.Cancelled"} == trigger.expect
        assert trigger.for_each == {"prefect.resource.id"}
        # Scoped to our runs: a flow elsewhere on the server that sends no heartbeats is left alone.
        [related] = trigger.match_related if isinstance(trigger.match_related, list) else [trigger.match_related]
        assert related.root == {"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{MODS_TAG}"}
        [action] = automation.actions
        assert action.type == "change-flow-run-state" and action.state == StateType.CRASHED
        assert automation.enabled

    # Idempotent: deploying again updates (new GPU count, new window), creates no duplicates.
    assert len(deploy_all(gpus=3, heartbeat_seconds=30, crash_after_seconds=120)) == len(DEPLOYMENTS)
    with get_client(sync_client=True) as client:
        assert client.read_work_pool("mods-gpu").concurrency_limit == 3
        [automation] = client.read_automations_by_name(ZOMBIE_AUTOMATION)
        assert automation.trigger.within.total_seconds() == 120
    # A typo inside a section is refused by the server when a run is created (the UI form,
    # the API, `prefect deployment run` and run_deployment all create runs there).
    from prefect.deployments import run_deployment

    with pytest.raises(Exception, match="epoch") as refused:
        run_deployment("mods-pipeline/weekly", parameters={"config": {"seed_training": {"epoch": 1}}}, timeout=0)
    print(f"\nrefused: {type(refused.value).__name__}: {str(refused.value)[:300]}")

    # --train-pool: the pipeline (and the evaluation) send training to whole machines.
    deploy_all(train_pool=True)
    with get_client(sync_client=True) as client:
        for name in ("mods-pipeline/weekly", "mods-evaluate/evaluate"):
            env = client.read_deployment_by_name(name).job_variables["env"]
            assert env[TRAIN_DEPLOYMENT_ENV] == TRAIN_STAGE_DEPLOYMENT and env[GPU_DEPLOYMENT_ENV] == GPU_STAGE_DEPLOYMENT
    deploy_all()  # back to the defaults for the other tests of this session
    with get_client(sync_client=True) as client:
        assert client.read_work_pool("mods-gpu").concurrency_limit == 1
        assert TRAIN_DEPLOYMENT_ENV not in client.read_deployment_by_name("mods-pipeline/weekly").job_variables["env"]


@pytest.mark.parametrize("heartbeat, crash_after, message", [
    (10, 60, "at least 30"),  # Prefect's settings refuse < 30 s: the flow run would not even start
    (30, 30, "longer than the heartbeat"),
])
def test_reliability_settings_that_would_break_runs_are_refused(heartbeat: int, crash_after: int, message: str):
    from deployments.deploy import deploy_all

    with pytest.raises(ValueError, match=message):
        deploy_all(heartbeat_seconds=heartbeat, crash_after_seconds=crash_after)


def test_compose_is_closed_by_default():
    """docker/compose.yaml as written (tests/system/test_containers.py runs it): secrets only from docker/.env,
    only the server's port published and on 127.0.0.1 unless MODS_BIND says otherwise,
    the server asks for the auth string and the workers send it."""
    import re

    import yaml

    from deployments.deploy import ROOT

    text = (ROOT / "docker" / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    assert {name for name, service in services.items() if service.get("ports")} == {"server"}
    [port] = services["server"]["ports"]
    assert port.startswith("${MODS_BIND:-127.0.0.1}:")
    server_env = services["server"]["environment"]
    assert server_env["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_AUTH_STRING:?")
    assert "${POSTGRES_PASSWORD:?" in server_env["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    for worker in ("cpu-worker", "gpu-worker"):
        env = services[worker]["environment"]
        assert env["PREFECT_API_AUTH_STRING"].startswith("${PREFECT_AUTH_STRING:?")
        assert env["PREFECT_API_URL"] == "http://server:4200/api"
    # Every variable the file needs is in the example env file the README tells users to copy.
    example = (ROOT / "docker" / ".env.example").read_text()
    defined = set(re.findall(r"^([A-Z_]+)=", example, flags=re.M))
    used = set(re.findall(r"\$\{([A-Z_]+)", text))
    assert used <= defined, used - defined
    # The secrets ship empty: `:?` then stops `docker compose up` until the user sets them.
    values = dict(re.findall(r"^([A-Z_]+)=(.*)$", example, flags=re.M))
    assert values["PREFECT_AUTH_STRING"] == "" and values["POSTGRES_PASSWORD"] == ""
    assert (ROOT / "docker" / ".gitignore").read_text().split().count(".env") == 1  # secrets stay out of git


@pytest.mark.flow
def test_gpu_image_sends_gpu_deployments_to_docker_pools_with_a_device_request(prefect_harness):
    """--gpu-image: the GPU deployments become containers of the image on docker-type pools
    (one GPU each, every GPU for training), with the workspace volume, starting in the
    image's code folder; the CPU deployments and the process pools stay as they were."""
    from prefect.client.orchestration import get_client

    from deployments.deploy import (
        DEPLOYMENTS,
        GPU_STAGE_DEPLOYMENT,
        IMAGE_CODE_DIR,
        TRAIN_STAGE_DEPLOYMENT,
        DockerGpuPool,
        deploy_all,
    )

    docker = DockerGpuPool("mods:cpu", volumes=("mods_work:/opt/mods/work",), network="mods_default", user="0:0")
    assert len(deploy_all(gpus=2, docker=docker)) == len(DEPLOYMENTS)
    try:
        with get_client(sync_client=True) as client:
            pools = {pool.name: pool for pool in client.read_work_pools()}
            assert pools["mods-gpu-docker"].type == "docker" and pools["mods-train-docker"].type == "docker"
            assert pools["mods-gpu"].type == "process" and pools["mods-gpu-docker"].concurrency_limit == 2
            # the pool knows the docker worker's job variables (else the image would be ignored)
            assert "image" in pools["mods-gpu-docker"].base_job_template["variables"]["properties"]
            gpu = client.read_deployment_by_name(GPU_STAGE_DEPLOYMENT)
            train = client.read_deployment_by_name(TRAIN_STAGE_DEPLOYMENT)
            pipeline = client.read_deployment_by_name("mods-pipeline/weekly")
            assert (gpu.work_pool_name, train.work_pool_name, pipeline.work_pool_name) == (
                "mods-gpu-docker", "mods-train-docker", "mods-cpu")
            assert gpu.job_variables["image"] == "mods:cpu"
            assert gpu.job_variables["volumes"] == ["mods_work:/opt/mods/work"]
            assert gpu.job_variables["networks"] == ["mods_default"]
            assert gpu.job_variables["container_create_kwargs"] == {
                "device_requests": [{"driver": "nvidia", "count": 1, "capabilities": [["gpu"]]}], "user": "0:0"}
            assert train.job_variables["container_create_kwargs"]["device_requests"][0]["count"] == -1
            assert gpu.job_variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
            assert gpu.pull_steps == [{"prefect.deployments.steps.set_working_directory": {
                "directory": IMAGE_CODE_DIR}}]
            assert "image" not in pipeline.job_variables and pipeline.pull_steps[0][
                "prefect.deployments.steps.set_working_directory"]["directory"] != IMAGE_CODE_DIR
    finally:
        deploy_all()  # back to the defaults for the other tests of this session
    with get_client(sync_client=True) as client:
        assert client.read_deployment_by_name(GPU_STAGE_DEPLOYMENT).work_pool_name == "mods-gpu"


def test_docker_options_without_an_image_are_refused():
    import subprocess
    import sys

    from deployments.deploy import ROOT

    result = subprocess.run([sys.executable, str(ROOT / "deployments" / "deploy.py"), "--network", "host"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "need --gpu-image" in result.stderr.strip().splitlines()[-1]
