"""The training loss, without full-vocabulary logits for tokens that carry no loss.

``model(**batch).loss`` (transformers) projects every position onto the vocabulary
(SmolLM2: 49,152 entries per token), upcasts all of it to fp32 and keeps fp32
log-probabilities for the backward, prompt and padding positions (label -100) included:
on the demo's final training 957 MiB of its peak (docs/training.md, *Memory*).
``causal_lm_loss`` computes the same number, the mean cross-entropy over the
micro-batch's label tokens, but

- asks the model for logits only at the positions whose *next* token has a label
  (``logits_to_keep`` as a boolean mask, transformers ≥ 5: the hidden states are sliced
  before ``lm_head``), and
- takes the cross-entropy of those logits in chunks of rows (``_ChunkedCrossEntropy``):
  the forward keeps only the logits, no fp32 log-probabilities; the backward recomputes
  each chunk's fp32 log-softmax and writes its gradient straight into one buffer of the
  logits' dtype. Memory grows with the answer tokens, not with the positions.

The gradient is computed by the same kernels as transformers' loss (log-softmax of the
fp32 upcast, its backward, the cast back to the logits' dtype), so it is the same up to
the order of float additions; the model call goes through the wrapped model (peft, DDP,
FSDP), so their hooks run as before. Under bf16 autocast one more difference: ``lm_head``
multiplies fewer rows, and the bf16 matmul may round a logit one bf16 step differently
for another number of rows (as it does for another thread count). Measured on the demo's
final training (docs/training.md, *Memory*): fp32 losses within 1.2e-7 of
``model(**batch).loss``, bf16 ones within 2.1e-3 after 8 steps (the first step's
gradients bitwise equal); the reference itself moves 1.4e-3 on 1 thread instead of 2.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of prompt and padding tokens (mods.training.data)

# Rows of logits per chunk: this many elements, 32 MB in fp32 (170 rows of SmolLM2's
# 49,152-entry vocabulary, 1,024 of Llama-2's 32,000). A few fp32 copies of one chunk live
# at a time; larger chunks save no time, the log-softmax is bandwidth-bound.
CHUNK_ELEMENTS = 2**23


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, targets)`` for ``labels`` of shape (batch, length): ``keep[b, t]`` is True
    where position ``t`` predicts a labelled token (``labels[b, t + 1] != -100``: the
    shift transformers' causal-LM loss makes), ``targets`` those labels in row-major
    order, the order in which ``logits_to_keep=keep`` returns the logits."""
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    keep = shifted != IGNORE_INDEX
    return keep, shifted[keep]


def _rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``logits`` (rows, vocab) against ``targets`` (rows,), in the
    fp32 of ``logits.float()`` like transformers, one chunk of rows at a time."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rows = _rows_per_chunk(logits.shape[-1])
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            part = logits[start:start + rows].float()
            total += F.cross_entropy(part, targets[start:start + rows], reduction="sum")
        # Only the logits are kept (in their dtype: fp32 under accelerate's autocast, which
        # converts a model's outputs to fp32), no log-probabilities.
        ctx.save_for_backward(logits, targets)
        return total / targets.numel()  # 0 / 0 = nan for no label token, as transformers gives

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        logits, targets = ctx.saved_tensors
        out = torch.empty_like(logits)
        # d(sum / n) = d(sum) · grad / n: the factor transformers' mean reduction applies.
        scale = grad.float() / targets.numel()
        rows = _rows_per_chunk(logits.shape[-1])
        with torch.enable_grad():
            for start in range(0, logits.shape[0], rows):
                part = logits[start:start + rows].detach().float().requires_grad_()
                loss = F.cross_entropy(part, targets[start:start + rows], reduction="sum")
                (part_grad,) = torch.autograd.grad(loss, part, grad_outputs=scale)
                out[start:start + rows] = part_grad  # cast to the logits' dtype, as .float()'s backward does
        return out, None


def mean_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over rows of ``logits`` (rows, vocab), computed in fp32 chunk by
    chunk (equal to ``F.cross_entropy(logits.float(), targets)`` up to float rounding)."""
    # Autocast off: the loss is fp32 by construction, whatever the caller's autocast says.
    with torch.autocast(logits.device.type, enabled=False):
        return _ChunkedCrossEntropy.apply(logits, targets)


def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean cross-entropy over the label tokens of ``batch`` (``input_ids``,
    ``attention_mask``, ``labels`` with -100 for tokens without loss): the value of
    ``model(**batch).loss``, with logits only where a label follows."""
    keep, targets = next_token_targets(batch["labels"])
    output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
    logits = output.logits
    if logits.dim() == 2 and logits.shape[0] == targets.numel():
        return mean_cross_entropy(logits, targets)
    if logits.shape[:2] == keep.shape:
        # A model that ignores a boolean logits_to_keep returns every position: the
        # same loss, only without the memory saving.
        return mean_cross_entropy(logits[keep], targets)
    raise RuntimeError(f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for "
                       f"logits_to_keep of {tuple(keep.shape)} ({targets.numel()} label tokens)")
