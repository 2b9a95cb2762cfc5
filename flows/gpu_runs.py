"""Flow runs of the gpu-stage deployment, submitted all at once and watched until done.

The pipeline sends each shard (and each training stage) to the GPU pool as a flow run and
waits here. Nothing here waits for ever, and nothing fails a stage that is merely queued:

- a run that ends Crashed or Failed (a lost worker is marked Crashed by the server's
  heartbeat automation, deployments/deploy.py) is resubmitted up to its retries; a
  ``PermanentStageError`` or a cancellation stops the stage at once;
- runs waiting behind busy workers (Scheduled while the pool is full) wait as long as
  the pool has a live worker; when no worker of the pool has been online for
  ``pending_timeout_s``, the stage fails and says so;
- a run that a worker took (Pending) but that never started within ``start_timeout_s``
  lost its worker while starting: it is marked Crashed and resubmitted;
- when the stage fails, or the pipeline is interrupted (Ctrl-C), every run still out is
  cancelled, so no GPU keeps working for a pipeline that has stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from mods.core.faults import PermanentStageError

# How often the states of GPU runs are read while waiting for them, and how many per read.
POLL_SECONDS = 2.0
READ_PAGE = 200  # the server answers at most 200 runs per read
# Marks a GPU run that failed in a way a retry cannot fix (flows/gpu_stage.py raises it).
PERMANENT_FAILURE = PermanentStageError.__name__
# Seconds a cancellation may take on the way out (the server may be going away too).
CANCEL_TIMEOUT_SECONDS = 10.0


class StageFailed(RuntimeError):
    """A stage failed for good (after its retries); the message names stage, worker, reason."""


@dataclass
class RemoteJob:
    """One flow run of the gpu-stage deployment (a shard or a whole stage) and its attempts."""

    stage: str
    name: str
    parameters: dict[str, Any]
    retries: int
    rows: int = 0
    attempts: int = 0
    flow_run_id: Any = None
    pending_since: float | None = None  # when a worker took the current attempt
    history: list[str] = field(default_factory=list)


class RunsClient(Protocol):
    """What the watcher needs of Prefect's sync client (a fake one in the tests)."""

    def read_flow_runs(self, **kwargs: Any) -> list[Any]: ...
    def read_workers_for_work_pool(self, work_pool_name: str) -> list[Any]: ...
    def set_flow_run_state(self, flow_run_id: Any, state: Any, force: bool = False) -> Any: ...


def worker_of(run: Any) -> str:
    """Which worker ran ``run``, as far as the server knows (workers label their runs)."""
    labels = getattr(run, "labels", None) or {}
    worker = labels.get("prefect.worker.name") or "an unknown worker"
    pool = labels.get("prefect.work-pool.name") or getattr(run, "work_pool_name", None) or "?"
    pid = getattr(run, "infrastructure_pid", None)
    return f"worker {worker} of pool {pool}" + (f" (process {pid})" if pid else "")


