"""GPU work on dedicated workers, for real: the declared deployments on the test server, two
`prefect worker` processes polling the `mods-gpu` pool, and the pipeline sending them its
shards and training stages (tiny models; this machine has no GPU, the routing is what is
tested). Routing comes from the environment the deployment sets, not from the config."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_helpers import ALL, artifact_bytes, stage_states, tiny_config

pytestmark = pytest.mark.flow

ROOT = Path(__file__).resolve().parents[2]
GPU_STAGES = ["quality", "embed", "seed_train", "answers", "necessity", "final_train"]


def start_worker(tmp_path: Path, name: str, api_url: str, pool: str = "mods-gpu") -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "INFO",
           "PREFECT_HOME": str(tmp_path / f"home-{name}")}
    log = tmp_path / f"worker-{name}.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
         "--limit", "1", "--name", name],
        env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
    )
    return worker, log


def forget_workers(pool: str) -> None:
    """Deregister the pool's workers: a stopped worker counts as online for three of its
    heartbeat intervals, and an earlier test's workers must not look alive here."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for worker in client.read_workers_for_work_pool(pool):
            client.request("DELETE", "/work_pools/{work_pool_name}/workers/{name}",
                           path_params={"work_pool_name": pool, "name": worker.name}).raise_for_status()


def stop_worker(worker: subprocess.Popen) -> None:
    worker.terminate()
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, 9)


