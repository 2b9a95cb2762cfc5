"""The numbers behind the tables: how far a measured agreement could be off (Wilson), whether
wins and losses differ beyond chance (sign test), win/tie/lose per test set, and the figure
a judge is trusted on."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from mods.evaluation.judges import count_outcomes


def wilson_interval(hits: float, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """95% interval of a proportion (Wilson): how far a measured agreement could be off."""
    if n <= 0:
        return None
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_test_p(wins: int, losses: int) -> float | None:
    """Two-sided sign test of wins against losses (ties left out): the chance of a split at
    least this uneven if neither model were better."""
    n = wins + losses
    if n == 0:
        return None
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def comparison_rows(judge: str, a: str, b: str, judged: pd.DataFrame, test_sets: Sequence[str]) -> list[dict[str, Any]]:
    """One {"a", "b", "test_set", "win", "tie", "lose", "judge"} per test set (in the given order)."""
    rows = []
    for name in test_sets:
        counts = count_outcomes(judged.loc[judged["test_set"] == name, "outcome"].tolist())
        rows.append({"a": a, "b": b, "test_set": name, **counts, "judge": judge})
    return rows


def trust_figure(agreement: Mapping[str, Any] | None) -> float | None:
    """The agreement a judge is trusted on: measured on the pairs, or, where the judge was
    fitted on those very pairs (in-sample), its cross-validated figure."""
    if not agreement:
        return None
    return agreement.get("held_out_agreement") if agreement.get("in_sample") else agreement.get("agreement")


def trusted(agreement: Mapping[str, Any] | None, threshold: float) -> bool:
    value = trust_figure(agreement)
    return value is not None and value >= threshold