class GpuRuns:
    """Submit ``jobs`` to ``deployment`` and watch them until every one has completed."""

    def __init__(self, deployment: str, pool: str, client: RunsClient, submit: Callable[[RemoteJob], Any],
                 pending_timeout_s: float, start_timeout_s: float, logger: logging.Logger | Any,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.deployment = deployment
        self.pool = pool
        self.client = client
        self._submit_run = submit
        self.pending_timeout_s = pending_timeout_s
        self.start_timeout_s = start_timeout_s
        self.logger = logger
        self.clock = clock
        self.sleep = sleep

    def _submit(self, job: RemoteJob) -> None:
        job.attempts += 1
        job.pending_since = None
        job.flow_run_id = self._submit_run(job)

    def _read(self, ids: list[Any]) -> list[Any]:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        runs: list[Any] = []
        for start in range(0, len(ids), READ_PAGE):
            runs += self.client.read_flow_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=ids[start:start + READ_PAGE])), limit=READ_PAGE)
        return runs

    def _worker_online(self) -> bool:
        from prefect.client.schemas.objects import WorkerStatus

        try:
            workers = self.client.read_workers_for_work_pool(self.pool)
        except Exception:  # noqa: BLE001 - a pool we cannot read: the timeout decides
            return False
        return any(getattr(w, "status", None) == WorkerStatus.ONLINE for w in workers)

    def run(self, jobs: list[RemoteJob], on_done: Callable[[RemoteJob], None] | None = None) -> None:
        waiting: dict[Any, RemoteJob] = {}
        try:
            for job in jobs:
                self._submit(job)
                waiting[job.flow_run_id] = job
            self._watch(waiting, on_done)
        except BaseException:
            # A failed stage or Ctrl-C: the runs still out must not keep their GPUs busy.
            self.cancel(list(waiting))
            raise

    def _watch(self, waiting: dict[Any, RemoteJob], on_done: Callable[[RemoteJob], None] | None) -> None:
        worker_seen = self.clock()
        while waiting:
            self.sleep(POLL_SECONDS)
            now = self.clock()
            queued = 0
            for run in self._read(list(waiting)):
                job = waiting.get(run.id)
                state = run.state
                if job is None or state is None:
                    continue
                if state.is_completed():
                    del waiting[run.id]
                    if on_done:
                        on_done(job)
                elif state.is_final():
                    del waiting[run.id]
                    self._retry_or_fail(job, run, f"{state.name} on {worker_of(run)}: {(state.message or '').strip()[:300]}",
                                        permanent=PERMANENT_FAILURE in (state.message or "") or state.is_cancelled())
                    waiting[job.flow_run_id] = job
                elif state.is_pending():
                    job.pending_since = job.pending_since if job.pending_since is not None else now
                    if now - job.pending_since > self.start_timeout_s:
                        self._crash(run.id, f"taken by {worker_of(run)} but not started in {self.start_timeout_s:.0f} s")
                        del waiting[run.id]
                        self._retry_or_fail(job, run, f"not started in {self.start_timeout_s:.0f} s by {worker_of(run)}",
                                            permanent=False)
                        waiting[job.flow_run_id] = job
                elif state.is_scheduled():
                    queued += 1
            if not queued:
                worker_seen = now
            elif self._worker_online():
                worker_seen = now  # queued behind busy workers: they will get to it
            elif now - worker_seen > self.pending_timeout_s:
                stages = sorted({job.stage for job in waiting.values()})
                raise StageFailed(
                    f"GPU stage {stages[0]!r}: no worker of pool {self.pool!r} (deployment {self.deployment!r}) "
                    f"has been online for {self.pending_timeout_s:.0f} s while {queued} of its runs wait; "
                    f"start a worker on that pool"
                )

    def _retry_or_fail(self, job: RemoteJob, run: Any, what: str, permanent: bool) -> None:
        job.history.append(what)
        if permanent or job.attempts > job.retries:
            raise StageFailed(f"GPU stage {job.stage!r} ({job.name}) failed after {job.attempts} attempt(s); last: {what}")
        self.logger.warning("%s: %s; resubmitting (attempt %d of %d)", job.name, what, job.attempts + 1, job.retries + 1)
        self._submit(job)

    def _crash(self, run_id: Any, message: str) -> None:
        from prefect.states import Crashed

        try:
            self.client.set_flow_run_state(run_id, Crashed(message=message), force=True)
        except Exception as error:  # noqa: BLE001 - it is resubmitted either way
            self.logger.warning("could not mark run %s Crashed: %s", run_id, error)

    def cancel(self, run_ids: list[Any]) -> None:
        """Cancel the runs still out: Scheduled ones at once, started ones through their worker."""
        from prefect.states import Cancelled, Cancelling

        deadline = self.clock() + CANCEL_TIMEOUT_SECONDS
        try:
            runs = self._read(run_ids) if run_ids else []
        except Exception:  # noqa: BLE001 - the server is away: nothing more can be done
            return
        for run in runs:
            if self.clock() > deadline:
                return
            if run.state is None or run.state.is_final():
                continue
            state = Cancelled(message="the pipeline stopped") if run.state.is_scheduled() else \
                Cancelling(message="the pipeline stopped")
            try:
                self.client.set_flow_run_state(run.id, state, force=True)
            except Exception:  # noqa: BLE001 - best effort on the way out
                continue
        if runs:
            self.logger.warning("cancelled %d GPU run(s) still out", sum(1 for r in runs if r.state and not r.state.is_final()))
