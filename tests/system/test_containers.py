"""The image and the compose stack built and run for real, and GPU shards as containers of
the docker work pool (tests/containers.py: the engine, the images, compose).

Here (no GPU, no public image registry) the base images are made from Debian's packages,
torch is the CPU wheel on this machine's disk, and the GPU worker's device request is
accepted through a stand-in hook (tests/bin) and runs on the CPU. Not tested: a real GPU
inside a container.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from containers import (
    BASE_IMAGE,
    POSTGRES_IMAGE,
    TEST_PROJECT_PREFIX,
    ComposeStack,
    DockerEngine,
    DockerState,
    DockerUnavailable,
    build_image,
    clean_up,
    docker,
    docker_disk_mb,
    ensure_base_images,
    image_size_mb,
)
from pipeline_helpers import tiny_config

pytestmark = [pytest.mark.containers, pytest.mark.realserver]

IMAGE = "mods:test-cpu"  # the runtime target: the tests mount their tiny model and pool
FULL_IMAGE = f"{IMAGE}-full"  # the default target (with the packaged models), built and checked once
TEST_IMAGES = (IMAGE, FULL_IMAGE)  # removed at the end, with every container of theirs
# Kept between sessions on purpose: the Debian-made bases (2 min to make) and the build stage,
# whose dependency layer spares the next build its pip install (a change of pyproject.toml
# replaces it). `docker rmi` them to reclaim the disk.
KEPT_IMAGES = (BASE_IMAGE, POSTGRES_IMAGE, f"{IMAGE}-build")
RUN_TIMEOUT_SECONDS = 900
CRASH_AFTER_SECONDS = 60


def _unavailable(message: str):
    if os.environ.get("CI"):
        pytest.fail(message)  # in CI a missing engine is a failure, never a silent skip
    pytest.skip(message)


@pytest.fixture(scope="module")
def shared_dir():
    """A folder every container user can read (pytest's are 0700): data, models, workspaces."""
    root = Path(tempfile.mkdtemp(prefix="mods-containers-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def image(shared_dir: Path):
    """The engine (started here when none runs), the base images and the mods image, built
    once for the module. At the end everything the tests made is removed but the base
    images and the build stage (the next build's cache), and the engine started here is
    stopped; anything left is an error of this fixture, also after a failed test."""
    try:
        engine = DockerEngine(shared_dir).start()
    except DockerUnavailable as error:
        _unavailable(str(error))
    before = DockerState(TEST_IMAGES)
    try:
        ensure_base_images()
        if not engine.runs_containers(BASE_IMAGE):
            # A copy-on-write driver that starts but cannot mount here: the next driver.
            print(f"\nthe engine's {engine.driver} storage cannot run a container; falling back")
            engine.fall_back()
            before = DockerState(TEST_IMAGES)
            ensure_base_images()
        seconds = build_image(IMAGE, shared_dir / "build.log")
        print(f"\nimages {IMAGE} and {FULL_IMAGE}: built in {seconds:.0f} s on {engine.driver} storage (layers "
              f"already cached are reused), {image_size_mb(IMAGE):.0f} and {image_size_mb(FULL_IMAGE):.0f} MB; "
              f"base {BASE_IMAGE} {image_size_mb(BASE_IMAGE):.0f} MB")
        yield IMAGE
    finally:
        try:
            left = clean_up(before, remove_images=TEST_IMAGES, keep_images=KEPT_IMAGES)
            print(f"\n/var/lib/docker after the container tests: {docker_disk_mb():,.0f} MB "
                  f"({engine.driver}; kept: {', '.join(KEPT_IMAGES)})")
        finally:
            engine.stop()
        assert not left, f"the container tests left {left}"


def _data(shared_dir: Path, tiny_llama: Path) -> Path:
    """The tiny pool and model where the containers see them."""
    data = shared_dir / "data"
    if not data.exists():
        data.mkdir()
        shutil.copytree(tiny_llama, data / "tiny-llama")
        tiny_config(data, tiny_llama)  # writes data/pool.jsonl
        for path in data.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
    return data


def _config(data: Path, workspace: str, seen_as: str | None = None, **execution: Any) -> dict[str, Any]:
    """The tiny pipeline's config on the pool and model in ``data``, which the process that
    runs it sees at ``seen_as`` (the containers' /data)."""
    config = tiny_config(data, data / "tiny-llama").model_dump(mode="json")
    if seen_as:
        config = json.loads(json.dumps(config).replace(json.dumps(str(data))[1:-1], seen_as))
    config["workspace"] = workspace
    if execution:
        config["execution"] = {"progress": False, **execution}
    else:
        del config["execution"]  # as a caller passes it: where stages run is the deployment's
    return config


def _wait_final(run_id, timeout: float, explain) -> Any:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with get_client(sync_client=True) as client:
                run = client.read_flow_run(run_id)
        except (httpx.HTTPError, RuntimeError):
            run = None
        if run is not None and run.state is not None and run.state.is_final():
            return run
        time.sleep(2)
    pytest.fail(f"flow run {run_id} not final after {timeout:.0f} s\n{explain()}")


def _gpu_runs() -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["gpu"])),
                                     sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=200)


