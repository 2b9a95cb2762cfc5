"""Selection budgets: a set's size in rows or in tokens, and caps per source.

Trainers think in tokens, and a mix needs per-source caps. A ``Budget`` is what a
coverage method (mods/selection/coverage_methods.py) may still spend: every candidate has a cost
(1 row, or its tokens in the training format counted with the base model's tokenizer)
and may belong to a capped source group. Both only shrink as rows are picked, so a
candidate that no longer fits never fits again (the methods drop it for good).
"""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import PurePath
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import pandas as pd

from mods.data.conversations import row_conversation
from mods.data.prompts import answer_suffix, chat_prompt
from mods.models.loading import resolve_model_path
from mods.training.data import conversation_token_count

BudgetUnit = Literal["rows", "tokens"]


def training_token_counts(tokenizer: Any, frame: pd.DataFrame) -> np.ndarray:
    """Tokens each row costs in training, untruncated (mods.training.data.encode_rows without
    the ``max_length`` cut): prompt (the training format) + answer + end of answer; a
    conversation row (``ingest.turn: conversation``), every turn of its conversation."""
    if frame.empty:
        return np.zeros(0, dtype=np.int64)
    suffix = answer_suffix(tokenizer)
    prompts = [chat_prompt(tokenizer, str(i), str(x)) for i, x in zip(frame["instruction"], frame["input"])]
    answers = [str(o) + suffix for o in frame["output"]]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    counts = np.array([len(p) + len(a) for p, a in zip(prompt_ids, answer_ids)], dtype=np.int64)
    if "messages" in frame.columns:
        for row, record in enumerate(frame.to_dict("records")):
            conversation = row_conversation(record)
            if conversation is not None:
                counts[row] = conversation_token_count(tokenizer, conversation)
    return counts


def count_tokens(base_model: str, frame: pd.DataFrame) -> np.ndarray:
    """``training_token_counts`` with the base model's tokenizer (no model weights loaded)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(base_model, field="base_model")))
    return training_token_counts(tokenizer, frame)


def source_matches(source: str, pattern: str) -> bool:
    """A quota's pattern (a glob) matches a row's source path, or one of its folder or file names."""
    return fnmatch(source, pattern) or any(fnmatch(part, pattern) for part in PurePath(source).parts)


def source_groups(sources: Sequence[str], patterns: Sequence[str]) -> np.ndarray:
    """Each row's quota group: the index of the first pattern its source matches, -1 for none."""
    groups = np.full(len(sources), -1, dtype=np.int64)
    by_source: dict[str, int] = {}
    for row, source in enumerate(sources):
        if source not in by_source:
            by_source[source] = next((g for g, p in enumerate(patterns) if source_matches(str(source), p)), -1)
        groups[row] = by_source[source]
    return groups


class Budget:
    """What a selection may still spend: ``total`` in its unit, and per source group a cap."""

    def __init__(self, unit: BudgetUnit, total: int, costs: np.ndarray, groups: np.ndarray | None = None,
                 caps: Sequence[int] = ()) -> None:
        self.unit, self.total = unit, int(total)
        self.costs = np.asarray(costs, dtype=np.int64)
        self.groups = np.full(len(self.costs), -1, dtype=np.int64) if groups is None else np.asarray(groups)
        self.caps_left = np.asarray(list(caps), dtype=np.int64)
        self.left = int(total)
        self.spent_by_group = np.zeros(len(self.caps_left), dtype=np.int64)

    @property
    def plain_rows(self) -> bool:
        """Rows with no caps: the paper's setting (k-center then runs its exact fast path)."""
        return self.unit == "rows" and not len(self.caps_left)

    def fits(self) -> np.ndarray:
        """Boolean mask of the candidates that still fit the budget and their group's cap."""
        ok = self.costs <= self.left
        if len(self.caps_left):
            capped = self.groups >= 0
            room = np.where(capped, self.caps_left[np.where(capped, self.groups, 0)], np.iinfo(np.int64).max)
            ok &= self.costs <= room
        return ok

    def fits_one(self, row: int) -> bool:
        cost = self.costs[row]
        group = self.groups[row]
        return bool(cost <= self.left and (group < 0 or cost <= self.caps_left[group]))

    def take(self, row: int) -> None:
        cost = int(self.costs[row])
        self.left -= cost
        group = int(self.groups[row])
        if group >= 0:
            self.caps_left[group] -= cost
            self.spent_by_group[group] += cost


def make_budget(unit: BudgetUnit, total: int, costs: np.ndarray, sources: Sequence[str],
                caps: Mapping[str, int], shares: Mapping[str, float]) -> Budget:
    """A budget with a cap per source pattern: the smaller of its absolute cap and its share
    of ``total`` (rounded down), in the budget's unit."""
    patterns = list(dict.fromkeys([*caps, *shares]))
    limits = [min(int(caps.get(p, total)), int(np.floor(shares.get(p, 1.0) * total))) for p in patterns]
    groups = source_groups(list(sources), patterns) if patterns else None
    return Budget(unit, total, costs, groups, limits)
