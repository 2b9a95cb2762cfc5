"""The answers stage on vLLM under the real `mods run` (its own temporary Prefect server):
sharded, Ctrl-C leaves no engine process, a killed run's engine goes with it and the rerun
resumes only the unfinished rows, and the answers equal transformers' on the merged LoRA
seed model. The seed model is a LoRA adapter trained on the packaged SmolLM2 (vLLM does
not serve the tiny random test models). Three engine starts: ~5-8 min on 2 CPU cores."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from pipeline_helpers import newest, summary, tiny_config
from process_helpers import big_pool, mods, start_mods, wait_for
from vllm_helpers import require_vllm

pytestmark = [pytest.mark.flow, pytest.mark.vllm]

ROWS, KEEP, SEED_K, ROWS_PER_SHARD = 80, 0.8, 4, 8
ANSWERED = int(ROWS * KEEP) - SEED_K


def answer_parts(workspace: Path) -> int:
    """Rows of the answers stage's row store (its finished shards)."""
    rows = 0
    for part in (workspace / "rowstore" / "answers").glob("*/part-*.parquet"):
        try:
            rows += len(pd.read_parquet(part))
        except (OSError, ValueError):  # being renamed into place
            pass
    return rows


def descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def living(pids: list[int]) -> list[int]:
    import psutil

    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def write_vllm_config(tmp_path: Path, tiny_llama: Path) -> Path:
    from mods.models.loading import DEFAULT_BASE_MODEL

    pool = big_pool(tmp_path / "pool.jsonl", rows=ROWS)
    values = tiny_config(tmp_path, tiny_llama, pool=pool, workspace="ws", rows_per_shard=ROWS_PER_SHARD,
                         keep_fraction=KEEP).model_dump(mode="json")
    values["base_model"] = DEFAULT_BASE_MODEL
    values["seed_selection"]["k"] = SEED_K
    values["necessity"]["generation"] = {"engine": "vllm", "max_new_tokens": 48, "batch_size": ROWS_PER_SHARD,
                                         "device": "cpu"}
    path = tmp_path / "vllm.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def interrupted_in_answers(tmp_path: Path, config: Path, after_rows: int, kill) -> tuple[int, list[int]]:
    """Start `mods run`, wait until the answers store holds more than ``after_rows`` rows,
    then ``kill(process)``; the rows stored then, and the processes the run had."""
    workspace = tmp_path / "ws"
    run = start_mods(tmp_path, "run", "--config", str(config), "--quiet")
    try:
        wait_for(lambda: answer_parts(workspace) > after_rows or run.poll() is not None, 900, "answers shards")
        assert run.poll() is None, run.communicate()[1][-3000:]
        children = descendants(run.pid)
        kill(run)
        run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    return answer_parts(workspace), children


def test_answers_on_vllm_shard_resume_and_leave_no_process(tiny_llama_dir: Path, tmp_path: Path):
    require_vllm()
    config = write_vllm_config(tmp_path, tiny_llama_dir)
    workspace = tmp_path / "ws"
    started = time.time()

    # Ctrl-C (SIGINT to the process group, as a terminal sends it) while vLLM answers.
    def ctrl_c(run):
        os.killpg(run.pid, signal.SIGINT)
        out, err = run.communicate(timeout=120)
        assert run.returncode == 130, err[-3000:]
        assert err.strip().splitlines()[-1] == "mods run: interrupted"

    first, children = interrupted_in_answers(tmp_path, config, 0, ctrl_c)
    assert len(children) >= 3, "the engine's processes were not seen"
    wait_for(lambda: not living(children), 60, "every process of the interrupted run to end")

    # kill -9 of the `mods run` process alone (a cancelled or lost flow-run process): its
    # engine processes, not signalled, must end by themselves.
    second, children = interrupted_in_answers(tmp_path, config, first, lambda run: os.kill(run.pid, signal.SIGKILL))
    wait_for(lambda: not living(children), 60, "the killed run's engine processes to end")
    assert first < second < ANSWERED, "the kill must land in the middle of answers"

    rerun = mods(tmp_path, "run", "--config", str(config), "--quiet", timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    answers = summary(workspace, "answers")
    assert answers["rows_reused"] == second and answers["rows_computed"] == ANSWERED - second
    assert answers["shards"] >= 2

    # The LoRA seed model's answers on vLLM (adapter merged) = transformers' on the merged model.
    from mods.generation.answers import generate_answers
    from mods.generation.config import GenerationConfig
    from mods.training.train import load_trained_model

    frame = pd.read_parquet(newest(workspace, "answers") / "answers.parquet").head(16)
    model, tokenizer = load_trained_model(newest(workspace, "seed_train") / "model", device="cpu")
    want = generate_answers(model, tokenizer, frame["instruction"].tolist(), frame["input"].tolist(),
                            GenerationConfig(max_new_tokens=48, batch_size=ROWS_PER_SHARD), progress=False)
    assert frame["seed_answer"].tolist() == want
    print(f"vLLM answers system test: {time.time() - started:.0f} s")
