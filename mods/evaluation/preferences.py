"""Human preference pairs: load them, measure a scorer against them, cross-validate.

The reference set is PandaLM's human-labelled test set (``pandalm_testset_v1.json``,
Wang et al. 2023): 999 records, each one instruction (Self-instruct's test set) with the
answers of two 7B models and the verdicts of three annotators (0 = tie, 1 = the first
answer, 2 = the second). A scorer *agrees* with people on a pair when it scores the
answer people preferred higher.

No Prefect here: the quality-scorer benchmark and the evaluation flow both use it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

# Answers whose character lengths are within this ratio count as "length-matched":
# on those pairs, preferring the longer answer is close to a coin flip, so agreement
# there measures something other than length.
LENGTH_RATIO_MIN = 0.8
LENGTH_RATIO_MAX = 1.25

PAIR_COLUMNS = ["pair_id", "instruction", "input", "answer_a", "answer_b", "human", "group", "unanimous", "length_matched", "systems"]


def _answer(value: object) -> str | None:
    # A few records hold JSON booleans instead of text (a conversion artefact upstream):
    # they are not answers anyone read as text, so they are kept as missing.
    return value if isinstance(value, str) else None


def load_preference_pairs(path: str | Path) -> pd.DataFrame:
    """Every record of a PandaLM-format file as one row per pair.

    Columns: ``pair_id`` (the record's ``idx``), ``instruction``, ``input``,
    ``answer_a``, ``answer_b`` (None where the record holds no text), ``human``
    (0 = a preferred, 1 = b preferred, by majority of the non-tie votes; <NA> for a
    tie or no majority), ``group`` (an integer id of the instruction text, in order of
    first appearance), ``unanimous`` (all three annotators gave the same verdict, a tie
    included), ``length_matched`` (both answers non-blank with a character-length ratio
    within 0.8-1.25) and ``systems`` (the record's ``cmp_key``: which two models answered).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"preference file {path} does not exist")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a JSON file: {exc}") from exc
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path} must hold a non-empty JSON list of records")
    needed = {"instruction", "response1", "response2", "annotator1", "annotator2", "annotator3"}
    group_of: dict[str, int] = {}
    rows = []
    for n, rec in enumerate(records):
        if not isinstance(rec, dict) or not needed <= rec.keys():
            missing = sorted(needed - (rec.keys() if isinstance(rec, dict) else set()))
            raise ValueError(f"{path}: record {n} lacks {missing} (not a PandaLM-format record)")
        votes = [rec["annotator1"], rec["annotator2"], rec["annotator3"]]
        for_a, for_b = votes.count(1), votes.count(2)
        human = 0 if for_a >= 2 else 1 if for_b >= 2 else pd.NA
        a, b = _answer(rec["response1"]), _answer(rec["response2"])
        matched = bool(a and a.strip()) and bool(b and b.strip()) and LENGTH_RATIO_MIN <= len(a) / len(b) <= LENGTH_RATIO_MAX  # type: ignore[arg-type]
        instruction = str(rec["instruction"])
        rows.append(
            {
                "pair_id": rec.get("idx", n),
                "instruction": instruction,
                "input": _answer(rec.get("input")) or "",
                "answer_a": a,
                "answer_b": b,
                "human": human,
                "group": group_of.setdefault(instruction, len(group_of)),
                "unanimous": len(set(votes)) == 1,
                "length_matched": matched,
                "systems": str(rec.get("cmp_key", "")),
            }
        )
    frame = pd.DataFrame(rows, columns=PAIR_COLUMNS)
    frame["human"] = frame["human"].astype("Int8")
    return frame


def human_pairs(path: str | Path) -> pd.DataFrame:
    """The pairs every measurement uses: unanimous, not a tie, and both answers non-empty
    strings (on ``pandalm_testset_v1.json``: 742 pairs over 150 instructions, 176 of
    them length-matched). ``human`` is a plain int there."""
    pairs = load_preference_pairs(path)

    def text(s: object) -> bool:
        return isinstance(s, str) and bool(s.strip())

    nonempty = pairs["answer_a"].map(text) & pairs["answer_b"].map(text)
    keep = pairs["unanimous"] & pairs["human"].notna() & nonempty
    out = pairs[keep].reset_index(drop=True)
    out["human"] = out["human"].astype(np.int64)
    return out


def agreement(score_a: Sequence[float], score_b: Sequence[float], human: Sequence[int]) -> float:
    """Share of pairs where the higher score belongs to the answer people preferred
    (``human`` 0 = a, 1 = b).

    A tie (equal scores, or a score that is NaN) counts as half a pair: it is what a
    coin flip breaking the tie would be expected to get, so a scorer that cannot tell
    two answers apart sits at 50%, never above it.
    """
    a = np.asarray(score_a, dtype=np.float64)
    b = np.asarray(score_b, dtype=np.float64)
    h = np.asarray(human)
    if not (a.shape == b.shape == h.shape) or a.ndim != 1:
        raise ValueError(f"score_a, score_b and human must be 1-D of one length: {a.shape}, {b.shape}, {h.shape}")
    if len(a) == 0:
        raise ValueError("agreement of no pairs is undefined")
    if not np.isin(h, (0, 1)).all():
        raise ValueError("human must hold 0 (a preferred) or 1 (b preferred)")
    b_higher = b > a
    tie = (a == b) | np.isnan(a) | np.isnan(b)
    hit = np.where(tie, 0.5, (b_higher == (h == 1)).astype(np.float64))
    return float(hit.mean())


def grouped_folds(groups: Sequence[object], k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` cross-validation folds as (fit indices, measure indices), with every group
    (instruction) wholly on one side: a head fitted on one fold never saw the
    instructions it is measured on. Groups are shuffled with ``seed`` and dealt, largest
    first, to the fold with the fewest rows so far, so folds have similar sizes."""
    g = np.asarray(groups, dtype=object)
    uniq = list(dict.fromkeys(g.tolist()))
    if k < 2 or k > len(uniq):
        raise ValueError(f"k must be between 2 and the number of groups ({len(uniq)}), got {k}")
    rng = np.random.default_rng(seed)
    order = [uniq[i] for i in rng.permutation(len(uniq))]
    sizes = {u: int((g == u).sum()) for u in uniq}
    order.sort(key=lambda u: -sizes[u])  # stable: ties keep the shuffled order
    fold_of: dict[object, int] = {}
    load = [0] * k
    for u in order:
        f = int(np.argmin(load))
        fold_of[u] = f
        load[f] += sizes[u]
    fold = np.array([fold_of[u] for u in g.tolist()])
    idx = np.arange(len(g))
    return [(idx[fold != f], idx[fold == f]) for f in range(k)]


def fit_pairwise_logistic(
    diff: np.ndarray, human: Sequence[int], l2: float = 1.0, iterations: int = 50
) -> np.ndarray:
    """Weights w of a Bradley-Terry head: p(b preferred) = sigmoid(w · (x_b - x_a)).

    ``diff`` holds x_b - x_a per pair (features already standardised by the caller).
    No intercept: which answer is listed first carries no information. Fitted by
    Newton's method on the L2-penalised log-loss (``l2`` times |w|^2 / 2), which is
    strictly convex, so the result does not depend on a start point or a seed.
    """
    x = np.asarray(diff, dtype=np.float64)
    y = np.asarray(human, dtype=np.float64)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"diff must be (pairs, features) matching human: {x.shape} vs {y.shape}")
    # Both orientations: symmetric by construction (a pair and its swap give opposite odds).
    x = np.concatenate([x, -x])
    y = np.concatenate([y, 1.0 - y])
    w = np.zeros(x.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) + l2 * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.abs(step).max()) < 1e-10:
            break
    return w


def length_only(answer_a: Sequence[str], answer_b: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The baseline every scorer must beat: score = the answer's length in characters."""
    return (
        np.array([len(s) for s in answer_a], dtype=np.float64),
        np.array([len(s) for s in answer_b], dtype=np.float64),
    )


def unique_rows(pairs: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The distinct (instruction, input, output) rows of the pairs, to score each once
    (PandaLM pairs five systems' answers per instruction, so each answer is in several
    pairs), and the row index of every pair's answer a and answer b."""
    index: dict[tuple[str, str, str], int] = {}
    ia, ib = [], []
    for ins, inp, a, b in zip(pairs["instruction"], pairs["input"], pairs["answer_a"], pairs["answer_b"]):
        ia.append(index.setdefault((ins, inp, a), len(index)))
        ib.append(index.setdefault((ins, inp, b), len(index)))
    rows = pd.DataFrame(list(index), columns=["instruction", "input", "output"])
    return rows, np.array(ia, dtype=np.int64), np.array(ib, dtype=np.int64)


def fit_preference_head(
    features: pd.DataFrame,
    index_a: np.ndarray,
    index_b: np.ndarray,
    human: Sequence[int],
    columns: Sequence[str],
    l2: float,
) -> dict[str, object]:
    """Fit a linear head on the pairs (index_a[i], index_b[i]) of ``features`` rows.

    Features are standardised with the mean and standard deviation of the rows the
    pairs use (fixed numbers in the result: the scorer applies them to any row alone).
    Returns the fields of ``mods.scoring.preference.PreferenceHead``: features, mean, scale, weights.
    """
    x = features[list(columns)].to_numpy(dtype=np.float64)
    if not np.isfinite(x).all():
        bad = [c for c in columns if not np.isfinite(features[c].to_numpy(dtype=np.float64)).all()]
        raise ValueError(f"features {bad} hold NaN or infinite values; fill them before fitting")
    used = np.unique(np.concatenate([index_a, index_b]))
    mean = x[used].mean(axis=0)
    scale = x[used].std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)  # a constant feature gets weight 0 anyway
    z = (x - mean) / scale
    weights = fit_pairwise_logistic(z[index_b] - z[index_a], human, l2=l2)
    return {"features": list(columns), "mean": mean.tolist(), "scale": scale.tolist(), "weights": weights.tolist()}


def cross_validated_scores(
    features: pd.DataFrame,
    index_a: np.ndarray,
    index_b: np.ndarray,
    pairs: pd.DataFrame,
    columns: Sequence[str],
    l2: float,
    k: int = 5,
    seed: int = 0,
    extra_pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores of every pair's two answers from heads fitted without its instruction:
    for each instruction-grouped fold, a head is fitted on the other folds' pairs and
    applied to this fold's. Returns (score_a, score_b) for ``agreement``.

    ``extra_pairs`` (index_a, index_b, human into the same ``features``) join every
    fold's fit and are never measured: pairs from elsewhere whose order is known."""
    x = features[list(columns)].to_numpy(dtype=np.float64)
    score_a = np.full(len(pairs), np.nan)
    score_b = np.full(len(pairs), np.nan)
    human = pairs["human"].to_numpy()
    ea, eb, eh = extra_pairs if extra_pairs is not None else (np.zeros(0, np.int64),) * 2 + (np.zeros(0, np.int64),)
    for fit, measure in grouped_folds(pairs["group"].to_numpy(), k, seed):
        head = fit_preference_head(features, np.concatenate([index_a[fit], ea]), np.concatenate([index_b[fit], eb]),
                                   np.concatenate([human[fit], eh]), columns, l2)
        w = np.asarray(head["weights"])
        z = (x - np.asarray(head["mean"])) / np.asarray(head["scale"])
        score_a[measure] = z[index_a[measure]] @ w
        score_b[measure] = z[index_b[measure]] @ w
    return score_a, score_b
