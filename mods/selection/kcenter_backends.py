"""The min-distance state of the k-center traversal (``mods.selection.kcenter``): the engine that
keeps every row's distance to its nearest chosen center and finds the farthest row.

Memory: a few length-N vectors (float32 min-distance, int64 stamp, norms), the
(already_selected + k) x D float32 center matrix,
a copy of the active rows and bounded scratch blocks; no N x k matrix.

Backends: on CPU ``NumpyCoverage`` (numpy + its BLAS, limited to one thread
while it runs, via threadpoolctl when installed); on other devices
``TorchCoverage``.  Same algorithm, same picks.  ``CoverageBackend(x, ...)`` picks
the backend for ``x``.

Speed (exact accelerations, see ``TorchCoverage``): lazy evaluation -- only rows
near the current radius are updated at every step, the rest catch up in
batches -- and matrix products as a filter with a rigorous float32 error bound,
so that only (row, center) pairs that may change a minimum are recomputed
canonically.  Triangle-inequality pruning (Elkan-style, ``d(a, c) >= 2 d(x, a)``)
was tried first and dropped: on unit-norm MiniLM embeddings the coverage radius
stays above 1.1 (of a diameter of 2) at k=1000, so it skipped almost no rows.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

try:  # installed with scikit-learn (a sentence-transformers dependency); optional
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover
    ThreadpoolController = None

# A lazy epoch refreshes stale rows down to the (factor * active_rows)-th largest bound.
_REFRESH_FACTOR = 8
# numpy backend: at least this many active rows.
_NP_MIN_ACTIVE = 1024
# numpy backend: centers per chronological block of a batch refresh.
_NP_CENTER_BLOCK = 256
# numpy backend refresh factor.
_NP_REFRESH_FACTOR = 8
# BLAS threads for the numpy backend: per step, and in batch refreshes (None: BLAS default).
NP_STEP_THREADS: int | None = 1
_NP_REFRESH_THREADS: int | None = 1


# CPU runs use the numpy backend (``CoverageBackend``); False forces torch (``TorchCoverage``), for tests.
_NUMPY_ON_CPU = True


# Float32 matmul unit roundoff; looser if the user allowed TF32/bf16 matmuls.
def _matmul_unit_roundoff() -> float:
    prec = torch.get_float32_matmul_precision()
    return {"highest": 2.0**-24, "high": 2.0**-11}.get(prec, 2.0**-8)


class CoverageBackend:
    """Min-distance state of the traversal; ``CoverageBackend(x, capacity, chunk_rows, prune)``
    builds the backend for ``x``: ``NumpyCoverage`` for a CPU tensor or a numpy
    array (unless ``_NUMPY_ON_CPU`` is False), ``TorchCoverage`` otherwise.

    Interface: ``add(row)`` makes a row a center; ``farthest()`` gives
    (radius, lowest farthest row); ``pair_evals`` counts distance evaluations.
    """

    def __new__(cls, x, *args, **kwargs):
        if cls is CoverageBackend:
            cpu = isinstance(x, np.ndarray) or x.device.type == "cpu"
            cls = NumpyCoverage if cpu and _NUMPY_ON_CPU else TorchCoverage
        return object.__new__(cls)


class TorchCoverage(CoverageBackend):
    """Min-distance state of the traversal, in torch (any device; used for CUDA).

    ``mind[i]`` is the exact (canonical) distance from row i to its nearest center
    among the first ``stamp[i]`` centers.  Canonical distance: float64 differences,
    summed, square-rooted, rounded to float32 -- independent of batching, exactly 0
    for duplicates, equal for exact ties.

    prune=False updates every row with every center (the reference path).

    prune=True is lazy and exact: only the "active" rows, the ones whose (possibly
    stale) distance is >= ``tau``, are updated at every step; since distances only
    shrink as centers are added, a stale value is an upper bound, so an inactive row
    (stale value < tau) can't be the farthest while an active row is >= tau.  When
    the active maximum drops below tau, tau is lowered and the rows that enter are
    brought up to date with one matmul against all centers added since they were
    last exact.  Matmul distances (|x|^2 + |c|^2 - 2x.c) are only a filter: a
    rigorous float32 error bound decides which (row, center) pairs could change a
    minimum, and those pairs are recomputed canonically.
    """

    def __init__(self, x: torch.Tensor, capacity: int, chunk_rows: int, prune: bool) -> None:
        self.x = x
        self.n, self.dim = x.shape
        self.chunk = chunk_rows
        self.prune = prune
        dev = x.device
        self.sq = torch.empty(self.n, dtype=torch.float32, device=dev)
        for start in range(0, self.n, chunk_rows):
            self.sq[start : start + chunk_rows] = x[start : start + chunk_rows].double().square().sum(1).float()
        if not bool(torch.isfinite(4.0 * self.sq).all()):
            raise ValueError("embedding values too large: float32 distances overflow")
        self.norm = self.sq.sqrt()
        # |approx d^2 - d^2| <= gamma * (|x| + |c|)^2 for the matmul form (doubled for safety).
        self.gamma = 2.0 * (self.dim + 4) * _matmul_unit_roundoff()
        self.centers = torch.empty((capacity, self.dim), dtype=x.dtype, device=dev)
        self.csq = torch.empty(capacity, dtype=torch.float32, device=dev)
        self.cnorm = torch.empty(capacity, dtype=torch.float32, device=dev)
        self.t = 0
        self.mind = torch.full((self.n,), math.inf, dtype=torch.float32, device=dev)
        self.stamp = torch.zeros(self.n, dtype=torch.int64, device=dev)
        # Active set: about active_rows rows; large enough that epochs are long,
        # small enough that the per-step matrix-vector product stays in cache.
        self.active_rows = int(min(self.n, max(1024, 4 * math.isqrt(self.n))))
        self.A: torch.Tensor | None = None
        self.tau = math.inf
        self.pair_evals = 0  # distance evaluations (approximate + exact), for tests/benchmarks

    def _exact(self, rows: torch.Tensor, cidx: torch.Tensor) -> torch.Tensor:
        """Canonical distances of pairs (rows[i], centers[cidx[i]])."""
        out = torch.empty(rows.numel(), dtype=torch.float32, device=self.x.device)
        step = min(self.chunk, 4096)  # float64 temporaries: a few MiB
        for s in range(0, rows.numel(), step):
            xr = self.x.index_select(0, rows[s : s + step]).double()
            cr = self.centers.index_select(0, cidx[s : s + step]).double()
            out[s : s + step] = (xr - cr).square_().sum(1).sqrt_().float()
        self.pair_evals += rows.numel()
        return out

    def add(self, row: int) -> None:
        j = self.t
        self.centers[j] = self.x[row]
        self.csq[j] = self.sq[row]
        self.cnorm[j] = self.norm[row]
        self.t += 1
        if not self.prune:
            for start in range(0, self.n, self.chunk):
                rows = torch.arange(start, min(start + self.chunk, self.n), device=self.x.device)
                d = self._exact(rows, torch.full_like(rows, j))
                torch.minimum(self.mind[start : start + rows.numel()], d, out=self.mind[start : start + rows.numel()])
            return
        if self.A is None or self.A.numel() == 0:
            return  # inactive rows catch up lazily
        # Filter: approx d^2 - err < mind^2  <=>  x.c + (mind^2 - |x|^2)/2 > (|c|^2 - err)/2,
        # one fused matrix-vector product; err bounds every pair (max norm over A).
        csq = float(self.csq[j])
        err = self.gamma * (self.normA_max + float(self.cnorm[j])) ** 2
        score = torch.addmv(self.halfthr, self.XA, self.centers[j])
        self.pair_evals += self.A.numel()
        cand = torch.nonzero(score > 0.5 * (csq - err))[:, 0]
        if cand.numel():
            d = self._exact(self.A[cand], torch.full_like(cand, j))
            new = torch.minimum(self.mindA[cand], d)
            self.mindA[cand] = new
            self.halfthr[cand] = 0.5 * (new.square() - self.sqA[cand])

    def _refresh(self, rows: torch.Tensor) -> None:
        """Bring stale rows up to date with all centers added since their stamp."""
        t = self.t
        stamps = self.stamp[rows]
        for s in torch.unique(stamps).tolist():
            group = rows[stamps == s]
            m = t - s
            cs = self.centers[s:t]
            csq = self.csq[s:t]
            cmax = float(self.cnorm[s:t].max())
            step = max(1, min(self.chunk, (4 << 20) // m))  # bounds the step x m matrix
            for start in range(0, group.numel(), step):
                g = group[start : start + step]
                # approx d^2 minus the row's |x|^2 (a per-row shift: same argmin), fused.
                approx = torch.addmm(csq[None, :], self.x.index_select(0, g), cs.T, alpha=-2.0)
                self.pair_evals += approx.numel()
                amin = approx.min(1).values
                err = self.gamma * (self.norm[g] + cmax).square()
                cur = self.mind[g]
                # A center can hold the exact minimum only if its approximate value
                # is within 2 err of the approximate minimum; skip rows no center can improve.
                may = (amin + self.sq[g] - 2.0 * err) < cur.square()
                pairs = torch.nonzero((approx <= (amin + 2.0 * err)[:, None]) & may[:, None])
                if pairs.numel():
                    d = self._exact(g[pairs[:, 0]], pairs[:, 1] + s)
                    best = torch.full_like(cur, math.inf).scatter_reduce_(0, pairs[:, 0], d, "amin")
                    self.mind[g] = torch.minimum(cur, best)
                self.stamp[g] = t

    def _new_epoch(self) -> None:
        if self.A is not None and self.A.numel():
            self.mind[self.A] = self.mindA
            self.stamp[self.A] = self.t
        while True:
            ub = self.mind  # exact where stamp == t, an upper bound elsewhere
            if self.active_rows >= self.n:
                tau = lo = float(ub.min())
            else:
                top = torch.topk(ub, min(self.n, _REFRESH_FACTOR * self.active_rows)).values
                tau, lo = float(top[self.active_rows - 1]), float(top[-1])
            if tau == 0.0:
                pos = ub[ub > 0]
                tau = lo = float(pos.min()) if pos.numel() else 0.0
            if tau == 0.0:
                break  # every row is at distance 0
            if not bool(((ub >= tau) & (self.stamp < self.t)).any()):
                break
            # Refresh down to the 2*active_rows-th value, so fewer rounds are needed.
            self._refresh(torch.nonzero((ub >= min(lo, tau)) & (self.stamp < self.t))[:, 0])
        self.tau = tau
        self.A = torch.nonzero(self.mind >= tau)[:, 0] if tau > 0 else self.mind.new_zeros(0, dtype=torch.int64)
        self.XA = self.x.index_select(0, self.A)
        self.sqA = self.sq[self.A]
        self.normA = self.norm[self.A]
        self.mindA = self.mind[self.A].clone()
        self.halfthr = 0.5 * (self.mindA.square() - self.sqA)
        self.normA_max = float(self.normA.max()) if self.A.numel() else 0.0

    def farthest(self) -> tuple[float, int]:
        """(max min-distance over all rows, lowest row index attaining it); (0.0, -1) if all are 0."""
        if not self.prune:
            m = self.mind.max()
            # torch.argmax does not promise the first maximum; take it explicitly.
            row = torch.nonzero(self.mind == m)[0, 0]
            return float(m), int(row)
        for _ in range(2):
            if self.A is not None and self.A.numel():
                m = self.mindA.max()
                if float(m) >= self.tau:
                    # A is sorted by row index, so the first equal entry is the lowest row.
                    pos = torch.nonzero(self.mindA == m)[0, 0]
                    return float(m), int(self.A[pos])
            self._new_epoch()
        if self.A.numel() == 0:
            return 0.0, -1
        raise AssertionError("unreachable: a fresh epoch always holds the maximum")


# numpy backend scratch sizes.  Fresh multi-MiB temporaries cost page faults on
# every call (measured: 4 ms vs 0.5 ms for 1,024 canonical distances at D=384),
# so the hot paths write into buffers allocated once.
# Rows per canonical-distance block (float32 + 2 float64 blocks: 2.5 MiB at D=384).
_NP_BLOCK_ROWS = 512
# Entries of one float32 (rows x centers) block of a batch refresh (4 MiB).
_NP_REFRESH_ENTRIES = 1 << 20
# Rows of one batch-refresh block (bounds its gathered float32 rows).
_NP_REFRESH_ROWS = 4096


def np_sq_norms(x: np.ndarray) -> np.ndarray:
    """float32-rounded float64 squared row norms; ValueError at the first non-finite row."""
    n, dim = x.shape
    sq = np.empty(n, dtype=np.float32)
    block = max(1, min(n, (4 << 20) // (8 * dim)))
    b64 = np.empty((block, dim), dtype=np.float64)
    for start in range(0, n, block):
        b = b64[: min(block, n - start)]
        b[...] = x[start : start + block]
        s64 = np.einsum("ij,ij->i", b, b)
        # A float32 row squared in float64 can't overflow, so a non-finite sum
        # means a NaN or inf entry in the row.
        if not np.isfinite(s64).all():
            bad = int(np.flatnonzero(~np.isfinite(s64))[0]) + start
            raise ValueError(f"embeddings contain NaN or inf (first at row {bad})")
        sq[start : start + b.shape[0]] = s64
    return sq


_BLAS_CONTROLLER = None


def blas_threads(n: int | None):
    """Context: numpy's BLAS limited to ``n`` threads (no-op for None or without threadpoolctl).

    The per-step products are ~1k x D: a second BLAS thread costs more in
    hand-off than it saves, and on a shared machine its spin-waiting steals the
    core the next op needs (measured on 2 loaded cores, Alpaca k=1000: 1.1-1.7 s
    with 2 OpenBLAS threads, 0.5-0.6 s with 1).
    """
    global _BLAS_CONTROLLER
    if n is None or ThreadpoolController is None:
        return contextlib.nullcontext()
    if _BLAS_CONTROLLER is None:
        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=n, user_api="blas")


class NumpyCoverage(CoverageBackend):
    """Min-distance state of the traversal: the CPU backend, in numpy.

    Same algorithm and invariants as ``TorchCoverage`` (read its docstring):
    lazy active set above ``tau``, matrix products only as a filter with a
    rigorous float32 error bound, canonical float64 recomputation of the pairs
    that may change a minimum.  On CPU the per-step work is a few small ops on
    ~1-2k active rows, where torch's per-op dispatch (~5-10 us) dominated; numpy's
    is ~1 us, its BLAS does the float32 products, and scratch buffers are reused.
    prune=False recomputes every row canonically at every step (the reference).

    Canonical distance here: float64 differences (the float32 -> float64 cast is
    exact), squared, summed per row with numpy's pairwise sum over the D entries
    of one row (the same order for every row and batch), square-rooted, rounded
    to float32.
    """

    def __init__(self, x: np.ndarray, capacity: int, chunk_rows: int, prune: bool,
                 sq: np.ndarray | None = None) -> None:
        if isinstance(x, torch.Tensor):
            x = x.numpy()  # CPU float32 contiguous (from as_matrix): no copy
        self.x = x
        self.n, self.dim = x.shape
        self.chunk = chunk_rows
        self.prune = prune
        self.sq = np_sq_norms(x) if sq is None else sq
        with np.errstate(over="ignore"):
            if not np.isfinite(np.float32(4.0) * self.sq).all():
                raise ValueError("embedding values too large: float32 distances overflow")
        self.norm = np.sqrt(self.sq)
        # numpy's BLAS computes float32 products in float32 (no TF32/bf16).
        self.gamma = 2.0 * (self.dim + 4) * 2.0**-24
        self.centers = np.empty((capacity, self.dim), dtype=np.float32)
        self.csq = np.empty(capacity, dtype=np.float32)
        self.cnorm = np.empty(capacity, dtype=np.float32)
        self.cmax = 0.0  # largest center norm so far
        self.t = 0
        self.mind = np.full(self.n, np.inf, dtype=np.float32)
        self.stamp = np.zeros(self.n, dtype=np.int64)
        self.active_rows = int(min(self.n, max(_NP_MIN_ACTIVE, 4 * math.isqrt(self.n))))
        self.A: np.ndarray | None = None
        self.tau = math.inf
        self.pair_evals = 0
        # Scratch buffers (see _NP_BLOCK_ROWS).
        blk = max(1, min(chunk_rows, _NP_BLOCK_ROWS))
        self._b32 = np.empty((blk, self.dim), dtype=np.float32)
        self._b64 = np.empty((blk, self.dim), dtype=np.float64)
        self._c32 = np.empty((blk, self.dim), dtype=np.float32)
        self._o64 = np.empty(blk, dtype=np.float64)
        self._rows32: np.ndarray | None = None  # batch-refresh blocks, allocated on first use
        self._approx: np.ndarray | None = None
        self._close: np.ndarray | None = None

    def _exact(self, out: np.ndarray, src: np.ndarray, rows: np.ndarray,
               cidx: np.ndarray | None = None, c64: np.ndarray | None = None) -> None:
        """out[i] = canonical distance of src[rows[i]] to centers[cidx[i]] (or to c64)."""
        blk = self._b64.shape[0]
        for s in range(0, rows.size, blk):
            n = min(blk, rows.size - s)
            b32, b64, o = self._b32[:n], self._b64[:n], self._o64[:n]
            np.take(src, rows[s : s + n], axis=0, out=b32, mode="clip")  # indices are valid
            if cidx is None:
                np.subtract(b32, c64, out=b64)
            else:
                c = self._c32[:n]
                np.take(self.centers, cidx[s : s + n], axis=0, out=c, mode="clip")
                np.subtract(b32, c, out=b64, dtype=np.float64)
            np.square(b64, out=b64)
            np.add.reduce(b64, axis=1, out=o)
            np.sqrt(o, out=o)
            out[s : s + n] = o  # rounds to float32
        self.pair_evals += rows.size

    def add(self, row: int) -> None:
        j = self.t
        xr = self.x[row]
        self.centers[j] = xr
        self.csq[j] = self.sq[row]
        self.cnorm[j] = self.norm[row]
        self.cmax = max(self.cmax, float(self.norm[row]))
        self.t += 1
        c64 = xr.astype(np.float64)
        if not self.prune:
            d = np.empty(min(self.n, self.chunk), dtype=np.float32)
            for start in range(0, self.n, self.chunk):
                rows = np.arange(start, min(start + self.chunk, self.n))
                self._exact(d[: rows.size], self.x, rows, c64=c64)
                m = self.mind[start : start + rows.size]
                np.minimum(m, d[: rows.size], out=m)
            return
        if self.A is None or self.A.size == 0:
            return  # inactive rows catch up lazily
        # Filter: approx d^2 - err < mind^2  <=>  x.c + (mind^2 - |x|^2)/2 > (|c|^2 - err)/2;
        # err bounds every pair (max row norm over A, max center norm so far).
        err = self.gamma * (self.normA_max + self.cmax) ** 2
        score = np.dot(self.XA, self.centers[j], out=self.score)
        score += self.halfthr
        self.pair_evals += self.A.size
        cand = np.flatnonzero(score > 0.5 * (float(self.csq[j]) - err))
        if cand.size:
            d = np.empty(cand.size, dtype=np.float32)
            self._exact(d, self.XA, cand, c64=c64)
            new = np.minimum(self.mindA[cand], d)
            self.mindA[cand] = new
            self.halfthr[cand] = 0.5 * (new * new - self.sqA[cand])

    def _refresh(self, rows: np.ndarray, below: float) -> None:
        """Bring stale rows forward through the centers added since their stamp, in
        chronological blocks of ``_NP_CENTER_BLOCK`` centers; a row stops as soon
        as its value is below ``below``.  Its value stays exact over the centers
        before its new stamp (so an upper bound now), and it is picked up again
        from there if the threshold ever comes down to it.
        """
        with blas_threads(_NP_REFRESH_THREADS):
            t = self.t
            q = _NP_CENTER_BLOCK
            while rows.size:
                stamps = self.stamp[rows]
                for s in np.unique(stamps).tolist():
                    # Block ends on multiples of q, so groups merge after one round.
                    self._refresh_blocks(rows[stamps == s], s, min(t, (s // q + 1) * q))
                rows = rows[(self.stamp[rows] < t) & (self.mind[rows] >= below)]

    def _refresh_blocks(self, group: np.ndarray, s: int, t: int) -> None:
        """Rows ``group`` (all with stamp s) against centers [s, t); stamps become t."""
        if self._approx is None:
            self._rows32 = np.empty((min(self.n, self.chunk, _NP_REFRESH_ROWS), self.dim), dtype=np.float32)
            self._approx = np.empty(_NP_REFRESH_ENTRIES, dtype=np.float32)
            self._close = np.empty(_NP_REFRESH_ENTRIES, dtype=bool)
        m = t - s
        cs_m2 = self.centers[s:t] * np.float32(-2.0)  # exact scaling by -2
        csq = self.csq[s:t]
        # Largest center norm so far (not just this block's): the bound then also
        # covers the float32 rounding of cur^2, whose center may be any earlier one.
        cmax = self.cmax
        step = max(1, min(self._rows32.shape[0], _NP_REFRESH_ENTRIES // m))
        for start in range(0, group.size, step):
            g = group[start : start + step]
            if g[-1] - g[0] == g.size - 1:  # consecutive rows (e.g. the first refresh): a view
                xg = self.x[g[0] : g[-1] + 1]
            else:
                xg = self._rows32[: g.size]
                np.take(self.x, g, axis=0, out=xg, mode="clip")
            # approx d^2 minus the row's |x|^2 (a per-row shift: same argmin).
            approx = self._approx[: g.size * m].reshape(g.size, m)
            np.matmul(xg, cs_m2.T, out=approx)
            approx += csq
            self.pair_evals += approx.size
            am = approx.argmin(axis=1)
            amin = approx[np.arange(g.size), am]
            err2 = (2.0 * self.gamma) * (self.norm[g] + cmax) ** 2
            cur = self.mind[g]
            # A center can hold the exact minimum only if its approximate value
            # is within 2 err of the approximate minimum; skip rows no center can improve.
            may = np.flatnonzero((amin + self.sq[g] - err2) < cur * cur)
            if may.size:
                close = self._close[: approx.size].reshape(approx.shape)
                np.less_equal(approx, (amin + err2)[:, None], out=close)
                multi = np.count_nonzero(close, axis=1)[may] > 1
                # Usually the approximate argmin is a row's only candidate.
                pr = may[~multi]
                pc = am[pr]
                if multi.any():
                    mr = may[multi]
                    r2, c2 = np.nonzero(close[mr])
                    pr = np.concatenate([pr, mr[r2]])
                    pc = np.concatenate([pc, c2])
                d = np.empty(pr.size, dtype=np.float32)
                self._exact(d, xg, pr, cidx=pc + s)
                np.minimum.at(cur, pr, d)
                self.mind[g] = cur
            self.stamp[g] = t

    def _new_epoch(self) -> None:
        if self.A is not None and self.A.size:
            self.mind[self.A] = self.mindA
            self.stamp[self.A] = self.t
        n = self.n
        while True:
            ub = self.mind  # exact where stamp == t, an upper bound elsewhere
            if self.active_rows >= n:
                tau = lo = float(ub.min())
            else:
                kk = min(n, _NP_REFRESH_FACTOR * self.active_rows)
                part = np.partition(ub, [n - kk, n - self.active_rows])
                tau, lo = float(part[n - self.active_rows]), float(part[n - kk])
            if tau == 0.0:
                pos = ub[ub > 0]
                tau = lo = float(pos.min()) if pos.size else 0.0
            if tau == 0.0:
                break  # every row is at distance 0
            stale = self.stamp < self.t
            if not ((ub >= tau) & stale).any():
                break
            # Refresh down to the (factor * active_rows)-th value, so fewer rounds are needed.
            self._refresh(np.flatnonzero((ub >= min(lo, tau)) & stale), min(lo, tau))
        self.tau = tau
        self.A = np.flatnonzero(self.mind >= tau) if tau > 0 else np.zeros(0, dtype=np.int64)
        self.XA = self.x[self.A]
        self.sqA = self.sq[self.A]
        self.mindA = self.mind[self.A]
        self.halfthr = 0.5 * (self.mindA * self.mindA - self.sqA)
        self.normA_max = float(self.norm[self.A].max()) if self.A.size else 0.0
        self.score = np.empty(self.A.size, dtype=np.float32)

    def farthest(self) -> tuple[float, int]:
        """(max min-distance over all rows, lowest row index attaining it); (0.0, -1) if all are 0."""
        # np.argmax returns the first maximum: ties go to the lowest row
        # (A is sorted by row index).
        if not self.prune:
            i = int(self.mind.argmax())
            return float(self.mind[i]), i
        for _ in range(2):
            if self.A is not None and self.A.size:
                i = int(self.mindA.argmax())
                m = float(self.mindA[i])
                if m >= self.tau:
                    return m, int(self.A[i])
            self._new_epoch()
        if self.A.size == 0:
            return 0.0, -1
        raise AssertionError("unreachable: a fresh epoch always holds the maximum")
