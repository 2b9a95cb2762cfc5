"""Training in several processes (gloo on this CPU), FSDP, checkpoints and failures.

Tiny Llama, fp32 (bitwise-comparable arithmetic), one thread per process. Tolerance for
"the same weights": max |difference| <= 1e-5 on weights of size ~0.1-1 (what differs
between the runs is only the order of float additions: DDP's all-reduce against
gradient accumulation, FSDP's sharded reductions, and the loss weights A·P/n against
1/n when processes leave padding slots).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from mods.training.config import TrainConfig
from mods.training.launch import TrainingProcessError
from mods.training.train import train_model

ROOT = Path(__file__).resolve().parents[2]
WEIGHT_TOLERANCE = 1e-5

ROWS = pd.DataFrame(
    {
        "instruction": [f"Say the number {i}." for i in range(16)],
        "input": [""] * 16,
        "output": [f"The number is {i}, and twice it is {2 * i}." for i in range(16)],
    }
)


def lora_config(**changes) -> TrainConfig:
    # Dropout on: its masks must not depend on which process runs a micro-batch.
    values = dict(epochs=4, learning_rate=5e-3, batch_size=2, max_length=64, precision="fp32", device="cpu",
                  lora_dropout=0.1, checkpoint_every=1, processes=2, global_batch=4)
    return TrainConfig(**{**values, **changes})


def weights(folder: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(folder / name)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    shared = a.keys() & b.keys()
    assert shared and all(k in shared for k in b), f"different tensors: {sorted(a.keys() ^ b.keys())}"
    return max(float((a[k] - b[k]).abs().max()) for k in shared)


@pytest.fixture
def one_thread():
    """In-process runs on one thread, like each launched process (2 threads on 2 busy
    cores make tiny matrices ~20x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def two_process_run(tiny_llama_dir: Path, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted 2-process LoRA run (the reference for two tests)."""
    out = tmp_path_factory.mktemp("ddp") / "model"
    summary = train_model(str(tiny_llama_dir), ROWS, lora_config(), out, progress=False)
    return out, summary


def test_two_processes_equal_one_process_with_the_same_global_batch(tiny_llama_dir: Path, tmp_path: Path,
                                                                     two_process_run, one_thread):
    two_out, two = two_process_run
    one = train_model(str(tiny_llama_dir), ROWS, lora_config(processes=1), tmp_path / "one", progress=False)
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["global_batch"] == one["global_batch"] == 4
    assert two["micro_batches_per_step"] == one["micro_batches_per_step"] == 2
    assert two["idle_slots_per_step"] == one["idle_slots_per_step"] == 0
    assert two["optimizer_steps"] == one["optimizer_steps"] == 16 and two["resumed_from_step"] == 0
    assert two["tokens"] == one["tokens"] > 0
    assert two["peak_memory_mb"] > 0 and two["tokens_per_second"] > 0
    assert abs(two["last_loss"] - one["last_loss"]) < 1e-4  # the same micro-batches, gathered in order
    assert max_difference(weights(two_out), weights(tmp_path / "one")) <= WEIGHT_TOLERANCE
    # and training did move the adapter (lora_B starts at zero)
    assert max(float(w.abs().max()) for k, w in weights(two_out).items() if "lora_B" in k) > 1e-3


def test_two_processes_that_leave_a_slot_idle_equal_one_process(tiny_llama_dir: Path, tmp_path: Path, one_thread,
                                                                 caplog):
    # 3 micro-batches per step on 2 processes: 2 slots each, one of them padding every
    # step; 2 epochs of 8 micro-batches: a short last step of 1 (the second process pads only)
    config = lora_config(global_batch=6, epochs=2)
    with caplog.at_level("WARNING", logger="mods.training.train"):
        two = train_model(str(tiny_llama_dir), ROWS, config, tmp_path / "two", progress=False)
    assert "1 of 4 slots per step idle" in caplog.text and "global_batch=4 or 8" in caplog.text
    one = train_model(str(tiny_llama_dir), ROWS, config.model_copy(update={"processes": 1}), tmp_path / "one",
                      progress=False)
    assert two["micro_batches_per_step"] == one["micro_batches_per_step"] == 3
    assert two["idle_slots_per_step"] == 1 and one["idle_slots_per_step"] == 0
    assert two["optimizer_steps"] == one["optimizer_steps"] == 6 and two["tokens"] == one["tokens"]
    assert abs(two["last_loss"] - one["last_loss"]) < 1e-4
    assert max_difference(weights(tmp_path / "two"), weights(tmp_path / "one")) <= WEIGHT_TOLERANCE
    assert max(float(w.abs().max()) for k, w in weights(tmp_path / "two").items() if "lora_B" in k) > 1e-3


def test_mods_train_on_two_processes_leaves_no_checkpoints(tiny_llama_dir: Path, tmp_path: Path):
    from flows.cli import main

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS.head(8).to_dict(orient="records")))
    out = tmp_path / "model"
    # checkpoint_every (100) is past the run's steps: a short run saves none, and the
    # stale folder of an earlier, interrupted run must go too
    stale = tmp_path / ".model.checkpoints"
    (stale / "step-00000001").mkdir(parents=True)
    assert main(["train", str(data), "--base-model", str(tiny_llama_dir), "--out", str(out), "--epochs", "1",
                 "--max-length", "48", "--batch-size", "2", "--global-batch", "4", "--processes", "2",
                 "--device", "cpu", "--quiet"]) == 0
    assert (out / "adapter_model.safetensors").is_file()
    meta = json.loads((out / "mods_model.json").read_text())
    assert meta["summary"]["processes"] == 2 and meta["summary"]["global_batch"] == 4
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model", "rows.jsonl"]


DRIVER = """
import json, sys
from pathlib import Path
import pandas as pd
from mods.training.config import TrainConfig
from mods.training.train import train_model
spec = json.loads(Path(sys.argv[1]).read_text())
summary = train_model(spec["model"], pd.DataFrame(spec["rows"]), TrainConfig(**spec["config"]), Path(spec["out"]),
                      progress=False, checkpoint_dir=Path(spec["checkpoint_dir"]))
print(json.dumps(summary))
"""


def start_driver(tmp_path: Path, model: Path, config: TrainConfig, out: Path, checkpoints: Path) -> subprocess.Popen:
    """train_model in a process of its own (and its own process group), as a worker runs it."""
    spec = {"model": str(model), "rows": ROWS.to_dict(orient="list"), "config": config.model_dump(mode="json"),
            "out": str(out), "checkpoint_dir": str(checkpoints)}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # preexec_fn: Ctrl-C works as in a terminal's foreground job even when this test runs in
    # a background job, whose children a shell starts with SIGINT ignored (inherited).
    return subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "spec.json")],
                            env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def newest_step(checkpoints: Path) -> int:
    steps = [int(p.name.removeprefix("step-")) for p in checkpoints.glob("step-*")] if checkpoints.is_dir() else []
    return max(steps, default=0)


def processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def wait_until_gone(text: str, seconds: float = 30) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def kill_9_at_half(tmp_path: Path, model: Path, config: TrainConfig, out: Path, checkpoints: Path,
                   total: int) -> int:
    """Start train_model in a process of its own, `kill -9` its process group once the
    checkpoint of half the steps exists; the newest checkpoint's step."""
    driver = start_driver(tmp_path, model, config, out, checkpoints)
    deadline = time.monotonic() + 120
    while newest_step(checkpoints) < total // 2 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(driver.pid, signal.SIGKILL)  # the caller and its whole process group
    driver.wait()
    killed_at = newest_step(checkpoints)
    assert 0 < killed_at < total, f"no kill mid-run (newest checkpoint: step {killed_at} of {total})"
    assert not (out / "adapter_model.safetensors").exists()
    # the launched processes die with their caller: nothing trains on as an orphan
    assert wait_until_gone(str(tmp_path)) == []
    return killed_at


def test_kill_9_at_half_then_rerun_resumes_to_the_same_weights(tiny_llama_dir: Path, tmp_path: Path, two_process_run):
    reference_out, reference = two_process_run
    out, checkpoints = tmp_path / "model", tmp_path / "checkpoints"
    total = reference["optimizer_steps"]
    killed_at = kill_9_at_half(tmp_path, tiny_llama_dir, lora_config(), out, checkpoints, total)

    summary = train_model(str(tiny_llama_dir), ROWS, lora_config(), out, progress=False, checkpoint_dir=checkpoints)
    assert summary["resumed_from_step"] >= killed_at > 0
    assert summary["tokens"] == reference["tokens"]  # per-micro-batch records survive the resume
    assert abs(summary["last_loss"] - reference["last_loss"]) < 1e-4
    assert max_difference(weights(out), weights(reference_out)) <= WEIGHT_TOLERANCE
    # train_model leaves the checkpoints to its caller, and kept only the newest one
    assert [p.name for p in checkpoints.iterdir()] == [f"step-{total - 1:08d}"]


@pytest.mark.parametrize("saved_by, resumed_by", [(2, 1), (1, 2)])
def test_a_lora_checkpoint_resumes_on_another_number_of_processes(tiny_llama_dir: Path, tmp_path: Path,
                                                                   two_process_run, one_thread, saved_by, resumed_by):
    """A stage retried on a worker with another number of GPUs resumes its checkpoint (a
    replicated one: weights, optimiser, scheduler; the steps do not depend on the count)."""
    reference_out, reference = two_process_run
    out, checkpoints = tmp_path / "model", tmp_path / "checkpoints"
    total = reference["optimizer_steps"]
    killed_at = kill_9_at_half(tmp_path, tiny_llama_dir, lora_config(processes=saved_by), out, checkpoints, total)
    summary = train_model(str(tiny_llama_dir), ROWS, lora_config(processes=resumed_by), out, progress=False,
                          checkpoint_dir=checkpoints)
    assert summary["processes"] == resumed_by
    assert summary["resumed_from_step"] >= killed_at > 0
    assert summary["optimizer_steps"] == total and summary["tokens"] == reference["tokens"]
    assert abs(summary["last_loss"] - reference["last_loss"]) < 1e-4
    assert max_difference(weights(out), weights(reference_out)) <= WEIGHT_TOLERANCE

    # and back: that run left its checkpoint of step 15 of 16 (odd: with 2 processes each
    # has one slot per step, with 1 process two), resumed by the first count
    assert newest_step(checkpoints) == total - 1
    back = train_model(str(tiny_llama_dir), ROWS, lora_config(processes=saved_by), tmp_path / "back", progress=False,
                       checkpoint_dir=checkpoints)
    assert back["resumed_from_step"] == total - 1
    assert max_difference(weights(tmp_path / "back"), weights(reference_out)) <= WEIGHT_TOLERANCE


def test_interrupting_the_caller_stops_the_processes(tiny_llama_dir: Path, tmp_path: Path):
    out, checkpoints = tmp_path / "model", tmp_path / "checkpoints"
    driver = start_driver(tmp_path, tiny_llama_dir, lora_config(epochs=40), out, checkpoints)
    deadline = time.monotonic() + 120
    while newest_step(checkpoints) < 1 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert driver.poll() is None, "training ended before it could be interrupted"
    os.kill(driver.pid, signal.SIGINT)  # Ctrl+C: KeyboardInterrupt in train_model's caller only
    output = driver.communicate(timeout=90)[0].decode(errors="replace")
    assert driver.returncode != 0 and "KeyboardInterrupt" in output
    assert wait_until_gone(str(tmp_path)) == []
    assert not (out / "adapter_model.safetensors").exists()


def test_a_failing_process_raises_one_clear_error(tiny_llama_dir: Path, tmp_path: Path):
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")  # the tokenizer still loads
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("train_model hung after a process failed"))
    signal.alarm(180)
    try:
        with pytest.raises(TrainingProcessError) as caught:
            train_model(str(broken), ROWS, lora_config(), tmp_path / "model", progress=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    message = str(caught.value)
    first_line = message.splitlines()[0]
    assert first_line.startswith("training process ") and " of 2 failed: " in first_line
    assert "safetensors" in message.lower() or "header" in message.lower()  # the child's own error
    assert "last lines of the training log" in message
    assert not (tmp_path / "model").exists()
    assert list(tmp_path.glob(".mods-train-*")) == []  # the hand-over folder is cleaned up


def _fsdp2_missing() -> str | None:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no FSDP2 (fully_shard), the only FSDP that runs on CPU with gloo"
    return None


@pytest.mark.skipif(_fsdp2_missing() is not None, reason=_fsdp2_missing() or "")
def test_fsdp_full_fine_tuning_on_two_processes_matches_one_and_resumes(tiny_llama_dir: Path, tmp_path: Path,
                                                                        one_thread):
    full = dict(method="full", epochs=2, learning_rate=1e-3, lora_dropout=0.0, checkpoint_every=3)
    checkpoints = tmp_path / "checkpoints"
    # FSDP's own activation checkpointing on, to run that path too (it must not change the result)
    sharded = train_model(str(tiny_llama_dir), ROWS, lora_config(**full, gradient_checkpointing=True),
                          tmp_path / "fsdp", progress=False, checkpoint_dir=checkpoints)
    assert sharded["fsdp"] is True and sharded["processes"] == 2 and sharded["optimizer_steps"] == 8
    assert sharded["gradient_checkpointing"] is True
    # each process wrote its own shard of the weights and of the optimiser state
    saved = next(checkpoints.glob("step-*"))
    assert (saved / "pytorch_model_fsdp_0").is_dir() and (saved / "optimizer_0").is_dir()

    # one process cannot load a checkpoint sharded over two: it starts over (and, saving
    # nothing with checkpoint_every 0, leaves the sharded checkpoint for the rerun below)
    single = train_model(str(tiny_llama_dir), ROWS, lora_config(**{**full, "checkpoint_every": 0}, processes=1),
                         tmp_path / "single", progress=False, checkpoint_dir=checkpoints)
    assert single["fsdp"] is False and single["resumed_from_step"] == 0
    assert max_difference(weights(tmp_path / "fsdp"), weights(tmp_path / "single")) <= WEIGHT_TOLERANCE

    # a rerun resumes from the sharded checkpoint (step 6 of 8) and ends at the same weights
    again = train_model(str(tiny_llama_dir), ROWS, lora_config(**full), tmp_path / "again", progress=False,
                        checkpoint_dir=checkpoints)
    assert again["resumed_from_step"] == 6
    assert max_difference(weights(tmp_path / "again"), weights(tmp_path / "fsdp")) <= WEIGHT_TOLERANCE

    from mods.training.train import load_trained_model

    model, _ = load_trained_model(tmp_path / "fsdp", device="cpu")
    assert model.config.use_cache and model.lm_head.weight is model.model.embed_tokens.weight