def runs_named_like(prefix: str, since: float) -> list:
    """Flow runs whose name starts with ``prefix``, created since ``since`` (a time.time())."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=prefix)), limit=200)
    return [r for r in runs if r.created and r.created.timestamp() >= since - 1]


def wait_for_workers(pool: str, count: int, timeout: float = 120) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import WorkerStatus

    deadline = time.time() + timeout
    with get_client(sync_client=True) as client:
        while time.time() < deadline:
            if sum(w.status == WorkerStatus.ONLINE for w in client.read_workers_for_work_pool(pool)) >= count:
                return
            time.sleep(0.5)
    raise AssertionError(f"{count} workers of {pool} did not come online in {timeout} s")


def test_shards_fan_out_over_two_gpu_workers(prefect_harness, tiny_llama_dir: Path, tmp_path: Path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter
    from prefect.settings import PREFECT_API_URL

    from deployments.deploy import GPU_STAGE_DEPLOYMENT, TRAIN_STAGE_DEPLOYMENT, deploy_all
    from flows.executors import GPU_DEPLOYMENT_ENV, TRAIN_DEPLOYMENT_ENV
    from flows.mods_pipeline import mods_pipeline

    deploy_all(gpus=2)  # the pool runs as many GPU flow runs at once as it has GPUs
    workers = [start_worker(tmp_path, name, PREFECT_API_URL.value()) for name in ("gpu-a", "gpu-b")]
    # Training goes to a worker that owns a whole machine (deploy.py --train-pool).
    workers.append(start_worker(tmp_path, "train-a", PREFECT_API_URL.value(), pool="mods-train"))
    try:
        monkeypatch.setenv(GPU_DEPLOYMENT_ENV, GPU_STAGE_DEPLOYMENT)
        monkeypatch.setenv(TRAIN_DEPLOYMENT_ENV, TRAIN_STAGE_DEPLOYMENT)
        wait_for_workers("mods-gpu", 2)
        wait_for_workers("mods-train", 1)
        config = tiny_config(tmp_path, tiny_llama_dir, rows_per_shard=8).model_copy(deep=True)
        # Shorter than the queue: shards waiting behind busy workers must not time out.
        config.execution.pending_timeout_s = 3
        started = time.time()
        state = mods_pipeline(config=config, return_state=True)
        logs = {name: log.read_text() for (_, log), name in zip(workers, ("gpu-a", "gpu-b", "train-a"))}
        assert state.is_completed(), f"{state.message}\n{logs['gpu-a'][-2000:]}\n{logs['gpu-b'][-2000:]}"
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(),
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["gpu"])),
            )
            trained = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(),
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["train"])),
            )
        runs = [r for r in runs if r.created and r.created.timestamp() >= started - 1]
        trained = [r for r in trained if r.created and r.created.timestamp() >= started - 1]
        assert all(r.state.is_completed() and r.work_pool_name == "mods-gpu" for r in runs)
        names = sorted(r.name for r in runs)
        # 40 rows in shards of 8: five quality shards; training stages as whole runs, on the
        # training pool's worker.
        assert [n for n in names if n.startswith("quality-shard")] == [f"quality-shard-{i:04d}" for i in range(5)]
        assert sorted(r.name for r in trained) == ["final_train", "seed_train"]
        assert all(r.state.is_completed() and r.work_pool_name == "mods-train" and str(r.id) in logs["train-a"]
                   for r in trained)
        assert {n.split("-shard")[0] for n in names} | {r.name for r in trained} == set(GPU_STAGES)
        # CPU stages ran in the pipeline's process; GPU stages came back from the workers' artifacts.
        assert set(stage_states(state)) == set(ALL)

        # Both workers took shards of the quality stage; and for some row-wise stage, both
        # worked on its shards at the same time (which stage depends on timing).
        def shards_of(stage: str, worker: str) -> set[str]:
            return {str(r.id) for r in runs if r.name.startswith(f"{stage}-shard") and str(r.id) in logs[worker]}

        assert shards_of("quality", "gpu-a") and shards_of("quality", "gpu-b")
        spans = {str(r.id): (r.start_time, r.end_time) for r in runs}
        overlap = any(spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]
                      for stage in ("quality", "embed", "answers", "necessity")
                      for a in shards_of(stage, "gpu-a") for b in shards_of(stage, "gpu-b"))
        assert overlap, "the two workers never ran shards of one stage at the same time"

        # The same bytes as a run in one process with one shard.
        local = tiny_config(tmp_path, tiny_llama_dir, workspace="local", rows_per_shard=1000)
        monkeypatch.delenv(GPU_DEPLOYMENT_ENV)
        monkeypatch.delenv(TRAIN_DEPLOYMENT_ENV)
        assert mods_pipeline(config=local, return_state=True).is_completed()
        assert artifact_bytes(Path(config.workspace)) == artifact_bytes(Path(local.workspace))
    finally:
        for worker, _ in workers:
            stop_worker(worker)


def test_no_worker_fails_the_stage_in_bounded_time(prefect_harness, tiny_llama_dir: Path, tmp_path: Path, monkeypatch):
    """A GPU stage whose runs nobody picks up fails with a message naming the stage and the
    pool, not never; its runs are cancelled, so a worker started later does not run them."""
    from deployments.deploy import deploy_all
    from flows.executors import GPU_DEPLOYMENT_ENV
    from flows.mods_pipeline import mods_pipeline

    deploy_all()
    forget_workers("mods-gpu")
    monkeypatch.setenv(GPU_DEPLOYMENT_ENV, "mods-gpu-stage/gpu")
    config = tiny_config(tmp_path, tiny_llama_dir).model_copy(deep=True)
    config.execution.pending_timeout_s = 5
    started = time.time()
    state = mods_pipeline(config=config, return_state=True)
    assert state.is_failed()
    runs = runs_named_like("quality-shard", started)
    assert runs and all(r.state.is_cancelled() for r in runs), [(r.name, r.state.name) for r in runs]
    message = state.message or str(state.result(raise_on_failure=False))
    assert re.search(r"GPU stage 'quality': no worker of pool 'mods-gpu' .* online for 5 s", message), message


def test_ctrl_c_while_a_worker_runs_a_shard_stops_it_and_cancels_the_rest(prefect_harness, tiny_llama_dir: Path,
                                                                           tmp_path: Path):
    """Ctrl-C to a `mods run` whose quality shards are out on a real GPU worker: the command
    ends in one line, the shard the worker is running is stopped (its process gone, the run
    *Cancelled*), the queued shards are cancelled, and the worker runs nothing more."""
    import signal

    from prefect.settings import PREFECT_API_URL
    from process_helpers import alive, big_pool, child_pids, start_mods, wait_for, write_config

    from deployments.deploy import GPU_STAGE_DEPLOYMENT, deploy_all

    deploy_all(gpus=1)
    forget_workers("mods-gpu")
    worker, worker_log = start_worker(tmp_path, "gpu-c", PREFECT_API_URL.value())
    try:
        wait_for_workers("mods-gpu", 1)
        # many rows in shards of 8: quality shards queued behind the one the worker runs
        config = write_config(tmp_path, tiny_llama_dir, "ctrl-c", "ws", pool=big_pool(tmp_path / "big.jsonl"),
                              rows_per_shard=8)
        started = time.time()
        run = start_mods(tmp_path, "run", "--config", str(config), "--gpu-deployment", GPU_STAGE_DEPLOYMENT,
                         "--quiet", env={"PREFECT_API_URL": PREFECT_API_URL.value()})

        def shard_runs() -> list:
            return runs_named_like("quality-shard", started)

        wait_for(lambda: any(r.state.is_running() for r in shard_runs()) or run.poll() is not None, 300,
                 "a quality shard running on the worker")
        assert run.poll() is None, run.communicate()[1][-2000:]
        assert child_pids(worker.pid), "the worker has no flow-run process"
        # The shards are submitted one after the other: take the picture once all of them
        # are (the count holds for four reads), from one read, so that no run falls between sets.
        counts: list[int] = []
        wait_for(lambda: counts.append(len(shard_runs())) or (len(counts) > 3 and len(set(counts[-4:])) == 1),
                 60, "every quality shard submitted")
        snapshot = shard_runs()
        running = {r.id for r in snapshot if r.state.is_running()}
        queued = {r.id for r in snapshot if not r.state.is_final() and r.id not in running}
        os.killpg(run.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, err = run.communicate(timeout=120)
        assert run.returncode == 130, err[-2000:]
        assert err.strip().splitlines()[-1] == "mods run: interrupted" and "Traceback" not in err

        # every shard run ends: the started one stopped by its worker, the queued ones cancelled
        wait_for(lambda: all(r.state.is_final() for r in shard_runs()), 120, "every shard run in a final state")
        runs = {r.id: r for r in shard_runs()}
        assert running and queued, "expected one shard running and others queued at the Ctrl-C"
        assert all(runs[i].state.is_cancelled() for i in running | queued), \
            [(r.name, r.state.name) for i, r in runs.items() if i in running | queued]
        done = [r for r in runs.values() if r.state.is_completed()]
        assert len(done) + len(running | queued) == len(runs), sorted({r.state.name for r in runs.values()})
        wait_for(lambda: not alive(child_pids(worker.pid)), 60, "the worker's flow-run process to stop")
        # nothing more is taken: a while later no run has started since
        time.sleep(5)
        assert [r.name for r in shard_runs() if r.state.is_completed()] == [r.name for r in done]
        assert worker.poll() is None, "the worker itself must survive a cancelled run"
    finally:
        stop_worker(worker)
        print(worker_log.read_text()[-3000:])
