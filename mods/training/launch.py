"""Starting the training processes of ``train_model`` (nobody types a launch command).

    train_model (the caller's process)
      └─ python -m mods.training.launch supervise JOB      torchrun's agent, in a session of its own
           ├─ python -m mods.training.launch worker JOB    rank 0 (writes the artifact)
           └─ ...                                 rank N-1

torchrun (``torch.distributed.run``, ``--standalone``: a free local port) starts one
worker per process and, when one fails, stops the others and exits non-zero, so a
failure never leaves the rest waiting in a collective. The caller hands the rows over
as a file (``tokens.parquet``: token ids, encoded once), reads the workers' output line
by line (echoed when ``progress``) and keeps the last lines for the error message.
Each process asks Linux to end it when its parent dies (``PR_SET_PDEATHSIG``): a
killed caller takes the supervisor with it, a killed supervisor its workers, so
nothing trains on as an orphan.
"""

from __future__ import annotations

import collections
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any, Sequence

from mods.models.loading import pick_device
from mods.training.config import TrainJob
from mods.training.data import EncodedRow
from mods.training.process import run_training_process

PROJECT_ROOT = Path(__file__).resolve().parents[2]
_LOG_TAIL_LINES = 30
_PARENT_PID_ENV = "MODS_TRAIN_PARENT_PID"
_SUPERVISOR_PID_ENV = "MODS_TRAIN_SUPERVISOR_PID"


class TrainingProcessError(RuntimeError):
    """A training process failed; the message names it and ends with the last log lines."""


def _die_with_parent(sig: signal.Signals, parent_pid_env: str) -> None:
    """End this process with ``sig`` when its parent dies (Linux; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)
    expected = os.environ.get(parent_pid_env)
    if expected is not None and os.getppid() != int(expected):
        os._exit(1)  # the parent died before the request took effect


def _write_tokens(encoded: Sequence[Any], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = pa.array([row.input_ids for row in encoded], type=pa.list_(pa.int32()))
    labels = pa.array([row.labels for row in encoded], type=pa.list_(pa.int32()))
    pq.write_table(pa.table({"input_ids": ids, "labels": labels}), path)


def _read_tokens(path: Path) -> list[Any]:
    import pyarrow.parquet as pq

    table = pq.read_table(path).to_pydict()
    return [EncodedRow(ids, labels) for ids, labels in zip(table["input_ids"], table["labels"])]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the supervisor (torchrun then stops its workers), SIGKILL after a grace
    period (the workers then die with it)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _failure_message(work_dir: Path, processes: int, returncode: int, tail: Sequence[str]) -> str:
    reports = sorted(work_dir.glob("error-rank*.txt"), key=lambda p: p.stat().st_mtime)
    log = "".join(tail[-15:]).rstrip()
    if not reports:
        return (f"training processes ended with exit code {returncode} without an error report "
                f"(killed by a signal?)\n--- last lines of the training log ---\n{log}")
    # The first failure is the cause; later ones are usually peers losing it.
    first = reports[0]
    rank = first.stem.removeprefix("error-rank")
    headline, *trace = first.read_text().splitlines()
    trace_tail = "\n".join(trace[-12:])
    return (f"training process {rank} of {processes} failed: {headline}\n--- its traceback (last lines) ---\n"
            f"{trace_tail}\n--- last lines of the training log ---\n{log}")


def launch_training(job: Any, encoded: Sequence[Any], tokenizer: Any) -> dict[str, Any]:
    """Run ``job`` in ``job.processes`` processes and wait; return rank 0's summary.

    Raises ``TrainingProcessError`` when a process fails; a ``KeyboardInterrupt`` (or
    any exception) while waiting stops every process before it propagates.
    """
    job.out_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=".mods-train-", dir=job.out_dir.parent))
    try:
        job = job.model_copy(update={"work_dir": work_dir})
        _write_tokens(encoded, work_dir / "tokens.parquet")
        tokenizer.save_pretrained(work_dir / "tokenizer")
        job_path = work_dir / "job.json"
        job_path.write_text(job.model_dump_json(indent=2))

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env[_PARENT_PID_ENV] = str(os.getpid())
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if job.config.device is None or job.config.device.startswith("cpu"):
            if pick_device(job.config.device).type == "cpu":
                # The cores shared out, instead of every process using them all.
                env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // job.processes))
        env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, without its banner
        command = [sys.executable, "-m", "mods.training.launch", "supervise", str(job_path)]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, text=True, errors="replace")
        tail: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL_LINES)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line)
                if job.progress:
                    sys.stderr.write(line)
                    sys.stderr.flush()

        reader = threading.Thread(target=pump, name="mods-train-log", daemon=True)
        reader.start()
        try:
            returncode = proc.wait()
        except BaseException:
            _stop(proc)
            raise
        reader.join(timeout=10)
        summary_path = work_dir / "summary.json"
        if returncode != 0 or not summary_path.is_file():
            raise TrainingProcessError(_failure_message(work_dir, job.processes, returncode, list(tail)))
        return json.loads(summary_path.read_text())
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _supervise(job_path: Path) -> None:
    from torch.distributed.run import main as torchrun

    _die_with_parent(signal.SIGTERM, _PARENT_PID_ENV)  # SIGTERM: torchrun stops its workers
    os.environ[_SUPERVISOR_PID_ENV] = str(os.getpid())
    job = TrainJob.model_validate_json(job_path.read_text())
    torchrun([
        "--standalone",
        f"--nproc-per-node={job.processes}",
        "--max-restarts=0",  # a rerun resumes from the checkpoint instead
        "--module", "mods.training.launch", "worker", str(job_path),
    ])


def _worker(job_path: Path) -> None:
    _die_with_parent(signal.SIGKILL, _SUPERVISOR_PID_ENV)
    rank = int(os.environ.get("RANK", "0"))
    job = TrainJob.model_validate_json(job_path.read_text())
    assert job.work_dir is not None
    try:
        tokenizer = None
        if rank == 0:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(job.work_dir / "tokenizer")
        summary = run_training_process(job, _read_tokens(job.work_dir / "tokens.parquet"), tokenizer)
        if summary is not None:
            temporary = job.work_dir / "summary.json.tmp"
            temporary.write_text(json.dumps(summary))
            os.replace(temporary, job.work_dir / "summary.json")
    except BaseException as exc:
        report = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        (job.work_dir / f"error-rank{rank}.txt").write_text(report + "\n" + traceback.format_exc())
        print(f"[mods.train] process {rank} failed: {report}", file=sys.stderr, flush=True)
        traceback.print_exc()
        sys.exit(1)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] not in ("supervise", "worker"):
        sys.exit("usage: python -m mods.training.launch {supervise|worker} JOB.json (started by mods.training.train.train_model)")
    (_supervise if args[0] == "supervise" else _worker)(Path(args[1]))


if __name__ == "__main__":
    main()
