"""Exact greedy k-center selection (farthest-first traversal), chunked, in torch.

MoDS picks its "seed" instructions by k-center greedy over instruction embeddings
(Sener & Savarese's coreset method): every step adds the row farthest from its
nearest chosen center.  The reference implementation calls sklearn
``pairwise_distances`` from all N rows to each new center; this module gives
the same picks, much faster and with memory that stays near the size of the
embedding matrix.

Semantics (exact):

* Euclidean distance, computed in float32 per row pair (``x - c`` directly, no
  ``|x|^2 - 2x.c + |c|^2`` cancellation), so a duplicate of a center is at
  distance exactly 0.
* Each step picks the row with the largest distance to its nearest chosen
  center; ties go to the lowest row index.
* ``already_selected`` rows are centers from the start and are not returned.
* With no ``already_selected``, the first center is
  ``int(np.random.default_rng(seed).integers(N))``; its pick distance is NaN.
* Rows at distance 0 from the centers (duplicates) are never picked while a row
  at positive distance remains; when only such rows remain, a ``ValueError``
  says how many distinct rows could be picked.

Memory: one float32 min-distance vector and one int64 nearest-center vector of
length N, the (already_selected + k) x D center matrix, and one chunk of
``chunk_rows`` gathered rows at a time; no N x k matrix.

Speed: besides the torch kernels, an exact triangle-inequality test (as in
Elkan's accelerated k-means) skips rows that the new center cannot bring
closer: if ``x``'s nearest center is ``a`` and ``d(a, c) >= 2 d(x, a)`` then
``d(x, c) >= d(a, c) - d(x, a) >= d(x, a)``.  A small relative margin keeps the
test safe against float32 rounding, so pruning never changes the result.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

__all__ = ["KCenterResult", "k_center_greedy", "first_center"]

# Rows are skipped only when d(a, c) >= 2 * mind * (1 + margin): float32 errors
# of the distances (~1e-6 relative at D=384) are far below this margin.
PRUNE_MARGIN = 1e-3
# Default chunk: ~16 MiB of gathered float32 rows.
_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class KCenterResult:
    """Greedy k-center picks.

    indices: int64 (k,), picked row indices in pick order.
    pick_distances: float32 (k,), each pick's distance to its nearest center chosen
        before it (already_selected included); NaN for a first pick made with no centers.
    radii: float32 (k,), coverage radius after each pick: max over all rows of the
        distance to the nearest center.
    """

    indices: np.ndarray
    pick_distances: np.ndarray
    radii: np.ndarray


def first_center(n_rows: int, seed: int) -> int:
    """The first center used when no rows are already selected."""
    return int(np.random.default_rng(seed).integers(n_rows))


def _resolve_device(embeddings: object, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(embeddings, torch.Tensor) and embeddings.device.type != "cpu":
        return embeddings.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _as_matrix(embeddings: object, device: torch.device) -> torch.Tensor:
    if isinstance(embeddings, torch.Tensor):
        x = embeddings.detach()
    else:
        arr = np.asarray(embeddings)
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
        ):
            raise ValueError(f"embeddings must be a numeric array, got dtype {arr.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(arr))
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"embeddings must be real numbers, got dtype {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError("embeddings have 0 columns")
    # float32 everywhere; a float32 contiguous CPU array is used without a copy.
    return x.to(device=device, dtype=torch.float32).contiguous()


def _check_finite(x: torch.Tensor, chunk: int) -> None:
    # Chunked so the boolean mask never costs another N x D bytes.
    for start in range(0, x.shape[0], chunk):
        block = x[start : start + chunk]
        if not bool(torch.isfinite(block).all()):
            bad = int(torch.nonzero(~torch.isfinite(block).all(dim=1))[0, 0]) + start
            raise ValueError(f"embeddings contain NaN or inf (first at row {bad})")


def _as_index_array(already_selected: Sequence[int], n_rows: int) -> np.ndarray:
    if isinstance(already_selected, torch.Tensor):
        already_selected = already_selected.detach().cpu().numpy()
    sel = np.asarray(already_selected)
    if sel.size == 0:
        return np.zeros(0, dtype=np.int64)
    if sel.ndim != 1:
        raise ValueError(f"already_selected must be 1-D, got shape {sel.shape}")
    if not np.issubdtype(sel.dtype, np.integer):
        raise ValueError(f"already_selected must hold integer row indices, got dtype {sel.dtype}")
    sel = sel.astype(np.int64)
    bad = sel[(sel < 0) | (sel >= n_rows)]
    if bad.size:
        raise ValueError(
            f"already_selected has indices outside [0, {n_rows}): {bad[:5].tolist()}"
        )
    uniq, counts = np.unique(sel, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"already_selected has duplicate indices: {uniq[counts > 1][:5].tolist()}")
    return sel


class _Coverage:
    """Min-distance state of the traversal: one float32 and one int64 vector of length N."""

    def __init__(
        self, x: torch.Tensor, capacity: int, chunk_rows: int, prune: bool
    ) -> None:
        self.x = x
        self.n = x.shape[0]
        self.chunk = chunk_rows
        self.prune = prune
        self.centers = torch.empty((capacity, x.shape[1]), dtype=x.dtype, device=x.device)
        self.n_centers = 0
        self.mind = torch.full((self.n,), math.inf, dtype=torch.float32, device=x.device)
        self.nearest = torch.zeros(self.n, dtype=torch.int64, device=x.device)
        self._arange = torch.arange(self.n, device=x.device)
        self.rows_computed = 0  # distance evaluations, for benchmarks

    def _dist(self, rows: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # Direct per-pair differences: exact 0 for duplicates, no cancellation,
        # and each row's value does not depend on which other rows share the chunk.
        return torch.cdist(rows, c[None], compute_mode="donot_use_mm_for_euclid_dist")[:, 0]

    def add(self, row: int) -> None:
        j = self.n_centers
        c = self.centers[j]
        c.copy_(self.x[row])
        self.n_centers += 1
        if j == 0:
            for start in range(0, self.n, self.chunk):
                stop = min(start + self.chunk, self.n)
                self.mind[start:stop] = self._dist(self.x[start:stop], c)
            self.rows_computed += self.n
            if not bool(torch.isfinite(self.mind).all()):
                raise ValueError("embedding values too large: float32 distances overflow")
            return
        if self.prune:
            # d(a, c) for every earlier center a; rows with d(a, c) >= 2 mind can't move.
            dcc = self._dist(self.centers[:j], c)
            thresh = dcc[self.nearest]
            cand = torch.nonzero(thresh < 2.0 * (1.0 + PRUNE_MARGIN) * self.mind)[:, 0]
        else:
            cand = None
        if cand is None:
            for start in range(0, self.n, self.chunk):
                stop = min(start + self.chunk, self.n)
                d = self._dist(self.x[start:stop], c)
                self._update(d, start, stop, None, j)
            self.rows_computed += self.n
        else:
            for start in range(0, cand.numel(), self.chunk):
                idx = cand[start : start + self.chunk]
                d = self._dist(self.x.index_select(0, idx), c)
                self._update(d, start, start + idx.numel(), idx, j)
            self.rows_computed += cand.numel()

    def _update(
        self, d: torch.Tensor, start: int, stop: int, idx: torch.Tensor | None, j: int
    ) -> None:
        if idx is None:
            cur = self.mind[start:stop]
            closer = d < cur
            cur[closer] = d[closer]
            self.nearest[start:stop][closer] = j
        else:
            closer = d < self.mind[idx]
            moved = idx[closer]
            self.mind[moved] = d[closer]
            self.nearest[moved] = j

    def farthest(self) -> tuple[float, int]:
        """(max min-distance, lowest row index attaining it)."""
        m = self.mind.max()
        # torch.argmax does not promise the first maximum; take it explicitly.
        row = torch.where(self.mind == m, self._arange, self.n).min()
        return float(m), int(row)


def k_center_greedy(
    embeddings: np.ndarray | torch.Tensor,
    k: int,
    already_selected: Sequence[int] = (),
    seed: int = 0,
    device: str | torch.device | None = None,
    chunk_rows: int | None = None,
    prune: bool = True,
) -> KCenterResult:
    """Greedy k-center (farthest-first) selection of ``k`` rows of ``embeddings``.

    embeddings: (N, D) numpy array or torch tensor; converted to float32.
    k: number of rows to pick (not counting already_selected).
    already_selected: row indices that are centers from the start; never returned.
    seed: with no already_selected, the first pick is
        ``int(np.random.default_rng(seed).integers(N))``.
    device: torch device; None means CUDA if available, else CPU.
    chunk_rows: rows per distance chunk (default: about 16 MiB of rows).
    prune: use the exact triangle-inequality test to skip rows (same result).

    Raises ValueError for non-2-D or non-finite embeddings, k < 0, bad
    already_selected, or k larger than the number of distinct rows that can
    still be picked.
    """
    try:
        k = operator.index(k)
    except TypeError:
        raise ValueError(f"k must be an integer, got {k!r}") from None
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    dev = _resolve_device(embeddings, device)
    x = _as_matrix(embeddings, dev)
    n, dim = x.shape
    if chunk_rows is None:
        chunk_rows = max(256, _CHUNK_BYTES // (4 * dim))
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    _check_finite(x, chunk_rows)
    sel = _as_index_array(already_selected, n)
    available = n - sel.size
    if k > available:
        raise ValueError(
            f"k={k} exceeds the {available} rows that can be picked "
            f"(N={n}, {sel.size} already selected)"
        )
    if k == 0:
        return KCenterResult(
            np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32)
        )

    cov = _Coverage(x, sel.size + k, chunk_rows, prune)
    indices = np.empty(k, dtype=np.int64)
    pick_d = np.empty(k, dtype=np.float32)
    radii = np.empty(k, dtype=np.float32)
    for row in sel.tolist():
        cov.add(row)
    start = 0
    if sel.size == 0:
        row = first_center(n, seed)
        cov.add(row)
        indices[0], pick_d[0] = row, np.nan
        start = 1
    radius, row = cov.farthest()
    if start == 1:
        radii[0] = radius
    for t in range(start, k):
        if radius == 0.0:
            raise ValueError(
                f"k={k} but only {t} distinct rows can be picked: every other row "
                f"duplicates a center (N={n}, {sel.size} already selected)"
            )
        cov.add(row)
        indices[t], pick_d[t] = row, radius
        radius, row = cov.farthest()
        radii[t] = radius
    return KCenterResult(indices, pick_d, radii)
