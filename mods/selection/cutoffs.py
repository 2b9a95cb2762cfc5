"""Cut-offs a person can read: α and β as raw values or percentiles, the score
distributions with the cut-off marked, and a selection's composition by source and length.

The numbers go into stage summaries and the export report (report.json / report.md); the
Prefect artifact renders the same markdown (tasks/reporting.py).
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd

from mods.selection.thresholds import keep_above, keep_below

Keep = Literal["above", "below"]
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
HISTOGRAM_BINS = 10


def percentile_value(scores: np.ndarray, percentile: float) -> float:
    """The score at ``percentile`` (0-100, linear interpolation) of the finite scores."""
    finite = np.asarray(scores, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if not len(finite):
        raise ValueError("no finite score to take a percentile of")
    return float(np.percentile(finite, percentile))


def percentile_of(scores: np.ndarray, value: float) -> float:
    """The share of finite scores at or below ``value``, in percent."""
    finite = np.asarray(scores, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(100.0 * (finite <= value).mean()) if len(finite) else float("nan")


def keep_mask(scores: np.ndarray, keep: Keep, value: float | None = None, percentile: float | None = None,
              fraction: float | None = None) -> tuple[np.ndarray, float | None]:
    """Rows kept, strictly above (or below) ``value`` — or the score at ``percentile`` — else the
    best (or worst) ``fraction``; and the cut-off as a raw score (for a fraction: the last
    score kept; None when nothing is kept)."""
    scores = np.asarray(scores, dtype=np.float64)
    if value is None and percentile is not None and len(scores):
        value = percentile_value(scores, percentile)
    if value is not None:
        mask = scores > value if keep == "above" else scores < value
        return mask, float(value)
    mask = keep_above(scores, None, fraction) if keep == "above" else keep_below(scores, None, fraction)
    if not mask.any():
        return mask, None
    return mask, float(scores[mask].min() if keep == "above" else scores[mask].max())


def score_distribution(scores: np.ndarray, cutoff: float | None, keep: Keep, kept: int,
                       bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """Quantiles and a histogram of the finite scores, the cut-off as a raw value and as a
    percentile, and which side is kept."""
    values = np.asarray(scores, dtype=np.float64)
    finite = values[np.isfinite(values)]
    out: dict[str, Any] = {"rows": int(len(values)), "kept": int(kept), "keep": keep,
                           "cutoff": None if cutoff is None else round(float(cutoff), 5),
                           "cutoff_percentile": None if cutoff is None else round(percentile_of(finite, cutoff), 2)}
    if not len(finite):
        return {**out, "quantiles": {}, "histogram": {"edges": [], "counts": []}}
    counts, edges = np.histogram(finite, bins=bins)
    out["quantiles"] = {f"p{int(q * 100)}": round(float(np.quantile(finite, q)), 5) for q in QUANTILES}
    out["histogram"] = {"edges": [round(float(e), 5) for e in edges], "counts": [int(c) for c in counts]}
    return out


def distribution_markdown(title: str, distribution: dict[str, Any], unit: str = "") -> list[str]:
    """A histogram table with the bin holding the cut-off marked, and the cut-off in words."""
    lines = [f"### {title}", ""]
    cutoff = distribution.get("cutoff")
    if cutoff is None:
        lines.append(f"{distribution['rows']} scores; nothing kept.")
    else:
        side = "above" if distribution["keep"] == "above" else "below"
        lines.append(f"Cut-off **{cutoff}**{unit} = percentile **{distribution['cutoff_percentile']}** of "
                     f"{distribution['rows']} scores; {distribution['kept']} rows {side} it kept.")
    quantiles = distribution.get("quantiles") or {}
    if quantiles:
        lines += ["", "Quantiles: " + ", ".join(f"{k} {v}" for k, v in quantiles.items())]
    edges, counts = distribution["histogram"]["edges"], distribution["histogram"]["counts"]
    if counts:
        peak = max(counts) or 1
        lines += ["", "| score from | to | rows | |", "|---:|---:|---:|---|"]
        for i, count in enumerate(counts):
            low, high = edges[i], edges[i + 1]
            here = cutoff is not None and (low <= cutoff < high or (i == len(counts) - 1 and cutoff == high))
            bar = "█" * max(0, round(20 * count / peak))
            lines.append(f"| {low} | {high} | {count} | {bar}{' ◀ cut-off' if here else ''} |")
    return lines + [""]


def source_label(source: str, common: str) -> str:
    """A source's name in the report: its first path part below the folder all sources share
    (a dataset folder of many files counts as one source)."""
    path = PurePath(str(source))
    try:
        parts = path.relative_to(common).parts
    except ValueError:
        parts = ()
    return parts[0] if parts else path.name


def common_folder(sources: Sequence[str]) -> str:
    folders = {str(PurePath(str(s)).parent) for s in sources}
    if not folders:
        return ""
    import os

    return os.path.commonpath(list(folders)) if len(folders) > 1 else next(iter(folders))


def composition(selected: pd.DataFrame, pool_sources: Sequence[str]) -> dict[str, Any]:
    """The selection by source (rows, share) and by answer length (characters: quantiles, buckets)."""
    common = common_folder(list(pool_sources))
    labels = [source_label(s, common) for s in selected.get("source", pd.Series([], dtype=str)).astype(str)]
    by_source = pd.Series(labels, dtype=str).value_counts()
    lengths = selected.get("output", pd.Series([], dtype=str)).fillna("").astype(str).str.len()
    buckets = [0, 100, 300, 1000, 3000, np.inf]
    names = ["<100", "100-299", "300-999", "1000-2999", "≥3000"]
    binned = pd.cut(lengths, buckets, right=False, labels=names).value_counts().reindex(names, fill_value=0)
    total = max(1, len(selected))
    return {
        "by_source": {k: {"rows": int(v), "share": round(v / total, 4)} for k, v in by_source.items()},
        "answer_chars": {f"p{int(q * 100)}": float(lengths.quantile(q)) for q in QUANTILES} if len(lengths) else {},
        "answer_chars_buckets": {k: int(v) for k, v in binned.items()},
    }


def composition_markdown(comp: dict[str, Any]) -> list[str]:
    lines = ["### Composition of the selection", "", "| source | rows | share |", "|---|---:|---:|"]
    lines += [f"| {name} | {v['rows']} | {v['share']:.1%} |" for name, v in comp["by_source"].items()]
    lines += ["", "| answer characters | rows |", "|---|---:|"]
    lines += [f"| {name} | {count} |" for name, count in comp["answer_chars_buckets"].items()]
    if comp["answer_chars"]:
        lines += ["", "Answer characters: " + ", ".join(f"{k} {v:g}" for k, v in comp["answer_chars"].items())]
    return lines + [""]
