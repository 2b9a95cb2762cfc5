"""Training and generation on a tiny randomly initialised Llama (fast, meaningless outputs)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from mods.generation.answers import generate_answers
from mods.generation.config import GenerationConfig
from mods.training.config import TrainConfig
from mods.training.data import encode_rows
from mods.training.plan import length_grouped_batches
from mods.training.process import TRAINED_MODEL_META
from mods.training.train import load_trained_model, train_model

ROWS = pd.DataFrame(
    {
        "instruction": ["Say hello.", "Add two and three.", "Name a colour.", "Translate 'cat' to French."] * 2,
        "input": ["", "", "", ""] * 2,
        "output": ["Hello!", "Two plus three is five.", "Blue.", "Chat."] * 2,
    }
)


def test_prompt_tokens_are_masked_and_rows_cut_to_max_length(tiny_llama_dir: Path):
    from mods.models.loading import load_causal_lm

    _, tokenizer = load_causal_lm(tiny_llama_dir, device="cpu")
    long = pd.DataFrame({"instruction": ["word " * 300], "input": [""], "output": ["answer " * 300]})
    encoded = encode_rows(tokenizer, pd.concat([ROWS, long], ignore_index=True), max_length=64)
    for row in encoded:
        assert len(row.input_ids) == len(row.labels) <= 64
        first_label = next(i for i, label in enumerate(row.labels) if label != -100)
        assert all(label == -100 for label in row.labels[:first_label])
        assert row.labels[first_label:] == row.input_ids[first_label:]
    # the over-long row keeps a quarter of the budget for its answer
    assert sum(label != -100 for label in encoded[-1].labels) >= 16
    # short rows end with the end-of-answer token, so the model learns to stop
    assert encoded[0].input_ids[-1] == tokenizer.eos_token_id


def test_length_grouped_batches_cover_every_row_once():
    lengths = [5, 50, 7, 48, 6, 49, 30]
    batches = length_grouped_batches(lengths, batch_size=2, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    # neighbours in length share a batch: the batches are consecutive runs of the sorted order
    assert sorted(sorted(lengths[i] for i in b) for b in batches) == [[5, 6], [7, 30], [48, 49], [50]]
    assert length_grouped_batches(lengths, 2, seed=1) == batches  # seeded order


def test_lora_training_lowers_the_loss_and_reloads(tiny_llama_dir: Path, tmp_path: Path):
    config = TrainConfig(epochs=8, learning_rate=5e-3, batch_size=4, global_batch=4, max_length=64, lora_r=8,
                         lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], device="cpu")
    summary = train_model(str(tiny_llama_dir), ROWS, config, tmp_path / "model", progress=False)
    assert summary["rows"] == len(ROWS) and summary["tokens"] > 0
    assert summary["mean_loss_last_epoch"] < summary["mean_loss_first_epoch"]
    meta = json.loads((tmp_path / "model" / TRAINED_MODEL_META).read_text())
    assert meta["base_model"] == str(tiny_llama_dir) and meta["method"] == "lora"
    assert (tmp_path / "model" / "adapter_model.safetensors").is_file()

    model, tokenizer = load_trained_model(tmp_path / "model", device="cpu")
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged for fast inference
    base, _ = load_trained_model(tiny_llama_dir, device="cpu")
    changed = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
    assert changed


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only: VmHWM reset")
def test_peak_memory_is_the_trainings_not_the_processs(tiny_llama_dir: Path, tmp_path: Path):
    """An in-process pipeline trains after stages that held more memory than training: the
    summary's peak on CPU starts at the training, not at the process's start."""
    import resource

    import numpy as np
    import psutil

    held = np.ones(2**30 // 8)  # 1 GiB resident, then freed, as an earlier stage's model
    del held
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    resident_before = psutil.Process().memory_info().rss / 2**20
    config = TrainConfig(epochs=1, batch_size=4, global_batch=4, max_length=48, device="cpu")
    summary = train_model(str(tiny_llama_dir), ROWS, config, tmp_path / "model", progress=False)
    assert 0.8 * resident_before <= summary["peak_memory_mb"] < process_peak - 512, (summary["peak_memory_mb"],
                                                                                      process_peak, resident_before)
    assert 0.8 * resident_before <= summary["memory_at_start_mb"] <= summary["peak_memory_mb"]


def test_full_fine_tuning_saves_a_whole_model(tiny_llama_dir: Path, tmp_path: Path):
    config = TrainConfig(method="full", epochs=1, learning_rate=1e-3, batch_size=4, max_length=48, device="cpu")
    train_model(str(tiny_llama_dir), ROWS.head(4), config, tmp_path / "full", progress=False)
    assert (tmp_path / "full" / "model.safetensors").is_file()
    model, _ = load_trained_model(tmp_path / "full", device="cpu")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_empty_training_set_is_a_clear_error(tiny_llama_dir: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="no rows to train on"):
        train_model(str(tiny_llama_dir), ROWS.head(0), TrainConfig(device="cpu"), tmp_path / "m", progress=False)


def test_generation_is_deterministic_in_input_order_and_batch_invariant(tiny_llama_dir: Path):
    model, tokenizer = load_trained_model(tiny_llama_dir, device="cpu")
    instructions = ["Say hello.", "A much longer instruction about adding numbers together please.", "Colour?"]
    inputs = ["", "2 and 3", ""]
    one = generate_answers(model, tokenizer, instructions, inputs, GenerationConfig(max_new_tokens=8, batch_size=1), progress=False)
    three = generate_answers(model, tokenizer, instructions, inputs, GenerationConfig(max_new_tokens=8, batch_size=3), progress=False)
    assert len(one) == 3 and one == three
    # each answer belongs to its own prompt: reversing the inputs reverses the answers
    rev = generate_answers(model, tokenizer, instructions[::-1], inputs[::-1], GenerationConfig(max_new_tokens=8, batch_size=2), progress=False)
    assert rev == one[::-1]


def test_generation_rejects_mismatched_lengths(tiny_llama_dir: Path):
    model, tokenizer = load_trained_model(tiny_llama_dir, device="cpu")
    with pytest.raises(ValueError, match="same length"):
        generate_answers(model, tokenizer, ["a", "b"], [""], GenerationConfig(), progress=False)


# --- the plan, checkpoints and configuration (processes themselves: test_training_distributed.py)


def test_every_process_split_of_a_global_batch_runs_the_same_micro_batches_per_step():
    from mods.training.plan import training_plan

    lengths = [5, 9, 3, 7, 8, 2, 6, 4, 1, 10, 11]  # 11 rows, batch 2: 6 micro-batches per epoch
    config = TrainConfig(batch_size=2, global_batch=4, epochs=1.5, seed=3)
    two = training_plan(lengths, config, processes=2)
    one = training_plan(lengths, config, processes=1)
    assert two.micro_batches == one.micro_batches and len(two.micro_batches) == 9  # 1.5 epochs of 6
    assert two.total_steps == one.total_steps == 5
    assert (two.accumulation, one.accumulation) == (1, 2)
    for step in range(5):
        split = two.for_process(step, 0) + two.for_process(step, 1)
        assert split == one.for_process(step, 0)
    # the short last step is padded (None: weight 0) so both processes take part
    assert two.for_process(4, 0) == [8] and two.for_process(4, 1) == [None]
    assert one.for_process(4, 0) == [8, None]
    # the second epoch is reshuffled; every row is in every full epoch exactly once
    assert sorted(i for b in two.micro_batches[:6] for i in b) == list(range(11))


def _emulated_update(plan, losses: "torch.Tensor") -> list["torch.Tensor"]:
    """Per optimiser step, the gradient the training loop's weighting gives: each process
    sums (weight × loss / A) over its slots (accelerate's accumulation), then the processes'
    gradients are averaged (DDP/FSDP). ``losses[i]`` is micro-batch i's loss as a function
    of the parameters, so the gradient of the step's weighted sum is what one update uses."""
    steps = []
    for step in range(plan.total_steps):
        per_process = []
        for rank in range(plan.processes):
            total = torch.zeros(())
            for index in plan.for_process(step, rank):
                # padding runs the step's first micro-batch, with weight 0
                loss = losses[index if index is not None else step * plan.per_step]
                total = total + loss * plan.loss_weight(step, index) / plan.accumulation
            per_process.append(total)
        steps.append(sum(per_process) / plan.processes)
    return steps


def test_a_process_count_that_does_not_divide_the_step_gives_the_same_update():
    from mods.training.plan import idle_slots_warning, training_plan

    lengths = list(range(1, 15))  # 14 rows, batch 2: 7 micro-batches per epoch
    config = TrainConfig(batch_size=2, global_batch=6, epochs=1, seed=1)  # M = 3 micro-batches per step
    one = training_plan(lengths, config, processes=1)
    two = training_plan(lengths, config, processes=2)  # A = 2: one padding slot per step
    assert one.micro_batches == two.micro_batches and one.total_steps == two.total_steps == 3
    assert (two.accumulation, two.idle_slots_per_step) == (2, 1)
    assert two.for_process(0, 0) == [0, 1] and two.for_process(0, 1) == [2, None]
    # the short last step (1 real micro-batch of 3): the second process runs only padding
    assert two.for_process(2, 0) == [6, None] and two.for_process(2, 1) == [None, None]
    assert two.real_in_step(2) == 1 and two.loss_weight(2, None) == 0.0

    # every real micro-batch counts 1/n in its step (n real micro-batches), for any process
    # count: the update is the mean of the step's micro-batch losses, not diluted by padding
    losses = torch.rand(len(one.micro_batches), dtype=torch.float64) + 0.5
    expected = [losses[0:3].mean(), losses[3:6].mean(), losses[6:7].mean()]
    for processes in (1, 2, 3, 4, 5):
        plan = training_plan(lengths, config, processes=processes)
        update = _emulated_update(plan, losses)
        assert torch.allclose(torch.stack(update), torch.stack(expected), rtol=0, atol=1e-12), processes
    # and with gradients: a toy model, each micro-batch's loss a function of the weights
    weights = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    inputs = torch.randn(len(one.micro_batches), 2, dtype=torch.float64)
    gradients = {}
    for plan in (one, two):
        per_micro_batch = ((inputs @ weights) - 1.0) ** 2
        update = _emulated_update(plan, per_micro_batch)
        gradients[plan.processes] = [torch.autograd.grad(u, weights, retain_graph=True)[0] for u in update]
    for a, b in zip(gradients[1], gradients[2]):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)

    # idle slots are said, with the global batches that would use every process
    assert idle_slots_warning(config, 1) is None and idle_slots_warning(config, 3) is None
    message = idle_slots_warning(config, 2)
    assert "1 of 4 slots per step idle" in message and "global_batch=4 or 8" in message
    assert "7 of 8 slots" in idle_slots_warning(TrainConfig(), 8)  # default 8 rows, 1 micro-batch, 8 GPUs


