"""Training and generation on a tiny randomly initialised Llama (fast, meaningless outputs)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from mods.generation import GenerationConfig, generate_answers
from mods.training import TRAINED_MODEL_META, TrainConfig, encode_rows, length_grouped_batches, load_trained_model, train_model

ROWS = pd.DataFrame(
    {
        "instruction": ["Say hello.", "Add two and three.", "Name a colour.", "Translate 'cat' to French."] * 2,
        "input": ["", "", "", ""] * 2,
        "output": ["Hello!", "Two plus three is five.", "Blue.", "Chat."] * 2,
    }
)


def test_prompt_tokens_are_masked_and_rows_cut_to_max_length(tiny_llama_dir: Path):
    from mods.models import load_causal_lm

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
    config = TrainConfig(epochs=8, learning_rate=5e-3, batch_size=4, max_length=64, lora_r=8,
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
