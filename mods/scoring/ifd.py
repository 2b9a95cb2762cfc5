"""Instruction-Following Difficulty (IFD; Cherry LLM, arXiv 2308.12032): necessity without generation.

IFD = loss(answer | instruction) / loss(answer alone), both the seed model's mean
per-token cross-entropy over the same answer tokens, in the training format
(mods.training.data.encode_rows: prompt + answer + end-of-answer token). A high IFD says
the instruction barely helps the seed model produce the answer: the row is still needed.
IFD > 1 (the instruction makes the answer *less* likely) marks a misaligned pair; Cherry
LLM drops those rows, and so does the selection (mods.selection.thresholds.necessity_scores).

Two forward passes per row, no generation: Superfiltering (arXiv 2402.00530) shows a
small model's IFD ranks rows like a large one's.

A row's IFD is that of its exchange (instruction, input, output), the one quality and
the rest of the selection score: for a conversation row (``ingest.turn: conversation``)
its first exchange, its later turns unread. (IFD per assistant turn is not done.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from mods.core.keys import KEY_WHEN_SET
from mods.models.loading import MODEL_DTYPE_HELP, ModelDtype
from mods.training.data import TRAINING_COLUMNS, encode_rows


class IfdConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_length: int = Field(512, ge=8, description="IFD: tokens of prompt + answer scored (as in training).")
    batch_size: int = Field(8, ge=1, description="IFD: rows per forward pass.")
    device: str | None = Field(None, description="IFD: 'cpu', 'cuda', or empty for automatic.")
    dtype: ModelDtype = Field("auto", json_schema_extra=KEY_WHEN_SET, description="IFD: " + MODEL_DTYPE_HELP)


IFD_COLUMNS = ("loss_with_instruction", "loss_answer_alone", "ifd")


def _sequences(tokenizer: Any, frame: pd.DataFrame, max_length: int) -> list[tuple[list[int], list[int], int]]:
    """Per row: (prompt + answer ids, [BOS] + answer ids, number of answer tokens scored in both).

    Without a BOS token the answer's first token has no context when the answer stands
    alone, so it is scored in neither pass: both losses cover exactly the same tokens."""
    bos = tokenizer.bos_token_id
    out = []
    for row in encode_rows(tokenizer, frame[list(TRAINING_COLUMNS)], max_length):  # the exchange, even with messages
        answer_start = sum(1 for label in row.labels if label == -100)
        answer = row.input_ids[answer_start:]
        alone = ([bos] + answer) if bos is not None else answer
        scored = len(answer) if bos is not None else max(0, len(answer) - 1)
        out.append((row.input_ids, alone, scored))
    return out


def _mean_losses(model: Any, sequences: list[list[int]], scored: list[int], pad_id: int) -> np.ndarray:
    """Mean cross-entropy of the last ``scored[i]`` tokens of each sequence (one batch).

    Left padding ends every sequence at the same position, so the LM head and the softmax
    run only on the last max(scored) + 1 positions (as the likelihood scorer does)."""
    device = next(model.parameters()).device
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for r, s in enumerate(sequences):
        ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s):] = 1
    position = (mask.cumsum(-1) - 1).clamp(min=0)  # explicit: left padding must not shift positions
    keep = min(width, max(scored) + 1)
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": position.to(device)}
    with torch.no_grad():
        try:
            logits = model(**inputs, logits_to_keep=keep).logits
        except TypeError:  # a model without logits_to_keep
            logits = model(**inputs).logits
    logits = logits[:, -keep:, :].float()
    # logits[:, j] predicts the token at position width - keep + j + 1.
    target = ids[:, width - keep + 1:].to(device)
    token_lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1).cpu().double()
    losses = np.full(len(sequences), np.nan)
    for r, n in enumerate(scored):
        if n > 0:
            losses[r] = -float(token_lp[r, token_lp.shape[1] - n:].mean())
    return losses


def ifd_scores(model: Any, tokenizer: Any, frame: pd.DataFrame, max_length: int) -> pd.DataFrame:
    """The two losses and their ratio for every row of ``frame`` (instruction, input, output),
    in row order; NaN where the answer has no token to score."""
    if frame.empty:
        return pd.DataFrame({c: pd.Series([], dtype=np.float64) for c in IFD_COLUMNS})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seqs = _sequences(tokenizer, frame, max_length)
    scored = [n for _, _, n in seqs]
    with_instruction = _mean_losses(model, [s for s, _, _ in seqs], scored, pad)
    alone = _mean_losses(model, [a for _, a, _ in seqs], scored, pad)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(alone > 0, with_instruction / alone, np.nan)
    return pd.DataFrame({"loss_with_instruction": with_instruction, "loss_answer_alone": alone, "ifd": ratio})
