"""Threshold rules of the method: keep high quality (above alpha), keep what the seed model
still lacks (below beta). Fractions are the scale-free alternative for scorers whose
scores have no calibrated zero (the offline likelihood scorer)."""

from __future__ import annotations

import numpy as np


def keep_above(scores: np.ndarray, alpha: float | None = None, fraction: float | None = None) -> np.ndarray:
    """Boolean mask: score > alpha, or the best ``fraction`` (ties broken by position)."""
    scores = np.asarray(scores, dtype=np.float64)
    if alpha is not None:
        return scores > alpha
    if fraction is None:
        raise ValueError("give alpha or fraction")
    count = int(round(len(scores) * fraction))
    mask = np.zeros(len(scores), dtype=bool)
    if count:
        # Stable sort of -score: equal scores keep input order, so the result is deterministic.
        mask[np.argsort(-scores, kind="stable")[:count]] = True
    return mask


def keep_below(scores: np.ndarray, beta: float | None = None, fraction: float | None = None) -> np.ndarray:
    """Boolean mask: score < beta, or the worst ``fraction``."""
    scores = np.asarray(scores, dtype=np.float64)
    if beta is not None:
        return scores < beta
    if fraction is None:
        raise ValueError("give beta or fraction")
    count = int(round(len(scores) * fraction))
    mask = np.zeros(len(scores), dtype=bool)
    if count:
        mask[np.argsort(scores, kind="stable")[:count]] = True
    return mask
