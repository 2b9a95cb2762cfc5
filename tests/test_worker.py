"""GPU stages on a dedicated worker, for real: the declared deployments on the test server,
a `prefect worker` process polling the `mods-gpu` pool, and the pipeline sending its GPU
stages there (tiny models; this machine has no GPU, the routing is what is tested)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_flow import ALL, task_states, tiny_config

pytestmark = pytest.mark.flow

GPU_STAGES = ["quality", "embed", "seed_train", "answers", "necessity", "final_train"]


def test_gpu_stages_run_as_flow_runs_on_the_gpu_pool_worker(prefect_harness, tiny_llama_dir: Path, tmp_path: Path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter
    from prefect.settings import PREFECT_API_URL

    from deployments.deploy import GPU_STAGE_DEPLOYMENT, deploy_all
    from flows.mods_pipeline import mods_pipeline

    deploy_all()
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_HOME": str(tmp_path / "worker-home")}
    log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "mods-gpu", "--type", "process"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1],
    )
    try:
        config = tiny_config(tmp_path, tiny_llama_dir).model_copy(deep=True)
        config.execution.gpu_deployment = GPU_STAGE_DEPLOYMENT
        started = time.time()
        state = mods_pipeline(config=config, return_state=True)
        assert state.is_completed(), f"{state.message}\nworker log:\n{(tmp_path / 'worker.log').read_text()[-3000:]}"
        states = task_states(state)
        # CPU stages ran in the pipeline's process; GPU stages did not (the other six
        # task runs are run_deployment's placeholders linking to the subflow runs).
        assert {name for name in states if name in ALL} == set(ALL) - set(GPU_STAGES)
        assert len(states) == len(ALL)
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(),
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["gpu"])),
            )
        recent = [r for r in runs if r.created and r.created.timestamp() >= started - 1]
        assert sorted(r.name for r in recent) == sorted(GPU_STAGES)
        assert all(r.state.is_completed() for r in recent)
        assert all(r.work_pool_name == "mods-gpu" for r in recent)
        assert Path(state.result()["final_model"], "adapter_model.safetensors").is_file()
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        log.close()