def _mods_run(config: dict[str, Any], folder: Path) -> Path:
    """`mods run` on this machine for the same config; returns its selected.jsonl."""
    config_file = folder / "config.yaml"
    config_file.write_text(json.dumps({**config, "execution": {"progress": False}}))  # JSON is YAML
    result = subprocess.run([str(Path(sys.executable).parent / "mods"), "run", "--config", str(config_file)],
                            capture_output=True, text=True, timeout=900, cwd=folder)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if "selected data (Alpaca JSONL)" in line)
    return Path(line.split(": ", 1)[1].strip())


def test_the_full_image_serves_the_packaged_models_offline_to_its_user(image: str):
    """The default target: the runtime plus the prepared models, read with no network as
    the image's unprivileged user (what `mods run` in the image uses by default)."""
    result = docker("run", "--rm", "--network", "none", FULL_IMAGE, "mods", "prepare-models", timeout=600,
                    check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    paths = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines() if ": /" in line)
    assert paths["smollm2-135m-instruct"].startswith("/opt/mods-cache/"), result.stdout
    assert "downloading" not in result.stdout + result.stderr
    assert docker("run", "--rm", FULL_IMAGE, "id", "-un").stdout.strip() == "mods"
    # The runtime the other tests use holds no prepared model: they come from the mounts.
    assert docker("run", "--rm", image, "sh", "-c", "ls -A /opt/mods-cache 2>/dev/null | wc -l").stdout.strip() \
        == "0"


def test_compose_stack_runs_the_pipeline_and_survives_a_killed_gpu_worker_container(
        image: str, shared_dir: Path, tiny_llama_dir: Path, tmp_path: Path):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
    from realserver import free_port

    data = _data(shared_dir, tiny_llama_dir)
    port = free_port()
    auth = f"mods:{secrets.token_hex(8)}"
    env = {"PREFECT_AUTH_STRING": auth, "POSTGRES_PASSWORD": secrets.token_hex(12),
           "POSTGRES_IMAGE": POSTGRES_IMAGE, "MODS_IMAGE": image, "MODS_GPU_IMAGE": image,
           "MODS_BIND": "127.0.0.1", "MODS_PORT": str(port), "MODS_UI_API_URL": f"http://127.0.0.1:{port}/api",
           "MODS_DATA": str(data)}
    project = f"{TEST_PROJECT_PREFIX}{secrets.token_hex(3)}"
    api = f"http://127.0.0.1:{port}/api"
    started = time.monotonic()
    with ComposeStack.up(project, env, tmp_path) as stack:
        print(f"\ncompose up: {time.monotonic() - started:.0f} s")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{api}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            pytest.fail(f"server not healthy\n{stack.logs()}")
        # Closed: without the auth string the API refuses; only 127.0.0.1 is published.
        assert httpx.get(f"{api}/flows/filter", timeout=10).status_code in (401, 403) or \
            httpx.post(f"{api}/flows/filter", timeout=10).status_code in (401, 403)
        server = stack.inspect("server")
        assert [b["HostIp"] for b in server["HostConfig"]["PortBindings"]["4200/tcp"]] == ["127.0.0.1"]
        assert stack.inspect("postgres")["HostConfig"]["PortBindings"] in ({}, None)
        # The GPU worker asks the engine for a GPU (a device request), and runs as the image's user.
        gpu_worker = stack.inspect("gpu-worker")
        (request,) = gpu_worker["HostConfig"]["DeviceRequests"]
        assert request["Driver"] == "nvidia" and request["Count"] == 1 and request["Capabilities"] == [["gpu"]]
        # the engine's device driver put the device list into the worker's own environment
        worker_env = docker("exec", gpu_worker["Id"], "cat", "/proc/1/environ").stdout.split("\0")
        assert "NVIDIA_VISIBLE_DEVICES=0" in worker_env, worker_env
        assert docker("exec", gpu_worker["Id"], "id", "-un").stdout.strip() == "mods"

        print(f"server healthy: {time.monotonic() - started:.0f} s")
        stack.run("run", "--rm", "cpu-worker", "python", "deployments/deploy.py", "--heartbeat", "30",
                  "--crash-after", str(CRASH_AFTER_SECONDS), timeout=300)
        config = _config(data, "/opt/mods/work/run", seen_as="/data")
        with temporary_settings(updates={PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: auth}):
            pipeline = run_deployment("mods-pipeline/weekly", parameters={"config": config}, timeout=0)
            # Kill the GPU worker's container while it runs a stage; start another.
            deadline = time.monotonic() + 600
            while not any(r.state.is_running() for r in _gpu_runs()):
                assert time.monotonic() < deadline, f"no GPU stage started\n{stack.logs()}"
                time.sleep(1)
            victim = next(r for r in _gpu_runs() if r.state.is_running())
            docker("kill", stack.container("gpu-worker"))
            stack.run("rm", "-f", "gpu-worker")
            stack.run("up", "-d", "--no-build", "gpu-worker", timeout=900)
            run = _wait_final(pipeline.id, RUN_TIMEOUT_SECONDS, stack.logs)
            assert run.state.is_completed(), f"{run.state.message}\n{stack.logs()}"
            print(f"pipeline through the stack, a GPU worker container killed in {victim.name}: "
                  f"{run.total_run_time.total_seconds():.0f} s of flow run; {time.monotonic() - started:.0f} s since up")
            tries = [r for r in _gpu_runs() if r.name.split("-try")[0] == victim.name.split("-try")[0]]
            assert "Crashed" in [r.state.name for r in tries] and tries[-1].state.is_completed(), \
                [(r.name, r.state.name) for r in tries]
        export = stack.run("exec", "-T", "cpu-worker", "sh", "-c",
                           "cat /opt/mods/work/run/artifacts/export/*/selected.jsonl").stdout
    assert export.strip(), "no selection exported"
    # The same selection as `mods run` here, for the same config (data and model at this
    # machine's path instead of /data).
    expected = _mods_run(_config(data, str(tmp_path / "local")), tmp_path)
    assert export == expected.read_text()


