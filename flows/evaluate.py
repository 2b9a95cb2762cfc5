"""Does the selection help? The ``mods-evaluate`` flow over a finished pipeline run.

Thin on purpose: the method is in mods/evaluation/ (baselines, answers, judges, report);
every step is a stage (mods/stages/evaluation.py) run by the pipeline's executor
(flows/executors.py), so a rerun with nothing changed executes nothing, and GPU stages go
to the GPU pool the same way.

    prompts ─┐
    baselines (random, quality_top, seed_only[, full]) ─→ answers per model ─→ judge per
    (judge, baseline) ─┐      agreement per judge and of the pipeline's scorer (human votes)
                       └──────────────────────────┴─→ evaluate (report)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from mods.config import EvaluationConfig, ExecutionConfig
from mods.evaluation.report import EVALUATION_JSON, EVALUATION_PNG, REPORT_MD, prefect_artifact_contents
from mods.evaluation.runs import MODS, compared_run_label, latest_export, pipeline_inputs, run_settings
from mods.scoring import ScorerConfig
from mods.stages.evaluation import (
    SCORER_AGREEMENT,
    AgreementParams,
    AnswersParams,
    BaselineParams,
    JudgeParams,
    PromptsParams,
    ReportParams,
)
from flows.executors import Executor, GpuRouting


def _absolute(path: str) -> str:
    # Workers may run in another folder: hand them absolute paths.
    return str(Path(path).expanduser().resolve())


def _publish(folder: Path) -> None:
    """The table, the full report and the chart as Prefect artifacts of this flow run
    (contents from ``mods.evaluation.report.prefect_artifact_contents``)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    contents = prefect_artifact_contents(folder)
    create_table_artifact(contents["table"], key="mods-evaluation",
                          description="MoDS against each baseline: win/tie/lose per test set and judge")
    create_markdown_artifact(contents["report"], key="mods-evaluation-report",
                             description="Does the selection help? (report.md: judges' agreement with people, "
                             "tables, reference log-likelihoods)")
    create_markdown_artifact(contents["chart"], key="mods-evaluation-chart",
                             description="Win/tie/lose per test set (evaluation.png)")


def report_meta(export_key: str, settings: dict[str, Any], config: EvaluationConfig) -> dict[str, Any]:
    """What the report states about the run. Part of the report stage's key, so it holds no
    workspace path: a moved or copied workspace reuses the report (the command prints where it is)."""
    generation = config.generation
    return {"export_key": export_key, "selection_size": settings["selection_size"],
            "training": f"{settings['base_model']}, {settings['train'].method}, {settings['train'].epochs:g} epochs",
            "prompts_per_set": config.prompts_per_set, "seed": config.seed,
            "agreement_pairs": config.agreement_pairs,
            "generation": f"greedy, up to {generation.max_new_tokens} new tokens" if generation.num_beams == 1
            else f"{generation.num_beams} beams, up to {generation.max_new_tokens} new tokens"}


def agreement_params(kind: str, scorer: ScorerConfig | None, config: EvaluationConfig) -> AgreementParams:
    """A judge (or the pipeline's scorer, as a scorer judge) measured against the human votes."""
    return AgreementParams(judge=kind, scorer=scorer if kind == "scorer" else None,
                           llm=config.llm_judge if kind == "llm" else None,
                           tie_margin=config.tie_margin if kind == "scorer" else 0.0,
                           preferences=_absolute(config.preferences), pairs=config.agreement_pairs, seed=config.seed)


@flow(name="mods-evaluate", log_prints=True)
def mods_evaluate(workspace: str = "work", config: EvaluationConfig = EvaluationConfig()) -> dict[str, Any]:  # noqa: B008 (the UI form)
    """Compare the model trained on a MoDS selection with baselines of the same size, on the paper's test sets."""
    logger = get_run_logger()
    root = Path(workspace).expanduser().resolve()
    export_key = latest_export(root, config.export_key)
    run_artifacts = pipeline_inputs(root, export_key)
    settings = run_settings(root, run_artifacts)
    executor = Executor(root, ExecutionConfig(progress=config.progress), GpuRouting.from_env())
    runner = executor.submit

    prompts = runner("evaluate_prompts", PromptsParams(
        test_sets_dir=_absolute(config.test_sets_dir), test_sets=list(config.test_sets),
        test_files=[_absolute(f) for f in config.test_files], prompts_per_set=config.prompts_per_set,
        reference_rows_per_set=config.reference_rows_per_set, seed=config.seed), {})

    models = {MODS: run_artifacts["final_train"]}
    for baseline in config.baselines:
        models[baseline] = runner("evaluate_baseline", BaselineParams(
            baseline=baseline, seed=config.seed, kcenter_seed=settings["kcenter_seed"],
            tokens=settings["selection_tokens"] if baseline == "longest" else None,
            base_model=settings["base_model"], train=settings["train"]),
            {name: run_artifacts[name] for name in ("sample", "quality", "high_quality", "embed", "seed_select",
                                                    "augment_select")})
    if config.compare_with:  # another selection configuration of this workspace, judged like a baseline
        other_key = latest_export(root, config.compare_with)
        models[compared_run_label(other_key)] = pipeline_inputs(root, other_key)["final_train"]
    opponents = [name for name in models if name != MODS]

    answer_params = AnswersParams(generation=config.generation, reference_max_length=config.reference_max_length)
    answers = {name: runner("evaluate_answers", answer_params, {"prompts": prompts, "model": model})
               for name, model in models.items()}

    pipeline_scorer: ScorerConfig = settings["scorer"]
    judge_scorer = config.scorer or pipeline_scorer
    judges = {kind: JudgeParams(judge=kind, scorer=judge_scorer if kind == "scorer" else None,
                                llm=config.llm_judge if kind == "llm" else None,
                                tie_margin=config.tie_margin if kind == "scorer" else 0.0)
              for kind in config.judge}
    artifacts: dict[str, Any] = {"prompts": prompts, **{f"answers/{m}": a for m, a in answers.items()}}
    measured: dict[str, Any] = {}  # one agreement stage per judge identity (params as JSON)
    for kind, params in judges.items():
        agreement = agreement_params(kind, params.scorer, config)
        artifacts[f"agreement/{kind}"] = measured[agreement.model_dump_json()] = runner(
            "evaluate_agreement", agreement, {})
        for baseline in opponents:
            artifacts[f"judge/{kind}/{baseline}"] = runner(
                "evaluate_judge", params, {"prompts": prompts, "answers_a": answers[MODS], "answers_b": answers[baseline]})
    # The pipeline's own quality scorer against people, whatever the judges: reused when the
    # scorer judge is that scorer (the default), else one more cached stage.
    scorer_agreement = agreement_params("scorer", pipeline_scorer, config)
    artifacts[SCORER_AGREEMENT] = measured.get(scorer_agreement.model_dump_json()) or runner(
        "evaluate_agreement", scorer_agreement, {})

    report = runner("evaluate", ReportParams(artifacts=artifacts, judges=list(config.judge),
                                             baselines=opponents, trust_threshold=config.trust_threshold,
                                             judge_scorer=judge_scorer if "scorer" in config.judge else None,
                                             pipeline_scorer=pipeline_scorer,
                                             meta=report_meta(export_key, settings, config)), {})
    folder = report.dir(root)
    _publish(folder)
    result = {"evaluation_json": str(folder / EVALUATION_JSON), "chart": str(folder / EVALUATION_PNG),
              "report": str(folder / REPORT_MD), "workspace": str(root), "export_key": export_key,
              "executed": list(executor.executed)}
    logger.info("MoDS evaluation written: %s", result)
    return result
