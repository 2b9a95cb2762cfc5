"""Benchmark: coverage methods at an equal budget, and necessity cost per row (issue 20).

    .venv/bin/python benchmarks/selection.py [--rows 10000] [--k 1000] [--necessity-rows 16]

Coverage: a seeded sample of ``--rows`` rows of the real pool in ../shared/data (ingested
as `mods run` does), instructions embedded with the packaged MiniLM (cached under
work/cache/bench/), and ``--k`` rows picked by random, k-center, kmeans_quality and
facility_location. For each: coverage radius (largest distance from a row to its nearest
pick), mean distance to the nearest pick, share of each source, seconds and peak memory.
No quality scores are computed here: kmeans_quality draws with uniform weights.

Necessity: seconds per row of the seed model's work, on the packaged SmolLM2-135M, for
``generate`` at the paper's setting (4 beams, up to 1,024 new tokens, batch 1) and at the
CPU demo's (greedy, 64 new tokens, batch 16), and ``ifd`` (two forward passes, batch 8).
The scoring pass of the answers is not counted, which favours generate. ifd_speedup is
against the paper's setting; the demo's cap of 64 new tokens makes generation cheap
beside an IFD pass over the pool's whole answer.

The last line: best_coverage=NAME mean_distance_vs_random=X radius_vs_random=Y ifd_speedup=Z
(the best non-k-center method by mean distance; its distances over random's).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from kcenter import PeakRSS, gib  # noqa: E402

POOL = ROOT / ".." / "shared" / "data" / "pool"
CACHE = ROOT / "work" / "cache" / "bench"


def pool_sample(rows: int, seed: int) -> pd.DataFrame:
    from mods.data.ingest import ingest

    pool = ingest([str(POOL.resolve())], progress=False).rows
    return pool.sample(n=min(rows, len(pool)), random_state=seed).reset_index(drop=True)


def embeddings(sample: pd.DataFrame) -> np.ndarray:
    from mods.core.artifacts import hash_json
    from mods.models.embedding import EmbeddingConfig, embedding_texts, encode_texts, load_embedder

    config = EmbeddingConfig(device="cpu", batch_size=128)
    cached = CACHE / f"selection_minilm_{hash_json(sample['id'].tolist())}.npy"
    if cached.exists():
        return np.load(cached)
    started = time.perf_counter()
    vectors = encode_texts(load_embedder(config), embedding_texts(sample, config.text), config, progress=False)
    print(f"[data] embedded {len(sample)} instructions in {time.perf_counter() - started:.0f} s (cached)")
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(cached, vectors)
    return vectors


def nearest_pick_distances(x: np.ndarray, picks: np.ndarray) -> np.ndarray:
    centers = x[picks].astype(np.float64)
    sq_c = (centers ** 2).sum(1)
    out = np.empty(len(x))
    for start in range(0, len(x), 2048):
        block = x[start:start + 2048].astype(np.float64)
        d2 = (block ** 2).sum(1)[:, None] + sq_c[None, :] - 2.0 * block @ centers.T
        out[start:start + 2048] = np.sqrt(np.maximum(d2, 0.0)).min(1)
    return out


def coverage_methods(x: np.ndarray, sample: pd.DataFrame, k: int, seed: int) -> dict[str, dict]:
    from mods.selection.budgets import make_budget
    from mods.selection.coverage_methods import CoverageConfig, select_rows
    from mods.selection.cutoffs import common_folder, source_label

    common = common_folder(sample["source"].astype(str).unique().tolist())
    labels = np.array([source_label(s, common) for s in sample["source"].astype(str)])
    results = {}
    for method in ("random", "k_center", "kmeans_quality", "facility_location"):
        budget = make_budget("rows", k, np.ones(len(x), dtype=np.int64), [], {}, {})
        with PeakRSS() as memory:
            started = time.perf_counter()
            if method == "random":
                picks = np.random.default_rng(seed).permutation(len(x))[:k]
            else:
                picks = select_rows(CoverageConfig(method=method), x, budget, seed=seed)
            seconds = time.perf_counter() - started
        distances = nearest_pick_distances(x, picks)
        shares = pd.Series(labels[picks]).value_counts(normalize=True)
        results[method] = {"picks": len(picks), "radius": float(distances.max()), "mean_distance": float(distances.mean()),
                           "seconds": seconds, "peak": memory.peak - memory.start,
                           "shares": {name: round(float(v), 3) for name, v in shares.items()}}
        print(f"{method:>18}: {len(picks)} picks, radius {distances.max():.4f}, mean distance {distances.mean():.4f}, "
              f"{seconds:.1f} s, peak +{gib(memory.peak - memory.start)}")
    pool_shares = pd.Series(labels).value_counts(normalize=True)
    print("\nshare of each source (pool, then each method):")
    table = pd.DataFrame({"pool": pool_shares.round(3), **{m: pd.Series(r["shares"]) for m, r in results.items()}})
    print(table.fillna(0).to_string())
    return results


def _generate_seconds(model: object, tokenizer: object, rows: pd.DataFrame, config: object) -> float:
    from mods.generation.answers import generate_answers

    started = time.perf_counter()
    generate_answers(model, tokenizer, rows["instruction"].tolist(), rows["input"].tolist(), config, progress=False)
    return (time.perf_counter() - started) / len(rows)


def necessity_seconds_per_row(sample: pd.DataFrame, rows: int, paper_rows: int) -> tuple[float, float, float]:
    """Seconds per row: generate at the demo setting and at the paper's, and ifd."""
    from mods.generation.config import GenerationConfig
    from mods.models.loading import DEFAULT_BASE_MODEL, load_causal_lm, resolve_model_path
    from mods.scoring.ifd import ifd_scores

    model, tokenizer = load_causal_lm(resolve_model_path(DEFAULT_BASE_MODEL), device="cpu")
    short = sample[(sample["instruction"].str.len() + sample["output"].str.len()) < 1200].head(rows)
    demo = GenerationConfig(device="cpu")  # greedy, 64 new tokens, batch 16 (the CPU demo)
    paper = GenerationConfig(device="cpu", num_beams=4, max_new_tokens=1024, batch_size=1)  # the paper's
    _generate_seconds(model, tokenizer, short.head(2), demo)  # warm-up
    generate_demo = _generate_seconds(model, tokenizer, short, demo)
    generate_paper = _generate_seconds(model, tokenizer, short.head(paper_rows), paper)
    ifd_scores(model, tokenizer, short.head(2), 512)  # warm-up
    started = time.perf_counter()
    for start in range(0, len(short), 8):
        ifd_scores(model, tokenizer, short.iloc[start:start + 8], 512)
    ifd = (time.perf_counter() - started) / len(short)
    print(f"\nnecessity, seconds per row: generate {generate_paper:.3f} (paper: 4 beams, up to 1,024 new tokens, "
          f"batch 1; {paper_rows} rows), generate {generate_demo:.3f} (CPU demo: greedy, 64 new tokens, batch 16; "
          f"{len(short)} rows), ifd {ifd:.3f} (batch 8, max_length 512; {len(short)} rows)")
    print(f"ifd speed-up: {generate_paper / ifd:.1f}x against the paper's generation, "
          f"{generate_demo / ifd:.1f}x against the demo's")
    return generate_paper, generate_demo, ifd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--necessity-rows", type=int, default=16)
    parser.add_argument("--paper-rows", type=int, default=2, help="rows answered at the paper's generation setting")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not POOL.is_dir():
        sys.exit(f"the real pool is not at {POOL.resolve()} (../shared/data beside the checkout)")
    sample = pool_sample(args.rows, args.seed)
    x = embeddings(sample)
    print(f"[data] {len(sample)} rows, {x.shape[1]}-d MiniLM embeddings; budget k={args.k} rows for every method\n")
    results = coverage_methods(x, sample, args.k, args.seed)
    generate, _, ifd = necessity_seconds_per_row(sample, args.necessity_rows, args.paper_rows)
    best = min(("kmeans_quality", "facility_location"), key=lambda m: results[m]["mean_distance"])
    random = results["random"]
    print(f"best_coverage={best} mean_distance_vs_random={results[best]['mean_distance'] / random['mean_distance']:.3f} "
          f"radius_vs_random={results[best]['radius'] / random['radius']:.3f} ifd_speedup={generate / ifd:.1f}")


if __name__ == "__main__":
    main()
