"""Judging: a judge (``mods.evaluation.judges``) compares two models' answers on every prompt, and is
measured against human votes (``mods.evaluation.preferences``) so every table says how far its judge
can be trusted. The judge's configuration is a stage's parameters (``JudgeParams`` in
mods/stages/evaluation.py): what its verdicts depend on (``judge_identity``), the loaded
judge (``build_judge``) and its name in the report (``judge_label``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from mods.core.artifacts import hash_json
from mods.evaluation.config import JudgeKind
from mods.evaluation.judges import (
    JUDGE_CRITERIA,
    JUDGE_SYSTEM,
    JUDGE_TEMPLATE,
    LLMJudge,
    LLMJudgeConfig,
    answer_length,
    judge_agreement,
    llm_judge_pairs,
    rule_outcomes,
    scorer_judge_pairs,
)
from mods.evaluation.preferences import human_pairs
from mods.evaluation.statistics import wilson_interval
from mods.models.loading import DEFAULT_BASE_MODEL, model_fingerprint
from mods.scoring.config import ScorerConfig
from mods.scoring.scorers import build_scorer, scorer_identity

if TYPE_CHECKING:
    from mods.evaluation.config import JudgeParams


def judge_pairs(judge: JudgeKind, prompts: pd.DataFrame, answers_a: pd.DataFrame, answers_b: pd.DataFrame,
                scorer: Any = None, llm: Any = None, tie_margin: float = 0.0, progress: bool = False) -> pd.DataFrame:
    """A's outcome against B on every prompt both answered: test_set, prompt_id, outcome and
    the judge's evidence (scores per order, or the two quality scores)."""
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
    frame = human_pairs(path)
    if pairs is not None and pairs < len(frame):
        frame = frame.sample(n=pairs, random_state=seed).sort_index()
    return frame.reset_index(drop=True)


def measure_judge(judge: JudgeKind, pairs: pd.DataFrame, scorer: Any = None, llm: Any = None,
                  tie_margin: float = 0.0, progress: bool = False) -> tuple[dict[str, Any], pd.DataFrame]:
    """A judge's agreement with people on human pairs (answer_a/answer_b, human 0 = a), overall
    and on the length-matched pairs, beside the "longer answer wins" rule on the same pairs."""
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


def judge_identity(params: JudgeParams) -> list[str]:
    """What a judge's verdicts depend on beyond its parameters: its model's files and the
    scorer's definition version, or the judging prompt."""
    if params.judge == "scorer":
        return scorer_identity(params.scorer or ScorerConfig())
    model = params.llm.model if params.llm else None
    return [model_fingerprint(model), "prompt:" + hash_json([JUDGE_SYSTEM, JUDGE_TEMPLATE, JUDGE_CRITERIA])]


def build_judge(params: JudgeParams) -> dict[str, Any]:
    """The loaded judge, as keyword arguments for ``judge_pairs`` / ``measure_judge``."""
    if params.judge == "scorer":
        if params.scorer is None:
            raise ValueError("the scorer judge needs a scorer configuration")
        return {"scorer": build_scorer(params.scorer), "tie_margin": params.tie_margin}

    return {"llm": LLMJudge(params.llm or LLMJudgeConfig())}


def judge_label(params: JudgeParams) -> str:
    if params.judge == "scorer":
        scorer = params.scorer or ScorerConfig()
        return f"{scorer.kind}: {scorer.model or DEFAULT_BASE_MODEL}"
    return (params.llm or LLMJudgeConfig()).model
