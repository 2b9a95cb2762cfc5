"""Exact greedy k-center selection (farthest-first traversal), chunked: numpy on CPU, torch on GPU.

MoDS picks its "seed" instructions by k-center greedy over instruction embeddings
(Sener & Savarese's coreset method): every step adds the row farthest from its
nearest chosen center.  The reference implementation calls sklearn
``pairwise_distances`` from all N rows to each new center; this module gives
the same picks, much faster and with memory that stays near the size of the
embedding matrix.

Semantics (exact):

* Euclidean distance.  Every distance that decides a pick is "canonical":
  float64 differences of the float32 rows, summed, square-rooted, rounded to
  float32.  It does not depend on batching, is exactly 0 for duplicates and
  equal for exact ties (e.g. integer grids).
* Each step picks the row with the largest distance to its nearest chosen
  center; ties go to the lowest row index.
* ``already_selected`` rows are centers from the start and are not returned.
* With no ``already_selected``, the first center is
  ``int(np.random.default_rng(seed).integers(N))``; its pick distance is NaN.
* Rows at distance 0 from the centers (duplicates) are never picked while a row
  at positive distance remains; when only such rows remain, a ``ValueError``
  says how many distinct rows could be picked.

Memory, backends (numpy on CPU, torch elsewhere) and the exact accelerations that
make it fast: ``mods.selection.kcenter_backends``.  Input checks shared with ``mods.selection.coverage``
live here.
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from mods.selection import kcenter_backends
from mods.selection.kcenter_backends import (
    NP_STEP_THREADS,
    CoverageBackend,
    NumpyCoverage,
    TorchCoverage,
    blas_threads,
    np_sq_norms,
)

__all__ = ["KCenterResult", "k_center_greedy", "first_center"]

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


def resolve_device(embeddings: object, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(embeddings, torch.Tensor) and embeddings.device.type != "cpu":
        return embeddings.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def as_matrix(embeddings: object, device: torch.device) -> torch.Tensor:
    if isinstance(embeddings, torch.Tensor):
        x = embeddings.detach()
    else:
        arr = np.asarray(embeddings)
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
        ):
            raise ValueError(f"embeddings must be a numeric array, got dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr)
        with warnings.catch_warnings():
            # a read-only array (Arrow's zero-copy columns) is fine: the tensor is only read
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            x = torch.from_numpy(arr)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"embeddings must be real numbers, got dtype {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError("embeddings have 0 columns")
    # float32 everywhere; a float32 contiguous CPU array is used without a copy.
    return x.to(device=device, dtype=torch.float32).contiguous()


def check_finite(x: torch.Tensor, chunk: int) -> None:
    # Chunked so the boolean mask never costs another N x D bytes.
    for start in range(0, x.shape[0], chunk):
        block = x[start : start + chunk]
        if not bool(torch.isfinite(block).all()):
            bad = int(torch.nonzero(~torch.isfinite(block).all(dim=1))[0, 0]) + start
            raise ValueError(f"embeddings contain NaN or inf (first at row {bad})")


def as_index_array(already_selected: Sequence[int], n_rows: int) -> np.ndarray:
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
    prune: use the exact lazy/matmul acceleration (same result as prune=False,
        which updates every row canonically at every step: slow, the reference).

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
    dev = resolve_device(embeddings, device)
    x = as_matrix(embeddings, dev)
    n, dim = x.shape
    if chunk_rows is None:
        chunk_rows = max(256, _CHUNK_BYTES // (4 * dim))
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    # Read through the module: a test that sets kcenter_backends._NUMPY_ON_CPU reaches both uses.
    use_numpy = dev.type == "cpu" and kcenter_backends._NUMPY_ON_CPU
    if use_numpy:
        xn = x.numpy()
        sq = np_sq_norms(xn)  # also the NaN/inf check
    else:
        check_finite(x, chunk_rows)
    sel = as_index_array(already_selected, n)
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

    if use_numpy:
        cov = NumpyCoverage(xn, sel.size + k, chunk_rows, prune, sq)
    else:
        cov = TorchCoverage(x, sel.size + k, chunk_rows, prune)
    with blas_threads(NP_STEP_THREADS) if use_numpy else contextlib.nullcontext():
        return _greedy(cov, k, n, sel, seed)


def _greedy(cov: CoverageBackend, k: int, n: int, sel: np.ndarray, seed: int) -> KCenterResult:
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
