"""Training rows as token ids: prompt + answer + end-of-answer token, with the prompt
masked out of the loss (label -100), and micro-batches padded into tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd
import torch

from mods.prompts import answer_suffix, chat_prompt


# What training reads of a row (and so what a trained model depends on).
TRAINING_COLUMNS = ("instruction", "input", "output")


@dataclass
class EncodedRow:
    input_ids: list[int]
    labels: list[int]


def encode_rows(tokenizer: Any, frame: pd.DataFrame, max_length: int) -> list[EncodedRow]:
    """Prompt + answer + end-of-answer token; the loss sees only the answer.

    Over-long rows keep the end of the prompt (closest to the answer) and the start of
    the answer, at least a quarter of ``max_length`` for the answer.
    """
    suffix = answer_suffix(tokenizer)
    encoded: list[EncodedRow] = []
    for instruction, input_text, output in zip(*(frame[column] for column in TRAINING_COLUMNS)):
        prompt_ids = tokenizer(chat_prompt(tokenizer, instruction, input_text), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(str(output) + suffix, add_special_tokens=False)["input_ids"]
        max_prompt = max_length - min(len(answer_ids), max(1, max_length // 4))
        if len(prompt_ids) > max_prompt:
            prompt_ids = prompt_ids[-max_prompt:]
        answer_ids = answer_ids[: max_length - len(prompt_ids)]
        encoded.append(EncodedRow(prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    return encoded


def collate(rows: Sequence[EncodedRow], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
