"""The deployments on a real stack (tests/realserver.py): PostgreSQL, `prefect server start`
with an auth string, the zombie-flow automation, one process worker per pool.

One stack for the module; each run has its own workspace. The caller's `config` never
carries `execution`: where GPU stages run must come from the deployment.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from pipeline_helpers import tiny_config
from realserver import RealStack, StackUnavailable, postgres_bin_dir

pytestmark = pytest.mark.realserver

HEARTBEAT_SECONDS = 30  # Prefect's minimum
CRASH_AFTER_SECONDS = 60  # a silent flow run is Crashed after this (production default: 90)
RUN_TIMEOUT_SECONDS = 600
GPU_STAGES = {"quality", "embed", "seed_train", "answers", "necessity", "final_train"}
PIPELINE_DEPLOYMENT = "mods-pipeline/weekly"


@pytest.fixture(scope="module")
def stack():
    if postgres_bin_dir() is None:
        message = ("PostgreSQL binaries not found: install Debian's 'postgresql' package (.ci/run does) "
                   "or set MODS_PG_BIN")
        if os.environ.get("CI"):
            pytest.fail(message)  # in CI a missing database is a failure, never a silent skip
        pytest.skip(message)
    try:
        context = RealStack.start(gpus=1, heartbeat_seconds=HEARTBEAT_SECONDS, crash_after_seconds=CRASH_AFTER_SECONDS)
        real = context.__enter__()
    except StackUnavailable as error:
        if os.environ.get("CI"):
            pytest.fail(str(error))
        pytest.skip(str(error))
    try:
        real.start_worker("mods-cpu", name="cpu-0")
        real.start_worker("mods-gpu", name="gpu-0", limit=1)
        yield real
    finally:
        context.__exit__(None, None, None)


def caller_config(tmp_path: Path, tiny_llama: Path, **overrides: Any) -> dict[str, Any]:
    """The tiny pipeline's config as a caller passes it: JSON, without `execution`."""
    config = tiny_config(tmp_path, tiny_llama).model_dump(mode="json")
    del config["execution"]
    for section, values in overrides.items():
        config[section] = {**config[section], **values}
    return config


def submit(parameters: dict[str, Any]):
    from prefect.deployments import run_deployment

    return run_deployment(PIPELINE_DEPLOYMENT, parameters=parameters, timeout=0)


def read_run(run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def wait_final(stack: RealStack, run_id, timeout: float = RUN_TIMEOUT_SECONDS):
    """Poll until the run is final (riding out a server that is briefly away)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            run = read_run(run_id)
        except (httpx.HTTPError, RuntimeError):
            time.sleep(2)
            continue
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(2)
    pytest.fail(f"flow run {run_id} not final after {timeout:.0f} s\n{stack.worker_logs()}")


def gpu_runs(workspace: str) -> list:
    """The gpu-stage flow runs that worked on this workspace, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["gpu"])),
                                     sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=200)
    return sorted((r for r in runs if r.parameters.get("workspace") == workspace), key=lambda r: r.created)


def markers(workspace: str) -> dict[str, tuple[int, str]]:
    """Every completed artifact's marker: (mtime_ns, content), by stage/key."""
    root = Path(workspace) / "artifacts"
    return {f"{m.parent.parent.name}/{m.parent.name}": (m.stat().st_mtime_ns, m.read_text())
            for m in root.glob("*/*/_SUCCESS.json")}


# A flow of someone else's on the same server: no `mods` tag, no heartbeats, runs longer
# than the crash window. The zombie automation must leave it alone.
BYSTANDER = """
import sys, time
from prefect import flow

@flow(name="bystander")
def bystander(seconds: float) -> None:
    time.sleep(seconds)

state = bystander(float(sys.argv[1]), return_state=True)
print("STATE", state.name, flush=True)
"""