def test_gpu_shards_as_containers_of_the_docker_pool_equal_in_process_shards(
        image: str, shared_dir: Path, tiny_llama_dir: Path):
    """deploy.py --gpu-image: every GPU stage and shard is a container of its own (the docker
    worker starts one per flow run, with a device request and the shared workspace)."""
    from realserver import RealStack, StackUnavailable, postgres_bin_dir

    from deployments.deploy import DockerGpuPool
    from flows.mods_pipeline import mods_pipeline
    from mods.config import PipelineConfig

    if postgres_bin_dir() is None:
        _unavailable("PostgreSQL binaries not found: install Debian's 'postgresql' package (.ci/run does)")
    data = _data(shared_dir, tiny_llama_dir)
    workspace = shared_dir / "docker-pool"
    # The workspace and the data at the same path in the containers; root, like this process.
    pool = DockerGpuPool(image, volumes=(f"{shared_dir}:{shared_dir}",), network="host", user="0:0")
    try:
        context = RealStack.start(gpus=2, docker=pool)
        stack = context.__enter__()
    except StackUnavailable as error:
        _unavailable(str(error))
    try:
        stack.start_worker("mods-cpu", name="cpu-0")
        # creating a container copies the image on vfs: longer than the SDK's 60 s on a busy machine
        stack.start_worker("mods-gpu-docker", name="docker-0", worker_type="docker", DOCKER_CLIENT_TIMEOUT="600")
        config = _config(data, str(workspace))
        with stack.settings():
            from prefect.deployments import run_deployment

            config["execution"] = {"rows_per_shard": 16}
            started = time.monotonic()
            pipeline = run_deployment("mods-pipeline/weekly", parameters={"config": config}, timeout=0)
            run = _wait_final(pipeline.id, RUN_TIMEOUT_SECONDS, stack.worker_logs)
            elapsed = time.monotonic() - started
            assert run.state.is_completed(), f"{run.state.message}\n{stack.worker_logs()}"
            runs = [r for r in _gpu_runs() if r.parameters.get("workspace") == str(workspace)]
            shards = [r.name for r in runs if "-shard" in r.name and r.state.is_completed()]
            assert len([s for s in shards if s.startswith("quality-shard")]) == 3, shards
            # Every GPU flow run was a container of its own: the docker worker records
            # "<engine address>:<container id>" as the run's infrastructure.
            containers = [r.infrastructure_pid.rsplit(":", 1)[-1] for r in runs if r.state.is_completed()]
            assert len(containers) == len(set(containers)) >= 9 and all(len(c) == 64 for c in containers), \
                [(r.name, r.infrastructure_pid) for r in runs]
            print(f"\ndocker pool: {len(containers)} GPU flow runs, each a container; pipeline {elapsed:.0f} s")
            local = PipelineConfig.model_validate({**config, "workspace": str(shared_dir / "in-process"),
                                                   "execution": {"rows_per_shard": 16, "progress": False}})
            expected = mods_pipeline(config=local, return_state=True).result()
        (export,) = workspace.glob("artifacts/export/[!.]*/selected.jsonl")
        assert export.read_bytes() == Path(expected["selected_jsonl"]).read_bytes()
        (scores,) = workspace.glob("artifacts/quality/[!.]*/scores.parquet")
        (local_scores,) = (shared_dir / "in-process").glob("artifacts/quality/[!.]*/scores.parquet")
        import pandas as pd

        pd.testing.assert_frame_equal(pd.read_parquet(scores), pd.read_parquet(local_scores))
    finally:
        context.__exit__(None, None, None)