def test_latest_checkpoint_skips_partial_and_foreign_checkpoints(tmp_path: Path):
    from mods.training.checkpoints import CHECKPOINT_META, latest_checkpoint

    def checkpoint(name: str, step: int, fingerprint: str) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / CHECKPOINT_META).write_text(json.dumps({"step": step, "fingerprint": fingerprint}))

    assert latest_checkpoint(tmp_path, "run") is None
    checkpoint("step-00000004", 4, "run")
    checkpoint("step-00000009", 9, "another run")  # other rows or settings
    checkpoint(".tmp-step-00000008", 8, "run")  # a save cut short by a kill
    (tmp_path / "step-00000006").mkdir()  # no metadata: never complete
    folder, meta = latest_checkpoint(tmp_path, "run")
    assert folder.name == "step-00000004" and meta["step"] == 4
    assert latest_checkpoint(None, "run") is None


def test_train_config_is_strict_and_one_process_on_cpu():
    from pydantic import ValidationError

    from mods.training.plan import micro_batches_per_step, resolve_processes, slots_per_process

    assert TrainConfig.model_fields["lora_target_modules"].default == ["q_proj", "v_proj"]  # shown in the UI form
    with pytest.raises(ValidationError, match="extra"):
        TrainConfig(procs=2)
    with pytest.raises(ValidationError):
        TrainConfig(processes=0)
    assert resolve_processes(TrainConfig(device="cpu")) == 1
    assert resolve_processes(TrainConfig(device="cpu", processes=3)) == 3
    paper = TrainConfig(batch_size=16, global_batch=128)
    assert micro_batches_per_step(paper) == 8
    assert slots_per_process(paper, 8) == 1 and slots_per_process(paper, 1) == 8 and slots_per_process(paper, 3) == 3
    # a step is whole micro-batches: a one-line error naming both fields
    with pytest.raises(ValidationError) as caught:
        TrainConfig(batch_size=16, global_batch=100)
    problem = caught.value.errors()[0]
    assert problem["loc"] == ("global_batch",) and "\n" not in problem["msg"]
    assert "global_batch=100" in problem["msg"] and "batch_size=16" in problem["msg"]
    with pytest.raises(ValidationError, match="extra"):
        TrainConfig(gradient_accumulation=2)  # the old field is gone, not silently ignored


