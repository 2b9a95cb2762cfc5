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

from flows.executors import Executor, GpuRouting
from mods.config import EvaluationConfig, ExecutionConfig
from mods.core.files import EVALUATION_JSON, EVALUATION_PNG, REPORT_MD
from mods.evaluation.report import prefect_artifact_contents
from mods.evaluation.runs import MODS, compared_run_label, latest_export, pipeline_inputs, run_settings
from mods.pipeline import evaluation_params, evaluation_report_params
from mods.stages.evaluation import SCORER_AGREEMENT


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

    params = evaluation_params(config, settings)
    prompts = runner("evaluate_prompts", params.prompts, {})

    models = {MODS: run_artifacts["final_train"]}
    for baseline, baseline_params in params.baselines.items():
        models[baseline] = runner("evaluate_baseline", baseline_params,
                                  {name: run_artifacts[name] for name in ("sample", "quality", "high_quality", "embed",
                                                                          "seed_select", "augment_select")})
    if config.compare_with:  # another selection configuration of this workspace, judged like a baseline
        other_key = latest_export(root, config.compare_with)
        models[compared_run_label(other_key)] = pipeline_inputs(root, other_key)["final_train"]
    opponents = [name for name in models if name != MODS]

    answers = {name: runner("evaluate_answers", params.answers, {"prompts": prompts, "model": model})
               for name, model in models.items()}

    artifacts: dict[str, Any] = {"prompts": prompts, **{f"answers/{m}": a for m, a in answers.items()}}
    measured: dict[str, Any] = {}  # one agreement stage per judge identity (params as JSON)
    for kind, judge in params.judges.items():
        agreement = params.agreements[kind]
        artifacts[f"agreement/{kind}"] = measured[agreement.model_dump_json()] = runner(
            "evaluate_agreement", agreement, {})
        for baseline in opponents:
            artifacts[f"judge/{kind}/{baseline}"] = runner(
                "evaluate_judge", judge, {"prompts": prompts, "answers_a": answers[MODS], "answers_b": answers[baseline]})
    # The pipeline's own quality scorer against people, whatever the judges: reused when the
    # scorer judge is that scorer (the default), else one more cached stage.
    artifacts[SCORER_AGREEMENT] = measured.get(params.scorer_agreement.model_dump_json()) or runner(
        "evaluate_agreement", params.scorer_agreement, {})

    report = runner("evaluate", evaluation_report_params(config, settings, export_key, artifacts, opponents), {})
    folder = report.dir(root)
    _publish(folder)
    result = {"evaluation_json": str(folder / EVALUATION_JSON), "chart": str(folder / EVALUATION_PNG),
              "report": str(folder / REPORT_MD), "workspace": str(root), "export_key": export_key,
              "executed": list(executor.executed)}
    logger.info("MoDS evaluation written: %s", result)
    return result
