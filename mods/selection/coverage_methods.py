"""Coverage methods beyond k-center: which rows of a candidate set cover it best, within a budget.

- ``k_center`` (the paper; Sener & Savarese): farthest-first. With a plain row budget it is
  ``mods.selection.kcenter.k_center_greedy`` exactly; with tokens or per-source caps, the farthest
  row that still fits (float32 matrix-vector distances, one pass over the rows per pick).
- ``kmeans_quality`` (kMQ, arXiv 2409.11378): k-means on the embeddings, each cluster gets
  picks in proportion to its size, and inside a cluster rows are drawn (seeded) with
  weights that grow with their quality score: covers the bulk, not the outliers.
- ``facility_location`` (QDIT, arXiv 2311.14736; the submodular objective Superfiltering
  uses via submodlib): greedy maximisation of sum_i max_{j in S} sim(i, j) on a sparse
  graph of each row's ``neighbours`` nearest rows (cosine), lazily evaluated (the gains
  only shrink), gain per unit of cost under a token budget.

Every method is deterministic for a seed, never picks a row whose embedding duplicates a
chosen one or a center, spends at most its budget and at most each source's cap.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from mods.selection.budgets import Budget, count_tokens, make_budget
from mods.selection.coverage import coverage_curve
from mods.selection.thresholds import distinct_candidates

if TYPE_CHECKING:
    import pandas as pd

CoverageMethod = Literal["k_center", "kmeans_quality", "facility_location"]
# Rows of the similarity / distance blocks computed at once (memory ~ CHUNK x N floats).
CHUNK_ROWS = 1024


class CoverageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: CoverageMethod = Field(
        "k_center",
        description="How the seed and augmented sets cover their candidates: 'k_center' (the paper: farthest-first, "
        "favours outliers), 'kmeans_quality' (kMQ: k-means, picks per cluster in proportion to its size, weighted "
        "by quality), 'facility_location' (QDIT/submodular: covers the dense bulk). See docs/selection-methods.md.",
    )
    clusters: int | None = Field(
        None, ge=1, description="kmeans_quality: number of clusters; empty = the square root of the candidates."
    )
    kmeans_iterations: int = Field(25, ge=1, description="kmeans_quality: Lloyd iterations.")
    neighbours: int = Field(
        32, ge=1, description="facility_location: nearest neighbours kept per row (the sparse similarity graph)."
    )

    def method_fields(self) -> "CoverageConfig":
        """Only what the method reads (the rest at defaults): a field of another method changes no key."""
        used = {"k_center": (), "kmeans_quality": ("clusters", "kmeans_iterations"),
                "facility_location": ("neighbours",)}[self.method]
        return CoverageConfig(method=self.method, **{name: getattr(self, name) for name in used})


def select_rows(config: CoverageConfig, matrix: np.ndarray, budget: Budget, already: Sequence[int] = (),
                seed: int = 0, quality: np.ndarray | None = None) -> np.ndarray:
    """Picked row indices of ``matrix`` in pick order (``already`` rows are centers and never picked)."""
    x = np.ascontiguousarray(np.asarray(matrix, dtype=np.float32))
    already = np.asarray(list(already), dtype=np.int64)
    allowed = distinct_candidates(x, already)
    if config.method == "k_center":
        return k_center_within(x, budget, already, seed, allowed)
    if config.method == "kmeans_quality":
        return kmeans_quality(x, budget, already, seed, allowed, quality, config.clusters, config.kmeans_iterations)
    if config.method == "facility_location":
        return facility_location(x, budget, already, allowed, config.neighbours)
    raise ValueError(f"unknown coverage method {config.method!r}")


# --- k-center within a budget ---------------------------------------------------------------------


def _distances_to(x: np.ndarray, sq: np.ndarray, row: int) -> np.ndarray:
    d2 = sq + sq[row] - 2.0 * (x @ x[row]).astype(np.float64)
    return np.sqrt(np.maximum(d2, 0.0))


def k_center_within(x: np.ndarray, budget: Budget, already: np.ndarray, seed: int, allowed: np.ndarray) -> np.ndarray:
    """Farthest-first among the rows that still fit; the first pick (no centers) is a seeded
    draw among the rows that fit. Stops when nothing fits or only duplicates remain."""
    n = len(x)
    sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    nearest = np.full(n, np.inf)
    for row in already.tolist():
        np.minimum(nearest, _distances_to(x, sq, row), out=nearest)
    alive = allowed.copy()
    picks: list[int] = []
    while True:
        alive &= budget.fits()
        if not alive.any():
            break
        if not picks and not len(already):
            candidates = np.flatnonzero(alive)
            row = int(candidates[np.random.default_rng(seed).integers(len(candidates))])
        else:
            row = int(np.argmax(np.where(alive, nearest, -1.0)))  # ties: the lowest index
            if nearest[row] <= 0.0:
                break
        picks.append(row)
        alive[row] = False
        budget.take(row)
        np.minimum(nearest, _distances_to(x, sq, row), out=nearest)
    return np.asarray(picks, dtype=np.int64)


# --- k-means with quality-weighted picks per cluster (kMQ) ----------------------------------------


def kmeans_labels(x: np.ndarray, clusters: int, seed: int, iterations: int) -> np.ndarray:
    """Lloyd's k-means with seeded k-means++ starts; float64 sums, so the labels do not
    depend on batching. An emptied cluster keeps its previous center."""
    rng = np.random.default_rng(seed)
    n = len(x)
    clusters = max(1, min(clusters, n))
    xt = torch.from_numpy(x)
    sq = (xt.double() ** 2).sum(1)
    centers = [int(rng.integers(n))]
    nearest = ((xt.double() - xt[centers[0]].double()) ** 2).sum(1)
    for _ in range(1, clusters):
        total = float(nearest.sum())
        if total <= 0:
            break
        row = int(np.searchsorted(np.cumsum(nearest.numpy()), rng.random() * total, side="right"))
        row = min(row, n - 1)
        centers.append(row)
        nearest = torch.minimum(nearest, ((xt.double() - xt[row].double()) ** 2).sum(1))
    means = xt[centers].double().clone()
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iterations):
        new = torch.empty(n, dtype=torch.long)
        for start in range(0, n, CHUNK_ROWS):
            block = xt[start:start + CHUNK_ROWS].double()
            d2 = sq[start:start + CHUNK_ROWS, None] + (means ** 2).sum(1)[None, :] - 2.0 * block @ means.T
            new[start:start + CHUNK_ROWS] = d2.argmin(1)
        counts = torch.bincount(new, minlength=len(means))
        sums = torch.zeros_like(means).index_add_(0, new, xt.double())
        filled = counts > 0
        means[filled] = sums[filled] / counts[filled, None].double()
        if torch.equal(new, labels):
            break
        labels = new
    return labels.numpy()


def kmeans_quality(x: np.ndarray, budget: Budget, already: np.ndarray, seed: int, allowed: np.ndarray,
                   quality: np.ndarray | None, clusters: int | None, iterations: int) -> np.ndarray:
    """kMQ: clusters share the budget in proportion to their sizes (centers count as picks of
    their cluster); inside a cluster, a seeded draw weighted by the quality rank."""
    n = len(x)
    if not allowed.any():
        return np.zeros(0, dtype=np.int64)
    k = clusters or max(1, int(round(np.sqrt(n))))
    labels = kmeans_labels(x, k, seed, iterations)
    size = np.bincount(labels, minlength=labels.max() + 1).astype(np.float64)
    taken = np.bincount(labels[already], minlength=len(size)) if len(already) else np.zeros(len(size), np.int64)
    rng = np.random.default_rng(seed + 1)
    if quality is None:
        weight = np.ones(n)
    else:  # the quality's rank in (0, 1]: any score scale, and a weight for every row
        scores = np.nan_to_num(np.asarray(quality, dtype=np.float64), nan=-np.inf)
        weight = (np.argsort(np.argsort(scores, kind="stable"), kind="stable") + 1) / n
    # Efraimidis-Spirakis: sorting by u^(1/w) is a weighted draw without replacement.
    draw = rng.random(n) ** (1.0 / weight)
    candidates = np.flatnonzero(allowed)
    order_in_cluster = np.empty(n, dtype=np.int64)
    for c in np.unique(labels[candidates]):
        members = candidates[labels[candidates] == c]
        members = members[np.lexsort((members, -draw[members]))]
        order_in_cluster[members] = np.arange(len(members))
    # A cluster's j-th pick is due at (taken + j + 0.5) / size: interleaves the clusters in proportion.
    due = (taken[labels[candidates]] + order_in_cluster[candidates] + 0.5) / size[labels[candidates]]
    order = candidates[np.lexsort((candidates, -draw[candidates], due))]
    picks = []
    for row in order.tolist():
        if budget.left <= 0:
            break
        if budget.fits_one(row):
            picks.append(row)
            budget.take(row)
    return np.asarray(picks, dtype=np.int64)


# --- facility location on a sparse nearest-neighbour graph ----------------------------------------


def nearest_neighbours(x: np.ndarray, neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``neighbours`` most cosine-similar rows (itself included) and the
    similarities clipped at 0: (N, m) indices and (N, m) float32 similarities."""
    xt = torch.from_numpy(x)
    unit = xt / xt.norm(dim=1, keepdim=True).clamp(min=1e-12)
    m = min(neighbours, len(x))
    index = np.empty((len(x), m), dtype=np.int64)
    sim = np.empty((len(x), m), dtype=np.float32)
    for start in range(0, len(x), CHUNK_ROWS):
        s = unit[start:start + CHUNK_ROWS] @ unit.T
        rows = torch.arange(start, min(start + CHUNK_ROWS, len(x)))
        s[torch.arange(len(rows)), rows] = 1.0  # a row is its own nearest neighbour, exactly
        values, found = torch.topk(s, m, dim=1)
        index[start:start + len(rows)] = found.numpy()
        sim[start:start + len(rows)] = values.clamp(min=0).numpy()
    return index, sim