def test_processes_default_to_every_visible_gpu_and_more_is_a_one_line_error(monkeypatch):
    import mods.training.plan
    from mods.training.plan import resolve_processes

    monkeypatch.setattr(mods.training.plan, "pick_device", lambda device=None: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert resolve_processes(TrainConfig()) == 8
    assert resolve_processes(TrainConfig(processes=3)) == 3
    with pytest.raises(ValueError) as caught:
        resolve_processes(TrainConfig(processes=9))
    assert str(caught.value) == "train.processes=9 but only 8 GPU(s) are visible (one process per GPU)"


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread on 2 busy cores only slows down
    yield
    torch.set_num_threads(before)


def test_gradient_checkpointing_does_not_change_the_weights(tiny_llama_dir: Path, tmp_path: Path, one_thread):
    from safetensors.torch import load_file

    config = TrainConfig(epochs=2, learning_rate=5e-3, batch_size=4, max_length=64, precision="fp32", device="cpu",
                         lora_dropout=0.1, gradient_checkpointing=False)
    assert TrainConfig().gradient_checkpointing  # the default: recomputation (docs/training.md, Memory)
    # checkpoint_every (100) > the run's steps: no checkpoint saved, so no checkpoint folder either
    assert not train_model(str(tiny_llama_dir), ROWS, config, tmp_path / "plain", progress=False,
                           checkpoint_dir=tmp_path / "unused")["gradient_checkpointing"]
    assert not (tmp_path / "unused").exists()
    assert train_model(str(tiny_llama_dir), ROWS, config.model_copy(update={"gradient_checkpointing": True}),
                       tmp_path / "recompute", progress=False)["gradient_checkpointing"]
    plain = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    recompute = load_file(tmp_path / "recompute" / "adapter_model.safetensors")
    assert max(float((plain[k] - recompute[k]).abs().max()) for k in plain) <= 1e-5


def test_a_rerun_resumes_only_a_checkpoint_of_the_same_run(tiny_llama_dir: Path, tmp_path: Path, one_thread):
    from safetensors.torch import load_file

    config = TrainConfig(epochs=3, learning_rate=5e-3, batch_size=2, global_batch=2, max_length=64, precision="fp32",
                         device="cpu", checkpoint_every=4)
    checkpoints = tmp_path / "checkpoints"
    first = train_model(str(tiny_llama_dir), ROWS, config, tmp_path / "first", progress=False, checkpoint_dir=checkpoints)
    assert first["optimizer_steps"] == 12 and first["resumed_from_step"] == 0
    assert [p.name for p in checkpoints.iterdir()] == ["step-00000008"]  # the newest only
    # the same run again: resumes from step 8, ends at the same weights
    again = train_model(str(tiny_llama_dir), ROWS, config, tmp_path / "again", progress=False, checkpoint_dir=checkpoints)
    assert again["resumed_from_step"] == 8 and again["tokens"] == first["tokens"]
    a = load_file(tmp_path / "first" / "adapter_model.safetensors")
    b = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    # another learning rate is another run: its checkpoint is not resumed
    other = train_model(str(tiny_llama_dir), ROWS, config.model_copy(update={"learning_rate": 1e-3}), tmp_path / "other",
                        progress=False, checkpoint_dir=checkpoints)
    assert other["resumed_from_step"] == 0
