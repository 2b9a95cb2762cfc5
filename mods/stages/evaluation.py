"""Evaluation stages (the ``mods-evaluate`` flow, flows/evaluate.py): does the selection help?

Over a finished pipeline run: the test prompts (evaluate_prompts), baselines of the
selection's size trained like the final model (evaluate_baseline), every model's answers
(evaluate_answers), a judge comparing MoDS with each baseline (evaluate_judge), each judge
measured against human votes (evaluate_agreement), and the report (evaluate). The method is
in mods/evaluation/; these classes wire it into the engine. No Prefect.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import Field

from mods.core.artifacts import Artifact, ArtifactError, artifact_problem, fingerprint_files, write_parquet
from mods.core.files import (
    AGREEMENT_JSON,
    ANSWERS_PARQUET,
    EMBEDDINGS_PARQUET,
    EVALUATION_JSON,
    EVALUATION_PNG,
    JUDGMENTS_PARQUET,
    MODEL_DIR,
    PAIRS_PARQUET,
    PROMPTS_PARQUET,
    REPORT_MD,
    ROWS_PARQUET,
    SCORES_PARQUET,
    SELECTED_PARQUET,
)
from mods.core.keys import KEY_WHEN_SET
from mods.core.stage import CPU, ONE_GPU, WHOLE_MACHINE, Stage, StageContext, StageParams, read_table, register
from mods.evaluation.answering import answer_prompts
from mods.evaluation.config import AgreementParams, Baseline, JudgeKind, JudgeParams
from mods.evaluation.head_fit import head_fitted_on, head_fitted_on_text
from mods.evaluation.judges import count_outcomes
from mods.evaluation.judging import (
    build_judge,
    human_pair_sample,
    judge_identity,
    judge_label,
    judge_pairs,
    measure_judge,
)
from mods.evaluation.report import evaluation_document, reference_table, scorer_caveats, write_outputs
from mods.evaluation.runs import MODS, baseline_rows, selection_ids
from mods.evaluation.statistics import comparison_rows
from mods.evaluation.testsets import find_test_sets, read_test_set, sample_prompts
from mods.generation.config import GenerationConfig
from mods.models.embedding import read_embeddings
from mods.models.loading import model_fingerprint
from mods.scoring.config import ScorerConfig
from mods.training.config import TrainConfig
from mods.training.train import train_model

# The run's artifacts a baseline is built from.
BASELINE_INPUTS = ("sample", "quality", "high_quality", "embed", "seed_select", "augment_select")

# The label of the pipeline's quality scorer's agreement among the report's artifacts.
SCORER_AGREEMENT = "scorer_agreement"


# --- parameters ------------------------------------------------------------------------------------


class PromptsParams(StageParams):
    test_sets_dir: str
    test_sets: list[str]
    test_files: list[str] = []
    prompts_per_set: int | None = None
    reference_rows_per_set: int | None = None
    seed: int = 0


class BaselineParams(StageParams):
    baseline: Baseline
    seed: int = 0
    kcenter_seed: int = Field(0, description="The run's seed-selection seed (seed_only starts where the run did).")
    tokens: int | None = Field(None, json_schema_extra=KEY_WHEN_SET,
                               description="longest: the selection's tokens, when the run was sized in tokens.")
    base_model: str
    train: TrainConfig = TrainConfig()


class ModelAnswersParams(StageParams):
    generation: GenerationConfig = GenerationConfig()
    reference_max_length: int = 512


class ReportParams(StageParams):
    artifacts: dict[str, Artifact] = Field(description="label -> artifact: prompts, answers/<model>, "
                                           "judge/<judge>/<baseline>, agreement/<judge>, and scorer_agreement "
                                           "(the pipeline's quality scorer against people)")
    judges: list[JudgeKind]
    baselines: list[str] = Field(description="What MoDS is compared with: baselines, and another run's label.")
    trust_threshold: float = 0.6
    judge_scorer: ScorerConfig | None = Field(None, description="The scorer judge's scorer (for the caveats).")
    pipeline_scorer: ScorerConfig | None = Field(None, description="The run's quality scorer (for the caveats).")
    meta: dict[str, Any] = Field({}, description="What the report states about the run; no workspace path (it "
                                 "is part of the key: a moved workspace must not rerun the report).")


# --- the stages --------------------------------------------------------------------------------------


def prompt_files(params: PromptsParams) -> list[tuple[str, Path, Path | None]]:
    return find_test_sets(params.test_sets_dir, params.test_sets, params.test_files)


@register
class EvaluatePrompts(Stage[PromptsParams]):
    name, version, resources = "evaluate_prompts", "1", CPU
    description = "Read the test sets; seeded draw of the prompts to answer."
    params = PromptsParams
    outputs = (PROMPTS_PARQUET,)

    def key_extra(self, params: PromptsParams) -> list[str]:
        files = [p for _, path, ref in prompt_files(params) for p in (path, ref) if p is not None]
        # Test files are small: key them by their bytes.
        return ["testsets:" + fingerprint_files(files, hash_content=True)]

    def run(self, ctx: StageContext, params: PromptsParams) -> dict[str, Any]:
        parts, skipped, available = [], {}, {}
        for name, path, references in prompt_files(params):
            read = read_test_set(path, name, references)
            parts.append(read.rows)
            available[name] = len(read.rows)
            if read.skipped:
                skipped[name] = read.skipped
        prompts = sample_prompts(pd.concat(parts, ignore_index=True), params.prompts_per_set,
                                 params.reference_rows_per_set, params.seed)
        write_parquet(prompts, ctx.out / PROMPTS_PARQUET)
        return {"available": available, "answered": prompts.groupby("test_set", sort=False)["answer"].sum().to_dict(),
                "with_reference": prompts.groupby("test_set", sort=False)["reference_loglik"].sum().to_dict(),
                "skipped_records": skipped}


@register
class EvaluateBaseline(Stage[BaselineParams]):
    name, version, resources = "evaluate_baseline", "1", WHOLE_MACHINE
    description = ("A baseline of the selection's size (random, quality_top, seed_only, longest, full), "
                   "trained like the final model.")
    inputs = BASELINE_INPUTS
    params = BaselineParams
    outputs = (SELECTED_PARQUET, MODEL_DIR)

    def key_extra(self, params: BaselineParams) -> list[str]:
        return [model_fingerprint(params.base_model)]

    def run(self, ctx: StageContext, params: BaselineParams) -> dict[str, Any]:
        selection = selection_ids(read_table(ctx.inputs["seed_select"], SELECTED_PARQUET),
                                  read_table(ctx.inputs["augment_select"], SELECTED_PARQUET))
        embeddings = read_embeddings(ctx.inputs["embed"] / EMBEDDINGS_PARQUET) if params.baseline == "seed_only" else None
        rows = baseline_rows(params.baseline, len(selection), read_table(ctx.inputs["sample"], ROWS_PARQUET),
                             read_table(ctx.inputs["quality"], SCORES_PARQUET),
                             read_table(ctx.inputs["high_quality"], ROWS_PARQUET), embeddings, params.seed,
                             params.kcenter_seed, params.tokens, params.base_model)
        write_parquet(rows, ctx.out / SELECTED_PARQUET)
        summary = train_model(params.base_model, rows, params.train, ctx.out / MODEL_DIR, progress=ctx.progress,
                              checkpoint_dir=ctx.scratch / "checkpoints")
        overlap = len(set(rows["id"].astype(str)) & set(selection))
        return {"baseline": params.baseline, "rows": len(rows), "selection_size": len(selection),
                "overlap_with_selection": overlap, "training": summary}


@register
class EvaluateAnswers(Stage[ModelAnswersParams]):
    name, version, resources = "evaluate_answers", "1", ONE_GPU
    description = "One model answers every test prompt; reference log-likelihoods."
    inputs = ("prompts", "model")
    params = ModelAnswersParams
    outputs = (ANSWERS_PARQUET,)

    def run(self, ctx: StageContext, params: ModelAnswersParams) -> dict[str, Any]:
        prompts = read_table(ctx.inputs["prompts"], PROMPTS_PARQUET)
        frame = answer_prompts(ctx.inputs["model"] / MODEL_DIR, prompts, params.generation, params.reference_max_length,
                               progress=ctx.progress)
        write_parquet(frame, ctx.out / ANSWERS_PARQUET)
        answered = frame["answer"].notna()
        return {"answers": int(answered.sum()),
                "empty_answers": int((frame.loc[answered, "answer"].str.len() == 0).sum()),
                "reference_rows": int(frame["reference_loglik"].notna().sum())}


@register
class EvaluateJudge(Stage[JudgeParams]):
    name, version, resources = "evaluate_judge", "1", ONE_GPU
    description = "A judge compares two models' answers on every prompt."
    inputs = ("prompts", "answers_a", "answers_b")
    params = JudgeParams
    outputs = (JUDGMENTS_PARQUET,)

    def key_extra(self, params: JudgeParams) -> list[str]:
        return judge_identity(params)

    def run(self, ctx: StageContext, params: JudgeParams) -> dict[str, Any]:
        prompts = read_table(ctx.inputs["prompts"], PROMPTS_PARQUET)
        judged = judge_pairs(params.judge, prompts, read_table(ctx.inputs["answers_a"], ANSWERS_PARQUET),
                             read_table(ctx.inputs["answers_b"], ANSWERS_PARQUET), progress=ctx.progress,
                             **build_judge(params))
        write_parquet(judged, ctx.out / JUDGMENTS_PARQUET)
        return {"judge": params.judge, "pairs": len(judged), **count_outcomes(judged["outcome"].tolist())}


@register
class EvaluateAgreement(Stage[AgreementParams]):
    name, version, resources = "evaluate_agreement", "2", ONE_GPU
    description = "A judge measured against human votes (PandaLM pairs)."
    params = AgreementParams
    outputs = (PAIRS_PARQUET, AGREEMENT_JSON)

    def key_extra(self, params: AgreementParams) -> list[str]:
        preferences = fingerprint_files([Path(params.preferences)], hash_content=True)
        return [*judge_identity(params), "preferences:" + preferences]

    def run(self, ctx: StageContext, params: AgreementParams) -> dict[str, Any]:
        pairs = human_pair_sample(params.preferences, params.pairs, params.seed)
        result, detail = measure_judge(params.judge, pairs, progress=ctx.progress, **build_judge(params))
        result = {"judge": params.judge, "model": judge_label(params),
                  "of_pairs": len(human_pair_sample(params.preferences, None, 0)), **result}
        fit = head_fitted_on(params)  # the same decision as fitted_on_these_pairs, computed once
        if fit is not None and fit["differences"]:
            result["head_fit_differs"] = fit["differences"]
            result["head_note"] = (f"the scorer's head was fitted on these pairs ({fit['fitted_on']}), but with "
                                   f"another scorer ({', '.join(fit['differences'])} differ), so the head's "
                                   f"cross-validated {fit['human_agreement']:.1%} does not apply and the measured "
                                   "figure is used; it may be optimistic, since the head has seen these pairs")
        elif fit is not None:
            result["in_sample"] = True
            result["held_out_agreement"] = fit["human_agreement"]
            result["held_out_note"] = (f"the scorer's head was fitted on these pairs ({fit['fitted_on']}) with this "
                                       f"very scorer configuration; cross-validated "
                                       f"({fit.get('folds', 'grouped folds')}): {fit['human_agreement']:.1%} "
                                       f"agreement, {fit.get('length_matched_agreement', float('nan')):.1%} "
                                       "on length-matched pairs")
        write_parquet(detail, ctx.out / PAIRS_PARQUET)
        (ctx.out / AGREEMENT_JSON).write_text(json.dumps(result, indent=2) + "\n")
        return result


@register
class EvaluateReport(Stage[ReportParams]):
    name, version, resources = "evaluate", "3", CPU
    description = "evaluation.json, the win/tie/lose chart and report.md."
    params = ReportParams
    outputs = (EVALUATION_JSON, EVALUATION_PNG, REPORT_MD)

    def run(self, ctx: StageContext, params: ReportParams) -> dict[str, Any]:
        folders = {}
        for label, artifact in params.artifacts.items():
            problem = artifact_problem(artifact.dir(ctx.workspace))
            if problem is not None:
                raise ArtifactError(f"the evaluation report needs {label} ({artifact.stage} {artifact.key}): {problem}")
            folders[label] = artifact.dir(ctx.workspace)
        prompts = read_table(folders["prompts"], PROMPTS_PARQUET)
        models = [MODS, *params.baselines]
        answers = {m: read_table(folders[f"answers/{m}"], ANSWERS_PARQUET) for m in models}
        test_sets = list(dict.fromkeys(prompts.loc[prompts["answer"], "test_set"]))
        comparisons = []
        for judge in params.judges:
            for baseline in params.baselines:
                judged = read_table(folders[f"judge/{judge}/{baseline}"], JUDGMENTS_PARQUET)
                comparisons += comparison_rows(judge, MODS, baseline, judged, test_sets)
        agreement = {j: json.loads((folders[f"agreement/{j}"] / AGREEMENT_JSON).read_text()) for j in params.judges}
        scorer_agreement = None
        if SCORER_AGREEMENT in folders:
            scorer_agreement = json.loads((folders[SCORER_AGREEMENT] / AGREEMENT_JSON).read_text())
            scorer_agreement["same_as_scorer_judge"] = ("scorer" in params.judges
                                                        and params.artifacts[SCORER_AGREEMENT]
                                                        == params.artifacts["agreement/scorer"])
        caveats = scorer_caveats(params.judges, params.judge_scorer, params.pipeline_scorer, test_sets,
                                 head_fitted_on_text())
        document = evaluation_document(params.judges, comparisons, reference_table(answers, prompts), agreement,
                                       params.trust_threshold, params.meta, scorer_agreement, caveats)
        write_outputs(ctx.out, document)
        return {"comparisons": len(comparisons),
                "trusted_judges": [j for j in params.judges if document["judge_agreement"][j]["trusted"]],
                "scorer_trusted": None if scorer_agreement is None else document["scorer_agreement"]["trusted"]}