def facility_location(x: np.ndarray, budget: Budget, already: np.ndarray, allowed: np.ndarray,
                      neighbours: int) -> np.ndarray:
    """Lazy greedy: the pick with the largest gain (per unit of cost) of
    sum_i max_{j in S} sim(i, j); ties go to the lowest index."""
    n = len(x)
    index, sim = nearest_neighbours(x, neighbours)
    # Reverse lists: for a candidate j, the rows i that have j among their neighbours.
    flat = index.ravel()
    order = np.argsort(flat, kind="stable")
    owners = (order // index.shape[1]).astype(np.int64)
    sims = sim.ravel()[order].astype(np.float64)
    starts = np.searchsorted(flat[order], np.arange(n + 1))
    covered = np.zeros(n, dtype=np.float64)

    def gain(j: int) -> float:
        part = slice(starts[j], starts[j + 1])
        return float(np.maximum(sims[part] - covered[owners[part]], 0.0).sum())

    def add(j: int) -> None:
        part = slice(starts[j], starts[j + 1])
        np.maximum.at(covered, owners[part], sims[part])

    for row in already.tolist():
        add(row)
    costs = budget.costs.astype(np.float64)
    heap = [(-gain(j) / costs[j], j) for j in np.flatnonzero(allowed & budget.fits()).tolist()]
    heapq.heapify(heap)
    picks = []
    while heap:
        _, j = heapq.heappop(heap)
        if not budget.fits_one(j):
            continue  # budgets only shrink: it never fits again
        fresh = -gain(j) / costs[j]
        if heap and fresh > heap[0][0] + 1e-12:  # no longer the best: back in, with its true value
            heapq.heappush(heap, (fresh, j))
            continue
        picks.append(j)
        budget.take(j)
        add(j)
    return np.asarray(picks, dtype=np.int64)


# --- what a pick order achieves -------------------------------------------------------------------


def pick_statistics(matrix: np.ndarray, picks: np.ndarray, already: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Each pick's distance to its nearest earlier center (``already`` included; NaN for a
    first pick with no centers) and the coverage radius after it (as k-center reports them)."""
    x = np.asarray(matrix, dtype=np.float32)
    already = [int(i) for i in already]
    picks = np.asarray(picks, dtype=np.int64)
    if not len(picks):
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    centers = np.asarray(already + picks.tolist(), dtype=np.int64)
    c64 = x[centers].astype(np.float64)
    sq = (c64 ** 2).sum(1)
    distances = np.full(len(picks), np.nan)
    offset = len(already)
    for start in range(0, len(picks), CHUNK_ROWS):
        rows = np.arange(start, min(start + CHUNK_ROWS, len(picks))) + offset
        d2 = sq[rows, None] + sq[None, :] - 2.0 * c64[rows] @ c64.T
        d = np.sqrt(np.maximum(d2, 0.0))
        earlier = np.arange(len(centers))[None, :] < rows[:, None]
        d = np.where(earlier, d, np.inf)
        best = d.min(1)
        distances[rows - offset] = np.where(np.isinf(best), np.nan, best)
    ks = np.arange(offset + 1, offset + len(picks) + 1)
    radii = coverage_curve(x, centers, ks)
    return distances.astype(np.float32), radii


def budgeted_selection(config: CoverageConfig, matrix: np.ndarray, candidates: pd.DataFrame, k: int,
                       tokens: int | None, source_caps: dict[str, int], source_shares: dict[str, float],
                       base_model: str | None, already: Sequence[int] = (), seed: int = 0
                       ) -> tuple[pd.DataFrame, dict]:
    """Picks of ``config.method`` among the rows of ``matrix`` (``candidates``: their id,
    training columns, source and quality_score, in the same order) within k rows or
    ``tokens``, and the per-source caps; the selection table and what it spent."""
    import pandas as pd

    if tokens is not None:
        if not base_model:
            raise ValueError("a token budget needs the base model's tokenizer (base_model)")
        costs, unit, total = count_tokens(base_model, candidates), "tokens", tokens
    else:
        costs, unit, total = np.ones(len(candidates), dtype=np.int64), "rows", k
    sources = candidates["source"].astype(str).tolist() if "source" in candidates else [""] * len(candidates)
    budget = make_budget(unit, total, costs, sources, source_caps, source_shares)
    quality = candidates["quality_score"].to_numpy(np.float64) if "quality_score" in candidates else None
    picks = select_rows(config, matrix, budget, already, seed, quality)
    distances, radii = pick_statistics(matrix, picks, already)
    ids = candidates["id"].astype(str).to_numpy()
    frame = pd.DataFrame({"id": pd.Series(ids[picks], dtype=str), "pick_order": np.arange(len(picks), dtype=np.int64),
                          "pick_distance": distances.astype(np.float64), "radius_after": radii.astype(np.float64)})
    patterns = list(dict.fromkeys([*source_caps, *source_shares]))
    spent = {"method": config.method, "unit": unit, "budget": int(total), "spent": int(total - budget.left),
             "picked": int(len(picks))}
    if patterns:
        spent["spent_by_source"] = {p: int(v) for p, v in zip(patterns, budget.spent_by_group)}
    return frame, spent
