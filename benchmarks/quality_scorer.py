"""Do the quality scorers agree with people? And can they tell an answer from a broken one?

Default: **agreement with people.** PandaLM's human-labelled test set
(``../shared/data/preferences/pandalm_testset_v1.json``): the unanimous, non-tie pairs
whose two answers are non-empty strings (742 pairs, 150 instructions; 176 of them
length-matched, answer lengths within a ratio of 0.8-1.25). A scorer agrees on a pair
when it scores the answer people preferred higher (a tie counts half). Side by side:
the likelihood scorer, preferring the longer answer, single features, and linear heads
over feature sets. Every head's figure is instruction-grouped cross-validated (5 folds,
averaged over 5 fold splits): no instruction is in both the fitting and the measuring
folds. Throughput of the likelihood and preference scorers is measured on the same
rows in the same run, alternating, best of 2.

Features are computed once per distinct (instruction, input, answer) row and cached
in ``$MODS_CACHE/quality-benchmark`` (default ``~/.cache/mods``), keyed by the models,
the feature code and the rows, so refitting and reruns take seconds.

The last line is
``human_agreement=X length_matched_agreement=Y length_only=Z rows_per_s=R``
for the default scorer (X, Y, Z as fractions).

    python benchmarks/quality_scorer.py               # human agreement (features: ~25 min cold on 2 cores)
    python benchmarks/quality_scorer.py --fit         # also refit the shipped head (mods/scoring/quality_head.json)
    python benchmarks/quality_scorer.py --corruptions # original vs corrupted answers (below)

``--corruptions``: real Alpaca rows from ../shared/data/pool, each original answer
paired with three corruptions of it (another row's answer, the first half of its
words, its words shuffled); the share of pairs where the original scores higher,
per kind (target >= 80%), for ``--kind`` (likelihood or preference), plus the
likelihood scorer's throughput against a naive baseline. ``--tune`` uses the tuning
rows (first Alpaca chunk) and prints per-feature accuracies.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import random
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
ALPACA = DATA / "pool" / "alpaca52k"
PANDALM = DATA / "preferences" / "pandalm_testset_v1.json"
KINDS = ("other", "truncated", "shuffled")
_WORD = re.compile(r"\S+")

# Feature sets compared as heads. DEFAULT_HEAD is what ships in mods/scoring/quality_head.json:
# every feature but lp_answer_neutral, whose pass would double the SmolLM2 cost for no
# measured gain (README, "Quality scoring").
LM_FEATURES = ["lp_answer", "lp_answer_neutral", "lp_end_clipped"]
SIM_FEATURES = ["sim_question", "sim_instruction", "sim_input"]
TEXT_FEATURES = ["copy_input", "repeated_trigrams", "distinct_words", "lines", "list_lines", "digits",
                 "ends_sentence", "refusal"]
ALL_FEATURES = ["log_info"] + LM_FEATURES + ["judge"] + SIM_FEATURES + TEXT_FEATURES
HEADS: dict[str, list[str]] = {
    "head: SmolLM2 log-probs": LM_FEATURES,
    "head: SmolLM2 log-probs + judge": LM_FEATURES + ["judge"],
    "head: surprisal + log-probs": ["log_info"] + LM_FEATURES,
    "head: MiniLM similarities": SIM_FEATURES,
    "head: text statistics": TEXT_FEATURES,
    "head: all but surprisal": [f for f in ALL_FEATURES if f != "log_info"],
    "head: all 16 features": ALL_FEATURES,
    "head: default (all but the neutral pass)": [f for f in ALL_FEATURES if f != "lp_answer_neutral"],
}
DEFAULT_HEAD = "head: default (all but the neutral pass)"
HEAD_L2 = 10.0  # fixed before measuring; 1 to 100 give the same figures within noise (README)
SINGLE_FEATURES = ["judge", "log_info", "answer_tokens", "lp_answer", "pmi", "sim_instruction", "copy_input",
                   "distinct_words"]


# ----------------------------------------------------------------------------- human agreement


def _feature_code_hash() -> str:
    from mods.scoring.likelihood import LikelihoodScorer
    from mods.scoring.preference import PreferenceScorer, text_features

    code = "".join(inspect.getsource(f) for f in (LikelihoodScorer, PreferenceScorer, text_features))
    return hashlib.sha256(code.encode()).hexdigest()[:12]


def all_features_scorer(cfg):
    """A preference scorer that computes every feature (a zero head naming them all)."""
    from mods.scoring.preference import PreferenceHead, PreferenceScorer

    names = sorted({f for cols in HEADS.values() for f in cols} | set(SINGLE_FEATURES))
    zero = PreferenceHead(features=names, mean=[0.0] * len(names), scale=[1.0] * len(names), weights=[0.0] * len(names))
    return PreferenceScorer(cfg, head=zero)


def feature_cache_path(scorer, rows, cache_dir: Path, name: str = "pandalm") -> Path:
    """Named by the models, the feature code and the rows (not by the head: a refit reuses it)."""
    fp = scorer.fingerprint()
    ident = {k: v for k, v in fp.items() if k not in ("head", "version")}
    ident["code"] = _feature_code_hash()
    ident["rows"] = hashlib.sha256(rows.to_json(orient="values").encode()).hexdigest()[:16]
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir / f"{name}-features-{key}.parquet"


def cached_features(scorer, rows, cache_dir: Path, progress: bool, name: str = "pandalm"):
    import pandas as pd

    path = feature_cache_path(scorer, rows, cache_dir, name)
    if path.is_file():
        print(f"features: cached {path}")
        return pd.read_parquet(path), None
    print(f"features: computing for {len(rows)} distinct rows (cache: {path})", flush=True)
    t0 = time.perf_counter()
    feats = scorer.features(list(rows.instruction), list(rows.input), list(rows.output), progress=progress)
    dt = time.perf_counter() - t0
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    feats.to_parquet(tmp)
    os.replace(tmp, path)
    print(f"features: {dt:.0f} s ({len(rows) / dt:.2f} rows/s, all features)")
    return feats, dt


def corruption_rows(tune: bool, n: int, seed: int):
    """Alpaca rows and their three corruptions as rows to score, and the pairs
    (original index, corrupted index, kind) whose order is known: the original is better."""
    import numpy as np
    import pandas as pd

    rows = load_rows(tune, n, seed)
    bad = corrupt(rows, seed)
    n = len(rows)
    outputs = [r["output"] for r in rows] + [o for kind in KINDS for o in bad[kind]]
    frame = pd.DataFrame({"instruction": [r["instruction"] for r in rows] * 4,
                          "input": [r["input"] for r in rows] * 4, "output": outputs})
    original = np.tile(np.arange(n), len(KINDS))
    corrupted = np.arange(n, 4 * n)
    return frame, original, corrupted, np.repeat(KINDS, n)


def time_scorers(cfg, rows, n: int, repeats: int = 2) -> dict[str, float]:
    """rows/s of the likelihood and preference scorers on the same n rows, alternating,
    best of ``repeats`` each (the cores are shared; load that comes and goes would
    otherwise decide the ratio). Each call is a fresh score() of all n rows."""
    from mods.scoring.scorers import build_scorer

    sub = rows.iloc[:n]
    args = (list(sub.instruction), list(sub.input), list(sub.output))
    scorers = {kind: build_scorer(cfg.model_copy(update={"kind": kind})) for kind in ("likelihood", "preference")}
    for s in scorers.values():  # untimed warm-up (first-call allocations, MiniLM's first batch)
        s.score(*(a[:4] for a in args), progress=False)
    best = {kind: float("inf") for kind in scorers}
    for _ in range(repeats):
        for kind, s in scorers.items():
            t0 = time.perf_counter()
            s.score(*args, progress=False)
            best[kind] = min(best[kind], time.perf_counter() - t0)
    return {kind: n / t for kind, t in best.items()}


def human_benchmark(args: argparse.Namespace) -> int:
    import numpy as np
    import pandas as pd
    import torch

    from mods.evaluation.preferences import (
        agreement,
        cross_validated_scores,
        fit_preference_head,
        human_pairs,
        length_only,
        unique_rows,
    )
    from mods.models.loading import default_cache_dir
    from mods.scoring.config import ScorerConfig
    from mods.scoring.likelihood import LikelihoodScorer
    from mods.scoring.preference import PREFERENCE_HEAD_FILE

    if not PANDALM.is_file():
        print(f"SKIP: {PANDALM} not found (the benchmark needs ../shared/data beside the project)")
        return 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    pairs = human_pairs(PANDALM)
    rows, ia, ib = unique_rows(pairs)
    human = pairs["human"].to_numpy()
    matched = pairs["length_matched"].to_numpy()
    print(f"{len(pairs)} human pairs ({pairs.group.nunique()} instructions), {int(matched.sum())} length-matched; "
          f"{len(rows)} distinct rows to score; torch threads {torch.get_num_threads()}")

    cfg = ScorerConfig(kind="preference", batch_size=args.batch_size, max_length=args.max_length, device="cpu",
                       precision=args.precision)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir() / "quality-benchmark"
    scorer = all_features_scorer(cfg)
    feats, _ = cached_features(scorer, rows, cache_dir, progress=True)
    # Anchors: PandaLM's two answers always address the instruction, so a head fitted on
    # them alone never learns that an answer to another instruction, a cut-off answer or
    # word salad is worse. Corrupted Alpaca answers teach it: pairs from the tuning chunk
    # join every fit; pairs from the other chunks measure it (never fitted on).
    anchor_rows, anchor_orig, anchor_bad, _ = corruption_rows(True, args.anchor_rows, args.seed)
    check_rows, check_orig, check_bad, check_kind = corruption_rows(False, args.check_rows, args.seed)
    print(f"anchors: {len(anchor_orig)} corruption pairs from {args.anchor_rows} Alpaca tuning rows (fitted on); "
          f"{len(check_orig)} from {args.check_rows} other rows (measured)")
    anchor_feats, _ = cached_features(scorer, anchor_rows, cache_dir, progress=True, name="anchor")
    check_feats, _ = cached_features(scorer, check_rows, cache_dir, progress=True, name="check")
    del scorer
    feats = pd.concat([feats, anchor_feats], ignore_index=True)
    feats = feats.fillna({c: 0.0 for c in feats.columns if feats[c].dtype.kind == "f"})
    check_feats = check_feats.fillna({c: 0.0 for c in check_feats.columns if check_feats[c].dtype.kind == "f"})
    off = len(rows)
    anchors = (anchor_bad + off, anchor_orig + off, np.ones(len(anchor_orig), dtype=np.int64))  # b = original
    anchor_weight = args.anchor_weight

    def corruption_accuracy(score) -> dict[str, float]:
        """Share of held-out pairs where the original answer scores above its corruption, per kind."""
        s = np.asarray(score, dtype=np.float64)
        return {k: float((s[check_orig[check_kind == k]] > s[check_bad[check_kind == k]]).mean()) for k in KINDS}

    table: list[tuple[str, str, float, float, dict[str, float] | None, float | None]] = []

    def add(name: str, how: str, a: np.ndarray, b: np.ndarray, corr: dict[str, float] | None = None) -> tuple[float, float]:
        overall = agreement(a, b, human)
        lm = agreement(a[matched], b[matched], human[matched])
        table.append((name, how, overall, lm, corr, None))
        return overall, lm

    # The likelihood scorer's score from the same log-probability columns (the judge
    # question after the answer cannot change them: attention is causal).
    lik = LikelihoodScorer.combine(feats).to_numpy()
    add("likelihood (the previous default)", "fixed weights", lik[ia], lik[ib], corruption_accuracy(LikelihoodScorer.combine(check_feats)))
    la, lb = length_only(pairs.answer_a, pairs.answer_b)
    length_all, _ = add("length only (characters)", "no fit", la, lb,
                        corruption_accuracy(check_rows.output.str.len()))
    for name in SINGLE_FEATURES:
        x = feats[name].to_numpy(dtype=np.float64)
        add(f"feature: {name}", "raw, higher = better", x[ia], x[ib], corruption_accuracy(check_feats[name]))
    cv: dict[str, tuple[float, float]] = {}
    for name, cols in HEADS.items():
        for with_anchors in (False, True):
            extra = tuple(np.repeat(x, anchor_weight) for x in anchors) if with_anchors else None
            runs = [cross_validated_scores(feats, ia, ib, pairs, cols, HEAD_L2, k=5, seed=s, extra_pairs=extra)
                    for s in range(args.cv_seeds)]
            overall = float(np.mean([agreement(a, b, human) for a, b in runs]))
            lm = float(np.mean([agreement(a[matched], b[matched], human[matched]) for a, b in runs]))
            # Corruptions: one head fitted on all PandaLM pairs (and the anchors), measured on held-out rows.
            ea, eb, eh = extra if extra else (np.zeros(0, np.int64),) * 3
            full = fit_preference_head(feats, np.concatenate([ia, ea]), np.concatenate([ib, eb]),
                                       np.concatenate([human, eh]), cols, HEAD_L2)
            z = (check_feats[cols].to_numpy(np.float64) - np.asarray(full["mean"])) / np.asarray(full["scale"])
            label = name + (" + anchors" if with_anchors else "")
            table.append((label, f"{len(cols)} features, grouped CV", overall, lm,
                          corruption_accuracy(z @ np.asarray(full["weights"])), None))
            cv[label] = (overall, lm)

    shipped = None
    default = DEFAULT_HEAD + " + anchors"
    if args.fit:
        extra = tuple(np.repeat(x, anchor_weight) for x in anchors)
        head = fit_preference_head(feats, np.concatenate([ia, extra[0]]), np.concatenate([ib, extra[1]]),
                                   np.concatenate([human, extra[2]]), HEADS[DEFAULT_HEAD], HEAD_L2)
        head["fitted_on"] = (f"PandaLM testset v1 ({PANDALM.name}): {len(pairs)} unanimous non-tie pairs, "
                             f"{pairs.group.nunique()} Self-instruct test instructions (a calibration); plus "
                             f"{len(anchor_orig)} original-over-corrupted Alpaca pairs (chunk 0, weight {anchor_weight})")
        head["l2"] = HEAD_L2
        head["cross_validated"] = {"human_agreement": round(cv[default][0], 4),
                                   "length_matched_agreement": round(cv[default][1], 4),
                                   "folds": "5 instruction-grouped folds, mean of %d splits" % args.cv_seeds}
        head["command"] = "python benchmarks/quality_scorer.py --fit"
        PREFERENCE_HEAD_FILE.write_text(json.dumps(head, indent=1) + "\n")
        print(f"wrote {PREFERENCE_HEAD_FILE}")
    if PREFERENCE_HEAD_FILE.is_file():
        from mods.scoring.preference import load_preference_head

        shipped = load_preference_head()
        s = shipped.apply(feats)
        add("shipped head, in-sample (fitted on all these pairs)", "not a measurement", s[ia], s[ib],
            corruption_accuracy(shipped.apply(check_feats)))

    speeds = time_scorers(cfg, rows.sample(frac=1.0, random_state=0), args.timing_rows) if args.timing_rows else {}
    shipped_corr = corruption_accuracy(shipped.apply(check_feats)) if shipped is not None else None
    table[0] = (*table[0][:5], speeds.get("likelihood"))
    table.append(("preference (default: the shipped head's features)", "grouped CV", *cv[default], shipped_corr,
                  speeds.get("preference")))

    print(f"\nagree: share of the {len(pairs)} human pairs where the scorer prefers the answer people preferred;"
          f" len-matched: on the {int(matched.sum())} length-matched pairs;\noriginal > corrupted: share of "
          f"{len(check_orig) // len(KINDS)} held-out Alpaca rows where the original answer outscores "
          f"another row's answer / its first half / its words shuffled")
    print(f"\n{'scorer':<58} {'how':<26} {'agree':>6} {'len-matched':>11} {'other/half/shuffled':>20} {'rows/s':>7}")
    for name, how, overall, lm, corr, speed in table:
        sp = f"{speed:7.2f}" if speed else ""
        cr = "/".join(f"{100 * corr[k]:.0f}" for k in KINDS) if corr else ""
        print(f"{name:<58} {how:<26} {100 * overall:5.1f}% {100 * lm:10.1f}% {cr:>20} {sp:>7}")
    print(f"{'reward-model (the paper)':<58} {'not measurable offline: no reward model ships with the package'}")
    if shipped is not None:
        print("\nshipped head weights (per standard deviation of each feature):")
        for f, w in sorted(zip(shipped.features, shipped.weights), key=lambda t: -abs(t[1])):
            print(f"  {f:<20} {w:+.3f}")
    if speeds:
        print(f"\nthroughput on {args.timing_rows} rows (alternating, best of 2): likelihood "
              f"{speeds['likelihood']:.2f} rows/s, preference {speeds['preference']:.2f} rows/s "
              f"-> cost x{speeds['likelihood'] / speeds['preference']:.2f} (budget x2)")
    overall, lm = cv[default]
    print(f"human_agreement={overall:.3f} length_matched_agreement={lm:.3f} length_only={length_all:.3f} "
          f"rows_per_s={speeds.get('preference', float('nan')):.2f}")
    return 0


# ----------------------------------------------------------------------------- corruptions


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


def corruption_benchmark(args: argparse.Namespace) -> int:
    if not ALPACA.is_dir():
        print(f"SKIP: {ALPACA} not found (the benchmark needs ../shared/data beside the project)")
        return 0

    import numpy as np
    import pandas as pd
    import torch

    from mods.scoring.config import ScorerConfig
    from mods.scoring.likelihood import LikelihoodScorer
    from mods.scoring.scorers import build_scorer

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
        kind=args.kind, model=args.model, batch_size=args.batch_size, max_length=args.max_length, device="cpu",
        precision=args.precision,
    )
    t0 = time.perf_counter()
    scorer = build_scorer(cfg)
    load_s = time.perf_counter() - t0
    print(f"{args.kind} scorer, model: {scorer.path}  (loaded in {load_s:.1f} s; torch threads: "
          f"{torch.get_num_threads()}; precision {scorer.dtype})")
    split = "tuning rows (alpaca chunk 0)" if args.tune else "evaluation rows (alpaca chunks 1-17)"
    print(f"{n} {split}, seed {args.seed}; each scored as original + {len(KINDS)} corruptions = {4 * n} rows")

    t0 = time.perf_counter()
    feats = scorer.features(all_ins, all_inp, all_out, progress=True)
    fast_s = time.perf_counter() - t0
    lm_scorer = scorer if isinstance(scorer, LikelihoodScorer) else scorer.lm
    fast_tokens = lm_scorer.last_tokens
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
        from mods.scoring.likelihood import END_FILL, END_FLOOR

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
    print(f"  {4 * n / fast_s:6.2f} rows/s, {fast_tokens / fast_s:7.0f} tokens/s ({4 * n} rows, {fast_tokens} tokens incl. any neutral passes, {fast_s:.1f} s)")

    if args.baseline_rows > 0 and isinstance(scorer, LikelihoodScorer):
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corruptions", action="store_true", help="run the corruption benchmark instead")
    ap.add_argument("--fit", action="store_true", help="refit the shipped head on all pairs (mods/scoring/quality_head.json)")
    ap.add_argument("--cv-seeds", type=int, default=5, help="fold splits averaged for each cross-validated figure")
    ap.add_argument("--timing-rows", type=int, default=48, help="rows timed for rows/s (0: skip timing)")
    ap.add_argument("--anchor-rows", type=int, default=60, help="Alpaca tuning rows whose corruptions join the fit")
    ap.add_argument("--anchor-weight", type=int, default=1, help="times each anchor pair counts in the fit")
    ap.add_argument("--check-rows", type=int, default=50, help="held-out Alpaca rows for original-vs-corrupted")
    ap.add_argument("--cache-dir", default=None, help="feature cache (default $MODS_CACHE/quality-benchmark)")
    ap.add_argument("--kind", default="likelihood", choices=["likelihood", "preference"], help="--corruptions: scorer")
    ap.add_argument("--rows", type=int, default=100, help="--corruptions: rows to evaluate (each scored 4 times)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--baseline-rows", type=int, default=8, help="--corruptions: rows for the naive-baseline timing")
    ap.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--save", type=Path, default=None, help="--corruptions: write per-row features and scores to this CSV")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 is steadier on shared cores")
    ap.add_argument("--tune", action="store_true", help="--corruptions: use the tuning rows, print per-feature accuracies")
    ap.add_argument("--model", default=None, help="--corruptions: model folder (default: SmolLM2-135M-Instruct)")
    args = ap.parse_args()
    return corruption_benchmark(args) if args.corruptions else human_benchmark(args)


if __name__ == "__main__":
    raise SystemExit(main())
