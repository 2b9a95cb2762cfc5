"""Coverage radius of a selection, and a radius-vs-k plot for the run report.

The coverage radius of a set of centers is the largest distance from any row to
its nearest center; k-center greedy tries to make it small.  These helpers give
the curve for an arbitrary pick order (such as a random selection of the same
size) so the report can compare the two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mods.selection.kcenter import as_index_array, as_matrix, check_finite, resolve_device
from mods.selection.kcenter_backends import CoverageBackend

__all__ = ["coverage_curve", "random_coverage_curve", "plot_coverage"]


def _as_ks(ks: Sequence[int], limit: int) -> np.ndarray:
    arr = np.asarray(ks)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ks must be a non-empty 1-D sequence of integers, got {ks!r}")
    if arr.min() < 1 or arr.max() > limit:
        raise ValueError(f"ks must lie in [1, {limit}], got min {arr.min()} max {arr.max()}")
    return arr.astype(np.int64)


def coverage_curve(
    embeddings: np.ndarray | torch.Tensor,
    order: Sequence[int],
    ks: Sequence[int],
    device: str | None = None,
    chunk_rows: int | None = None,
) -> np.ndarray:
    """float32 radius after the first k rows of ``order`` are centers, for each k in ``ks``.

    For a k-center result this equals ``result.radii[k - 1]`` (without
    already_selected); use it for other orders, e.g. a random selection.
    """
    x = as_matrix(embeddings, resolve_device(embeddings, device))
    n, dim = x.shape
    chunk = chunk_rows or max(256, (16 << 20) // (4 * dim))
    check_finite(x, chunk)
    rows = as_index_array(order, n)
    ks_arr = _as_ks(ks, rows.size)
    want = set(ks_arr.tolist())
    radius_at: dict[int, float] = {}
    # Same exact pruned min-distance update as k-center greedy, with a given order.
    cov = CoverageBackend(x, int(ks_arr.max()), chunk, prune=True)
    for t, row in enumerate(rows[: ks_arr.max()].tolist(), start=1):
        cov.add(row)
        if t in want:
            radius_at[t] = cov.farthest()[0]
    return np.array([radius_at[int(k)] for k in ks_arr], dtype=np.float32)


def random_coverage_curve(
    embeddings: np.ndarray | torch.Tensor,
    ks: Sequence[int],
    seed: int = 0,
    device: str | None = None,
) -> np.ndarray:
    """Coverage radius of a uniform random selection of k rows (nested, one permutation)."""
    n = int(embeddings.shape[0])
    ks_arr = _as_ks(ks, n)
    order = np.random.default_rng(seed).permutation(n)[: ks_arr.max()]
    return coverage_curve(embeddings, order, ks_arr, device=device)


def plot_coverage(
    ks: Sequence[int],
    kcenter_radii: Sequence[float],
    random_radii: Sequence[float],
    path: Path,
    title: str,
    label: str = "k-center greedy",
) -> Path:
    """Write a PNG of coverage radius vs k for k-center and random selection."""
    # Figure + Agg canvas, not pyplot: no global backend or state, safe in worker threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ks_a = np.asarray(ks)
    kc_a = np.asarray(kcenter_radii, dtype=float)
    rnd_a = np.asarray(random_radii, dtype=float)
    if not (ks_a.shape == kc_a.shape == rnd_a.shape) or ks_a.ndim != 1:
        raise ValueError(
            f"ks, kcenter_radii and random_radii must be 1-D of equal length, got "
            f"{ks_a.shape}, {kc_a.shape}, {rnd_a.shape}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(ks_a, kc_a, marker="o", ms=3, label=label)
    ax.plot(ks_a, rnd_a, marker="s", ms=3, label="random selection")
    ax.set_xlabel("k (selected instructions)")
    ax.set_ylabel("coverage radius (max distance to nearest selected)")
    ax.set_title(title)
    if ks_a.size and ks_a.min() > 0 and ks_a.max() / ks_a.min() >= 20:
        ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