def start_bystander(stack: RealStack, tmp_path: Path, seconds: float):
    import subprocess
    import sys

    script = tmp_path / "bystander.py"
    script.write_text(BYSTANDER)
    env = stack.client_env(tmp_path / "bystander-home")
    env.pop("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", None)
    return subprocess.Popen([sys.executable, str(script), str(seconds)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def states_of_flow(name: str) -> list[list[str]]:
    """Every state each run of the flow ``name`` went through."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])))
        return [[state.name for state in client.read_flow_run_states(run.id)] for run in runs]


def explain(stack: RealStack, run) -> str:
    return f"{run.name}: {run.state.type.value if run.state else None} {run.state.message if run.state else ''}\n" \
           f"{stack.worker_logs()}"


def test_unauthenticated_requests_are_refused(stack: RealStack):
    from deployments.deploy import DEPLOYMENTS

    assert httpx.get(f"{stack.api_url}/health", timeout=10).status_code == 200
    assert httpx.post(f"{stack.api_url}/deployments/filter", json={}, timeout=10).status_code == 401
    assert httpx.post(f"{stack.api_url}/deployments/filter", json={}, timeout=10,
                      auth=("mods", "wrong")).status_code == 401
    user, password = stack.auth.split(":", 1)
    answer = httpx.post(f"{stack.api_url}/deployments/filter", json={}, timeout=10, auth=(user, password))
    assert answer.status_code == 200 and {d["name"] for d in answer.json()} == {spec.name for spec in DEPLOYMENTS}


@pytest.fixture(scope="module")
def tiny_run(stack: RealStack, tiny_llama_dir: Path, tmp_path_factory):
    """The tiny pipeline through the deployment, once: (caller's config, final flow run, seconds)."""
    config = caller_config(tmp_path_factory.mktemp("tiny-run"), tiny_llama_dir)
    started = time.monotonic()
    run = wait_final(stack, submit({"config": config}).id)
    return config, run, time.monotonic() - started


def test_caller_config_without_execution_still_runs_gpu_stages_on_the_gpu_pool(stack: RealStack, tiny_run):
    config, run, elapsed = tiny_run
    assert run.state.is_completed(), explain(stack, run)
    assert run.work_pool_name == "mods-cpu"
    runs = gpu_runs(config["workspace"])
    assert {r.parameters["run"]["stage"] for r in runs} == GPU_STAGES
    assert all(r.work_pool_name == "mods-gpu" and r.state.is_completed() for r in runs), \
        [(r.name, r.work_pool_name, r.state.name) for r in runs]
    exports = list(Path(config["workspace"], "artifacts", "export").glob("*/selected.parquet"))
    assert len(exports) == 1
    print(f"\n[realserver] tiny run through {PIPELINE_DEPLOYMENT}: {elapsed:.0f} s, {len(runs)} GPU flow runs")


def test_gpu_worker_killed_mid_stage_is_crashed_resubmitted_and_the_run_completes(
        stack: RealStack, tiny_llama_dir: Path, tmp_path: Path):
    # Enough steps on the tiny model that seed_train is still training when it is killed,
    # with a checkpoint every 10 steps to show that it is.
    config = caller_config(tmp_path, tiny_llama_dir, seed_training={"epochs": 100, "checkpoint_every": 10})
    workspace = config["workspace"]
    bystander = start_bystander(stack, tmp_path, CRASH_AFTER_SECONDS + 30)
    pipeline_run = submit({"config": config})

    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while True:
        seed = [r for r in gpu_runs(workspace) if r.parameters["run"]["stage"] == "seed_train"]
        if seed and seed[0].state.is_running():
            break
        pipeline = read_run(pipeline_run.id)
        assert not pipeline.state.is_final(), f"ended before seed_train ran: {explain(stack, pipeline)}"
        assert time.monotonic() < deadline, f"seed_train never ran\n{stack.worker_logs()}"
        time.sleep(1)
    # Mid-stage: once training wrote a checkpoint (or 30 s into the run, whichever is first).
    running_since = time.monotonic()
    checkpoints = Path(workspace, "artifacts", "seed_train")
    while time.monotonic() - running_since < 30 and not any(checkpoints.glob(".*/*/step-*")):
        time.sleep(0.5)
    before_kill = markers(workspace)
    runs_before = {r.id for r in gpu_runs(workspace)}
    finished_stages = {key.split("/")[0] for key in before_kill}
    assert {"quality", "embed"} <= finished_stages and "seed_train" not in finished_stages, finished_stages

    killed = stack.workers["gpu-0"].kill_hard()  # the worker, its flow run, the training processes
    killed_at = time.time()
    assert len(killed) >= 2, "the flow run's process was not among the worker's children"
    stack.start_worker("mods-gpu", name="gpu-1", limit=1)

    run = wait_final(stack, pipeline_run.id)
    assert run.state.is_completed(), explain(stack, run)

    seed = [r for r in gpu_runs(workspace) if r.parameters["run"]["stage"] == "seed_train"]
    assert [r.state.name for r in seed] == ["Crashed", "Completed"], [(r.name, r.state.name) for r in seed]
    assert "heartbeat" in seed[0].state.message
    crashed_after = seed[0].state.timestamp.timestamp() - killed_at
    # Stages finished before the kill were not executed again: no new flow runs, markers untouched.
    later = [r for r in gpu_runs(workspace) if r.id not in runs_before]
    assert {r.parameters["run"]["stage"] for r in later} <= {"seed_train", "answers", "necessity", "final_train"}
    after = markers(workspace)
    assert {key: after[key] for key in before_kill} == before_kill
    assert any(key.startswith("seed_train/") for key in after)
    # The automation crashed our silent run, and left the other team's silent flow alone.
    output, _ = bystander.communicate(timeout=CRASH_AFTER_SECONDS + 120)
    assert "STATE Completed" in output, output[-2000:]
    with stack.settings():
        [history] = states_of_flow("bystander")
    assert "Crashed" not in history and history[-1] == "Completed", history
    print(f"\n[realserver] worker killed mid seed_train: Crashed {crashed_after:.0f} s after the kill "
          f"(window {CRASH_AFTER_SECONDS} s, heartbeat {HEARTBEAT_SECONDS} s); resubmitted as {seed[1].name}")


def test_server_restarted_mid_run_the_run_completes(stack: RealStack, tiny_run):
    base, first, _ = tiny_run
    assert first.state.is_completed(), "the tiny run failed (see its own test)"
    # The tiny run's workspace with a longer final training: the stages before it come back
    # cached and final_train runs on the GPU worker while the server goes away and returns.
    config = {**base, "final_training": {**base["final_training"], "epochs": 40}}
    workspace = config["workspace"]
    earlier = {r.id for r in gpu_runs(workspace)}
    pipeline_run = submit({"config": config})
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while not any(r.state.is_running() for r in gpu_runs(workspace) if r.id not in earlier):
        assert not read_run(pipeline_run.id).state.is_final(), explain(stack, read_run(pipeline_run.id))
        assert time.monotonic() < deadline, f"final_train never started\n{stack.worker_logs()}"
        time.sleep(1)
    stopped = time.monotonic()
    stack.stop_server()
    time.sleep(5)
    stack.start_server()
    downtime = time.monotonic() - stopped
    run = wait_final(stack, pipeline_run.id)
    assert run.state.is_completed(), explain(stack, run)
    later = [(r.name, r.state.name) for r in gpu_runs(workspace) if r.id not in earlier]
    # Only final_train ran again (the rest came back cached); a run that the outage broke
    # may have been resubmitted, and the last one completed.
    assert {name.split("-try")[0] for name, _ in later} == {"final_train"} and later[-1][1] == "Completed", later
    assert len(list(Path(workspace, "artifacts", "export").glob("*/selected.parquet"))) == 2
    print(f"\n[realserver] server down {downtime:.0f} s while final_train ran: the run completed; "
          f"GPU runs {later}")


def test_gpu_worker_killed_mid_shard_the_shard_is_resubmitted_and_the_result_is_the_same(
        stack: RealStack, tiny_llama_dir: Path, tmp_path: Path):
    """Issue 7: a worker lost while it computes a shard costs that shard, nothing more."""
    from flows.mods_pipeline import mods_pipeline

    config = caller_config(tmp_path, tiny_llama_dir)  # 40 rows: five quality shards of 8
    config["execution"] = {"rows_per_shard": 8, "progress": False}
    workspace = config["workspace"]
    pipeline_run = submit({"config": config})

    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while True:
        shards = [r for r in gpu_runs(workspace) if r.name.startswith("quality-shard")]
        done = [r for r in shards if r.state.is_completed()]
        running = [r for r in shards if r.state.is_running()]
        if done and running:
            break
        pipeline = read_run(pipeline_run.id)
        assert not pipeline.state.is_final(), f"ended before the kill: {explain(stack, pipeline)}"
        assert time.monotonic() < deadline, f"no quality shard ran\n{stack.worker_logs()}"
        time.sleep(0.5)
    victim = running[0]
    (worker,) = [name for name, managed in stack.workers.items() if name.startswith("gpu") and managed.alive()]
    stack.workers[worker].kill_hard()
    stack.start_worker("mods-gpu", name=f"{worker}-after-shard-kill", limit=1)

    run = wait_final(stack, pipeline_run.id)
    assert run.state.is_completed(), explain(stack, run)
    tries = [r for r in gpu_runs(workspace) if r.name.startswith(victim.name)]
    assert [r.state.name for r in tries][:1] == ["Crashed"] and tries[-1].state.is_completed(), \
        [(r.name, r.state.name) for r in tries]
    # Finished shards were not run again: one completed run per shard.
    completed = [r.name.split("-try")[0] for r in gpu_runs(workspace)
                 if r.name.startswith("quality-shard") and r.state.is_completed()]
    assert sorted(completed) == sorted(set(completed)) and len(completed) == 5

    # The same selection as one uninterrupted process.
    from mods.config import PipelineConfig

    local = PipelineConfig.model_validate({**config, "workspace": str(tmp_path / "local"),
                                           "execution": {"rows_per_shard": 8, "progress": False}})
    with stack.settings():
        expected = mods_pipeline(config=local, return_state=True).result()
    (export,) = Path(workspace, "artifacts", "export").glob("[!.]*/selected.jsonl")
    assert export.read_bytes() == Path(expected["selected_jsonl"]).read_bytes()
