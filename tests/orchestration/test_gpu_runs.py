"""The watcher of GPU runs (flows/gpu_runs.py) against a scripted server: queued runs wait
as long as a worker is alive, a pool with no worker fails the stage in bounded time, a
run taken but never started is crashed and resubmitted, lost runs are retried, and a
stage that stops (failure or Ctrl-C) cancels every run still out. The real-worker
versions of these are in tests/test_worker.py and tests/test_real_server.py."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from prefect.client.schemas.objects import WorkerStatus
from prefect.states import Completed, Crashed, Failed, Pending, Running, Scheduled

from flows.gpu_runs import GpuRuns, RemoteJob, StageFailed


@dataclass
class FakeRun:
    id: Any
    name: str
    state: Any
    labels: dict[str, str] = field(default_factory=dict)
    work_pool_name: str = "mods-gpu"
    infrastructure_pid: str | None = None
    polls_running: int = 0


@dataclass
class FakeWorker:
    name: str
    status: WorkerStatus = WorkerStatus.ONLINE


class FakeServer:
    """A GPU pool with ``slots`` workers; every read of the runs is one tick of the clock.

    ``plan`` says, per run name, how each attempt ends: "ok" (runs ``run_polls`` ticks then
    Completed), "lost" (Running, then Crashed by the heartbeat automation), "stuck" (the
    worker dies after taking it: Pending for ever), "bad" (Failed, PermanentStageError)."""

    def __init__(self, slots: int = 1, online: bool = True, run_polls: int = 3, plan: dict[str, list[str]] | None = None):
        self.slots, self.online, self.run_polls = slots, online, run_polls
        self.plan = plan or {}
        self.runs: dict[Any, FakeRun] = {}
        self.outcome: dict[Any, str] = {}
        self.now = 0.0
        self.set_states: list[tuple[Any, str]] = []

    # the client
    def read_flow_runs(self, flow_run_filter: Any = None, limit: int | None = None) -> list[FakeRun]:
        ids = list(flow_run_filter.id.any_)
        if len(ids) > (limit or 200):
            raise AssertionError("read more runs than one page")
        return [self.runs[i] for i in ids]

    def read_workers_for_work_pool(self, work_pool_name: str) -> list[FakeWorker]:
        return [FakeWorker("gpu-0", WorkerStatus.ONLINE if self.online else WorkerStatus.OFFLINE)]

    def set_flow_run_state(self, flow_run_id: Any, state: Any, force: bool = False) -> None:
        self.runs[flow_run_id].state = state
        self.set_states.append((flow_run_id, state.name))

    # the deployment
    def submit(self, job: RemoteJob) -> Any:
        run_id = uuid.uuid4()
        self.runs[run_id] = FakeRun(run_id, f"{job.name}-try{job.attempts}", Scheduled())
        attempts = self.plan.get(job.name, [])
        self.outcome[run_id] = attempts[job.attempts - 1] if job.attempts <= len(attempts) else "ok"
        return run_id

    # time passes
    def sleep(self, seconds: float) -> None:
        self.now += seconds
        busy = sum(1 for r in self.runs.values() if r.state.is_running() or r.state.is_pending())
        for run in self.runs.values():
            outcome = self.outcome[run.id]
            if run.state.is_scheduled() and self.online and busy < self.slots:
                run.state = Pending()
                run.labels = {"prefect.worker.name": "gpu-0", "prefect.work-pool.name": "mods-gpu"}
                run.infrastructure_pid = "host:4242"
                busy += 1
            elif run.state.is_pending() and outcome != "stuck":
                run.state = Running()
            elif run.state.is_running():
                run.polls_running += 1
                if outcome == "bad":
                    run.state = Failed(message="PermanentStageError: quality: ValueError: a bad row")
                elif run.polls_running >= self.run_polls:
                    run.state = Completed() if outcome == "ok" else Crashed(message="no heartbeat for 90 s")

    def clock(self) -> float:
        return self.now


def watcher(server: FakeServer, pending_timeout_s: float = 5, start_timeout_s: float = 20) -> GpuRuns:
    return GpuRuns("mods-gpu-stage/gpu", "mods-gpu", server, server.submit, pending_timeout_s, start_timeout_s,
                   logging.getLogger("test"), clock=server.clock, sleep=server.sleep)


def jobs(n: int, retries: int = 2) -> list[RemoteJob]:
    return [RemoteJob("quality", f"quality-shard-{i:04d}", {}, retries, rows=8) for i in range(n)]


def test_runs_queued_behind_a_busy_worker_wait_beyond_the_pending_timeout():
    server = FakeServer(slots=1, run_polls=3)
    done: list[str] = []
    # Six shards on one GPU: the last waits ~30 s of fake time, six times the pending timeout.
    watcher(server, pending_timeout_s=5).run(jobs(6), on_done=lambda job: done.append(job.name))
    assert sorted(done) == [f"quality-shard-{i:04d}" for i in range(6)]
    assert server.now > 5 * 5
    assert all(r.state.is_completed() for r in server.runs.values())


def test_a_pool_with_no_worker_fails_the_stage_in_bounded_time_and_cancels_its_runs():
    server = FakeServer(online=False)
    with pytest.raises(StageFailed, match=r"GPU stage 'quality': no worker of pool 'mods-gpu'.*online for 5 s"):
        watcher(server, pending_timeout_s=5).run(jobs(3))
    assert server.now <= 5 + 2 * 2
    assert [r.state.name for r in server.runs.values()] == ["Cancelled"] * 3


def test_a_run_taken_but_never_started_is_crashed_and_resubmitted():
    server = FakeServer(plan={"quality-shard-0000": ["stuck"]})
    watcher(server, start_timeout_s=10).run(jobs(1))
    names = {r.name: r.state.name for r in server.runs.values()}
    assert names == {"quality-shard-0000-try1": "Crashed", "quality-shard-0000-try2": "Completed"}


def test_a_lost_worker_is_retried_then_the_stage_fails_naming_stage_worker_and_reason():
    server = FakeServer(plan={"quality-shard-0001": ["lost"]})
    watcher(server).run(jobs(2, retries=1))
    assert sorted(r.state.name for r in server.runs.values()) == ["Completed", "Completed", "Crashed"]

    server = FakeServer(plan={"quality-shard-0000": ["lost", "lost"]})
    with pytest.raises(StageFailed) as failure:
        watcher(server).run(jobs(1, retries=1))
    message = str(failure.value)
    assert "GPU stage 'quality' (quality-shard-0000) failed after 2 attempt(s)" in message
    assert "Crashed on worker gpu-0 of pool mods-gpu (process host:4242): no heartbeat for 90 s" in message


def test_a_permanent_failure_stops_at_once_and_cancels_the_other_runs():
    server = FakeServer(slots=1, plan={"quality-shard-0000": ["bad"]})
    with pytest.raises(StageFailed, match="after 1 attempt.*PermanentStageError"):
        watcher(server).run(jobs(3, retries=5))
    states = sorted(r.state.name for r in server.runs.values())
    assert states == ["Cancelled", "Cancelled", "Failed"]  # the two queued shards never ran


def test_ctrl_c_while_waiting_cancels_every_run_still_out():
    server = FakeServer(slots=1, run_polls=50)
    real_sleep = server.sleep
    ticks = iter(range(100))

    def sleep(seconds: float) -> None:
        real_sleep(seconds)
        if next(ticks) == 3:
            raise KeyboardInterrupt

    server.sleep = sleep  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        GpuRuns("mods-gpu-stage/gpu", "mods-gpu", server, server.submit, 5, 20, logging.getLogger("test"),
                clock=server.clock, sleep=sleep).run(jobs(3))
    # The running shard goes through its worker (Cancelling), the queued ones end at once.
    assert sorted(r.state.name for r in server.runs.values()) == ["Cancelled", "Cancelled", "Cancelling"]


def test_thousands_of_runs_are_read_in_pages():
    server = FakeServer(slots=500, run_polls=1)
    done: list[str] = []
    watcher(server).run([RemoteJob("embed", f"embed-shard-{i:04d}", {}, 0) for i in range(450)],
                        on_done=lambda job: done.append(job.name))
    assert len(done) == 450
