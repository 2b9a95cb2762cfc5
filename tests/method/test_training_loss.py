"""The training loss (mods.training.loss) against transformers' ``model(**batch).loss``:
the same value and gradients, with logits only where a label follows."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from mods.training import loss as training_loss
from mods.training.data import collate, encode_rows
from mods.training.loss import causal_lm_loss, mean_cross_entropy, next_token_targets

# Rows of different lengths (padding in a batch), and with max_length 40 two over-long
# ones: one with its prompt cut, one with its answer cut as well.
ROWS = pd.DataFrame({
    "instruction": ["Say hello.", "Add two and three.", "word " * 60, "Name a colour.", "Describe the sea."],
    "input": ["", "", "", "Blue or red?", ""],
    "output": ["Hello!", "Two plus three is five.", "Chat.", "Blue.", "The waves roll in " * 20],
})
MAX_LENGTH = 40


@pytest.fixture(scope="module")
def batch(tiny_llama_dir: Path) -> dict[str, torch.Tensor]:
    from mods.models.loading import load_causal_lm

    _, tokenizer = load_causal_lm(tiny_llama_dir, device="cpu")
    encoded = encode_rows(tokenizer, ROWS, MAX_LENGTH)
    lengths = [len(row.input_ids) for row in encoded]
    assert max(lengths) == MAX_LENGTH and min(lengths) < MAX_LENGTH  # cut rows and padding
    assert encoded[-1].labels[-1] != tokenizer.eos_token_id  # the answer is cut before its end
    return collate(encoded, tokenizer.pad_token_id)


@pytest.fixture
def small_chunks(monkeypatch):
    # 7 rows per chunk of the 1,024-entry vocabulary: several chunks and a short last one.
    monkeypatch.setattr(training_loss, "CHUNK_ELEMENTS", 7 * 1024)


def _model(tiny_llama_dir: Path, lora: bool):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    return model.train()


def _loss_and_grads(model, batch, ours: bool, bf16: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = causal_lm_loss(model, batch) if ours else model(**batch).loss
    (loss * 1.5).backward()  # a loss weight, as the training loop applies
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize(("lora", "bf16"), [(False, False), (True, False), (True, True), (False, True)],
                         ids=["full-fp32", "lora-fp32", "lora-bf16", "full-bf16"])
def test_loss_and_gradients_match_transformers(tiny_llama_dir: Path, batch, small_chunks, lora: bool, bf16: bool):
    model = _model(tiny_llama_dir, lora)
    reference, reference_grads = _loss_and_grads(model, batch, ours=False, bf16=bf16)
    loss, grads = _loss_and_grads(model, batch, ours=True, bf16=bf16)
    # The same kernels; only the order of the loss's sum differs, and in full fine-tuning
    # the tied embedding's gradient from lm_head sums over the kept rows only. Measured
    # here: loss within 1.5e-6 (2e-7 relative); gradients bitwise equal, but for
    # full-bf16 within 2.6e-6 of the largest entry. The tolerances leave room for other
    # CPUs' kernels.
    tolerance = 1e-4 if bf16 else 1e-5
    assert torch.isfinite(loss) and torch.allclose(loss, reference, rtol=1e-6, atol=1e-6)
    assert grads.keys() == reference_grads.keys() and grads
    for name, grad in grads.items():
        scale = float(reference_grads[name].abs().max())
        assert torch.allclose(grad, reference_grads[name], rtol=0, atol=tolerance * max(scale, 1e-3)), name


def test_logits_only_where_a_label_follows(tiny_llama_dir: Path, batch):
    model = _model(tiny_llama_dir, lora=True)
    rows_projected: list[int] = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, out: rows_projected.append(args[0].shape[:-1].numel()))
    try:
        causal_lm_loss(model, batch)
    finally:
        handle.remove()
    keep, targets = next_token_targets(batch["labels"])
    labelled = int((batch["labels"] != -100).sum())
    # every label token but none of the prompt and padding positions; a row's first
    # token is never a label (a prompt precedes it), so each label has a position before it
    assert rows_projected == [targets.numel()] == [labelled]
    assert labelled < batch["labels"].numel() / 2
    # the targets are each row's labels shifted by one, in row-major order
    expected = [int(label) for row in batch["labels"] for label in row[1:] if label != -100]
    assert targets.tolist() == expected and int(keep.sum()) == labelled


def test_chunked_cross_entropy_matches_torch_and_is_nan_without_labels(small_chunks):
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(23, 1024) * 4).to(dtype).requires_grad_()
        targets = torch.randint(0, 1024, (23,))
        loss = mean_cross_entropy(logits, targets)
        (grad,) = torch.autograd.grad(loss * 3, logits)
        reference = torch.nn.functional.cross_entropy(logits.float(), targets)
        (reference_grad,) = torch.autograd.grad(reference * 3, logits)
        assert loss.dtype == torch.float32 and grad.dtype == dtype
        assert torch.allclose(loss, reference, rtol=1e-6)
        assert torch.equal(grad, reference_grad)  # the same kernels, row by row
    empty = mean_cross_entropy(torch.zeros(0, 1024, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert torch.isnan(empty)  # as transformers' mean over no label token
