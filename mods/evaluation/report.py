"""The outputs: ``evaluation.json``, a win/tie/lose chart like the paper's, ``report.md``
(with how far each judge can be trusted, and the caveats of a scorer judge), and what the
flow publishes of them as Prefect artifacts (``prefect_artifact_contents``: plain data, no
Prefect here)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mods.core.artifacts import atomic_write_text
from mods.core.files import EVALUATION_JSON, EVALUATION_PNG, REPORT_MD
from mods.evaluation.judges import winning_score
from mods.evaluation.statistics import sign_test_p, trusted
from mods.scoring.config import ScorerConfig


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
                "(`mods/scoring/quality_head.json`) was fitted on PandaLM's human-labelled pairs"
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
