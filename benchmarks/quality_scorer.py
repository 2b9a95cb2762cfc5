"""Does the default (likelihood) quality scorer mean something?

On real Alpaca rows from ../shared/data/pool, each original answer is paired with
three corruptions of it:

* other     — the answer of another instruction (same pool),
* truncated — the first half of the answer's words (original formatting kept),
* shuffled  — the answer's words in random order,

and we report, per kind, the share of pairs where the original scores higher
(target: >= 80% each), plus scoring throughput against a naive baseline (batch
size 1, no length sorting, LM head over every position, float32, no shared-prefix
cache) measured in the same run.

Tuning rows (``--tune``) come from the first Alpaca chunk, evaluation rows from the
other chunks, so the reported figures are on rows the weights never saw.

    python benchmarks/quality_scorer.py            # 100 rows, about 4 minutes on 2 shared cores
    python benchmarks/quality_scorer.py --rows 150 # tighter figures, ~7 minutes
    python benchmarks/quality_scorer.py --tune     # per-feature accuracies on tuning rows
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
ALPACA = DATA / "pool" / "alpaca52k"
KINDS = ("other", "truncated", "shuffled")
_WORD = re.compile(r"\S+")


def load_rows(tune: bool, n: int, seed: int, min_words: int = 12) -> list[dict[str, str]]:
    files = sorted(ALPACA.glob("*.json"))
    tune_file = [f for f in files if f.name.startswith("alpaca_data-0-")]
    eval_files = [f for f in files if f not in tune_file]
    rows: list[dict[str, str]] = []
    for f in tune_file if tune else eval_files:
        rows.extend(json.loads(f.read_text()))
    # Non-trivial answers only: a one-word answer has no "half" and nothing to shuffle.
    rows = [r for r in rows if len(_WORD.findall(r["output"])) >= min_words]
    random.Random(seed).shuffle(rows)
    return rows[:n]


def corrupt(rows: list[dict[str, str]], seed: int) -> dict[str, list[str]]:
    rng = random.Random(seed)
    n = len(rows)
    outs = [r["output"] for r in rows]
    other = [outs[(i + 1 + rng.randrange(n - 1)) % n] if n > 1 else outs[i] for i in range(n)]
    for i in range(n):  # never the same text (duplicate answers exist in Alpaca)
        while other[i] == outs[i] and n > 1:
            other[i] = outs[rng.randrange(n)]
    truncated, shuffled = [], []
    for o in outs:
        spans = list(_WORD.finditer(o))
        truncated.append(o[: spans[len(spans) // 2 - 1].end()])
        words = [m.group() for m in spans]
        w2 = words[:]
        while w2 == words:
            rng.shuffle(w2)
        shuffled.append(" ".join(w2))
    return {"other": other, "truncated": truncated, "shuffled": shuffled}


def pair_accuracy(orig, corr) -> float:
    return float((orig.to_numpy() > corr.to_numpy()).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100, help="rows to evaluate (each scored 4 times)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--baseline-rows", type=int, default=8, help="rows for the naive-baseline timing")
    ap.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--save", type=Path, default=None, help="write per-row features and scores to this CSV")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 is steadier on shared cores")
    ap.add_argument("--tune", action="store_true", help="use the tuning rows and print per-feature accuracies")
    ap.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct)")
    args = ap.parse_args()

    if not ALPACA.is_dir():
        print(f"SKIP: {ALPACA} not found (the benchmark needs ../shared/data beside the project)")
        return 0

    import numpy as np
    import pandas as pd
    import torch

    from mods.scoring import LikelihoodScorer, ScorerConfig, build_scorer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rows = load_rows(args.tune, args.rows, args.seed)
    bad = corrupt(rows, args.seed)
    n = len(rows)
    ins = [r["instruction"] for r in rows]
    inp = [r["input"] for r in rows]
    variants = {"original": [r["output"] for r in rows], **bad}
    all_ins = ins * 4
    all_inp = inp * 4
    all_out = [o for k in ("original", *KINDS) for o in variants[k]]

    cfg = ScorerConfig(
        model=args.model, batch_size=args.batch_size, max_length=args.max_length, device="cpu", precision=args.precision
    )
    t0 = time.perf_counter()
    scorer = build_scorer(cfg)
    assert isinstance(scorer, LikelihoodScorer)
    load_s = time.perf_counter() - t0
    print(f"model: {scorer.path}  (loaded in {load_s:.1f} s; torch threads: {torch.get_num_threads()}; precision {scorer.dtype})")
    split = "tuning rows (alpaca chunk 0)" if args.tune else "evaluation rows (alpaca chunks 1-17)"
    print(f"{n} {split}, seed {args.seed}; each scored as original + {len(KINDS)} corruptions = {4 * n} rows")

    t0 = time.perf_counter()
    feats = scorer.features(all_ins, all_inp, all_out, progress=True)
    fast_s = time.perf_counter() - t0
    fast_tokens = scorer.last_tokens
    feats["quality_score"] = scorer.combine(feats)
    feats["variant"] = np.repeat(["original", *KINDS], n)

    def col(variant: str, name: str) -> pd.Series:
        return feats.loc[feats.variant == variant, name].reset_index(drop=True)

    q = col("original", "quality_score")
    print(f"quality_score of original answers: median {q.median():.2f}, 5-95% [{q.quantile(0.05):.2f}, {q.quantile(0.95):.2f}]")
    if args.save:
        feats.assign(instruction=all_ins, input=all_inp, output=all_out).to_csv(args.save, index=False)
    print("\n% of pairs where the original answer scores above the corrupted one (target >= 80%):")
    results = {}
    for kind in KINDS:
        acc = pair_accuracy(col("original", "quality_score"), col(kind, "quality_score"))
        results[kind] = acc
        print(f"  {kind:<10} {100 * acc:5.1f}%  ({n} pairs)")
    if args.tune:
        print("\nper-feature accuracy (NaN lp_end filled as the scorer does):")
        from mods.scoring import END_FILL, END_FLOOR

        feats["lp_end_c"] = feats["lp_end"].fillna(END_FILL).clip(lower=END_FLOOR, upper=0)
        for name in ("lp_answer", "lp_answer_neutral", "pmi", "lp_end_c"):
            accs = [pair_accuracy(col("original", name), col(k, name)) for k in KINDS]
            print(f"  {name:<18} " + "  ".join(f"{k}={100 * a:5.1f}%" for k, a in zip(KINDS, accs)))
        print("\nweight grid (w_answer, w_pmi, w_end) -> accuracies, min:")
        grid = []
        for wa in (0.0, 0.5, 1.0, 2.0):
            for wp in (0.0, 0.5, 1.0, 2.0):
                for we in (0.0, 0.1, 0.25, 0.5, 1.0):
                    q = wa * feats["lp_answer"] + wp * feats["pmi"] + we * feats["lp_end_c"]
                    feats["_q"] = q
                    accs = [pair_accuracy(col("original", "_q"), col(k, "_q")) for k in KINDS]
                    grid.append((min(accs), wa, wp, we, accs))
        for m, wa, wp, we, accs in sorted(grid, reverse=True)[:15]:
            print(f"  {wa:4} {wp:4} {we:4} -> " + " ".join(f"{100 * a:5.1f}" for a in accs) + f"  min {100 * m:5.1f}")
        print(f"\nflags: answer_truncated={int(feats.answer_truncated.sum())}")

    print(f"\nthroughput (this run, batch {args.batch_size}, sorted by length, LM head on answer positions only, {scorer.dtype}):")
    print(f"  {4 * n / fast_s:6.2f} rows/s, {fast_tokens / fast_s:7.0f} tokens/s ({4 * n} rows, {fast_tokens} tokens incl. neutral passes, {fast_s:.1f} s)")

    if args.baseline_rows > 0:
        # Same rows as the start of the fast run, scored naively: one row per forward pass,
        # in input order, LM head over every position, float32, no prefix cache. The two
        # are run alternately, twice each, and the best time of each kept: the cores are
        # shared, and load that comes and goes would otherwise decide the ratio.
        k = min(args.baseline_rows, n)
        sub_ins, sub_inp = ins[:k] * 4, inp[:k] * 4
        sub_out = [o for v in ("original", *KINDS) for o in variants[v][:k]]
        fast_state = (cfg, True, True, scorer.dtype, True)
        naive_state = (cfg.model_copy(update={"batch_size": 1}), False, False, torch.float32, False)

        def timed(state: tuple) -> tuple[float, "pd.DataFrame", int]:
            (scorer.config, scorer._sort_by_length, scorer._trim_logits, scorer.dtype,
             scorer._use_prefix_cache) = state
            t0 = time.perf_counter()
            out = scorer.features(sub_ins, sub_inp, sub_out, progress=False)
            return time.perf_counter() - t0, out, scorer.last_tokens

        times = {"fast": [], "naive": []}
        for _ in range(2):
            for name, state in (("fast", fast_state), ("naive", naive_state)):
                dt, out, toks = timed(state)
                times[name].append(dt)
                if name == "fast":
                    sub_fast = out
                else:
                    sub_naive, naive_tokens = out, toks
        sub_fast_s, naive_s = min(times["fast"]), min(times["naive"])
        diff = float(np.nanmax(np.abs(sub_naive["lp_answer"].to_numpy() - sub_fast["lp_answer"].to_numpy())))
        print(f"naive baseline (batch 1, input order, full LM head, float32, no prefix cache) on {4 * k} of the rows,")
        print("alternating with the optimised scorer, best of 2 each:")
        print(f"  naive {4 * k / naive_s:6.2f} rows/s ({naive_tokens / naive_s:7.0f} tokens/s);"
              f" optimised {4 * k / sub_fast_s:6.2f} rows/s -> speed-up x{naive_s / sub_fast_s:.2f}")
        print(f"  max |lp_answer difference| naive vs optimised: {diff:.2e} nats (bf16 and batching noise)")

    worst = min(results.values())
    print(f"\nRESULT: min pair accuracy {100 * worst:.1f}% -> {'PASS' if worst >= 0.8 else 'FAIL'} (target 80%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
