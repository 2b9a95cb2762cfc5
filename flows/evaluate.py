"""Does the selection help? The ``mods-evaluate`` flow over a finished pipeline run.

Thin on purpose: the method is in ``mods.evaluation`` (baselines, answers, judges, report);
every step is a cached stage run by the pipeline's own ``StageRunner``, so a rerun with
nothing changed executes nothing, and GPU stages go to the GPU pool the same way.

    prompts ─┐
    baselines (random, quality_top, seed_only[, full]) ─→ answers per model ─→ judge per
    (judge, baseline) ─┐      agreement per judge (human votes) ─┴─→ evaluate (report)
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from mods.config import EvaluationConfig, ExecutionConfig
from mods.evaluation import (
    EVALUATION_JSON,
    EVALUATION_PNG,
    MODS,
    REPORT_MD,
    AgreementParams,
    AnswersParams,
    BaselineParams,
    JudgeParams,
    PromptsParams,
    ReportParams,
    latest_export,
    pipeline_inputs,
    run_settings,
)
from flows.mods_pipeline import GPU_DEPLOYMENT_ENV, StageRunner

# Larger images overflow the Prefect artifact page; the file is always in the artifact folder.
MAX_INLINE_PNG_BYTES = 150_000


def _absolute(path: str) -> str:
    # Workers may run in another folder: hand them absolute paths.
    return str(Path(path).expanduser().resolve())


def _publish(folder: Path) -> None:
    """The report, the table and the chart as Prefect artifacts of this flow run."""
    import json

    from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

    create_markdown_artifact((folder / REPORT_MD).read_text(), key="mods-evaluation-report",
                             description="Does the selection help? (report.md)")
    document = json.loads((folder / EVALUATION_JSON).read_text())
    create_table_artifact(document["comparisons"], key="mods-evaluation",
                          description="MoDS against each baseline: win/tie/lose per test set and judge")
    png = (folder / EVALUATION_PNG).read_bytes()
    if len(png) <= MAX_INLINE_PNG_BYTES:
        create_image_artifact("data:image/png;base64," + base64.b64encode(png).decode("ascii"),
                              key="mods-evaluation-chart", description="Win/tie/lose per test set (evaluation.png)")


@flow(name="mods-evaluate", log_prints=True)
def mods_evaluate(workspace: str = "work", config: EvaluationConfig = EvaluationConfig()) -> dict[str, Any]:  # noqa: B008 (the UI form)
    """Compare the model trained on a MoDS selection with baselines of the same size, on the paper's test sets."""
    logger = get_run_logger()
    root = Path(workspace).expanduser().resolve()
    export_key = latest_export(root, config.export_key)
    run_artifacts = pipeline_inputs(root, export_key)
    settings = run_settings(root, run_artifacts)
    runner = StageRunner(str(root), ExecutionConfig(progress=config.progress), os.environ.get(GPU_DEPLOYMENT_ENV))

    prompts = runner("evaluate_prompts", PromptsParams(
        test_sets_dir=_absolute(config.test_sets_dir), test_sets=list(config.test_sets),
        test_files=[_absolute(f) for f in config.test_files], prompts_per_set=config.prompts_per_set,
        reference_rows_per_set=config.reference_rows_per_set, seed=config.seed), {})

    models = {MODS: run_artifacts["final_train"]}
    for baseline in config.baselines:
        models[baseline] = runner("evaluate_baseline", BaselineParams(
            baseline=baseline, seed=config.seed, kcenter_seed=settings["kcenter_seed"],
            base_model=settings["base_model"], train=settings["train"]),
            {name: run_artifacts[name] for name in ("sample", "quality", "high_quality", "embed", "seed_select",
                                                    "augment_select")})

    answer_params = AnswersParams(generation=config.generation, reference_max_length=config.reference_max_length)
    answers = {name: runner("evaluate_answers", answer_params, {"prompts": prompts, "model": model})
               for name, model in models.items()}

    judges = {kind: JudgeParams(judge=kind, scorer=(config.scorer or settings["scorer"]) if kind == "scorer" else None,
                                llm=config.llm_judge if kind == "llm" else None,
                                tie_margin=config.tie_margin if kind == "scorer" else 0.0)
              for kind in config.judge}
    artifacts: dict[str, Any] = {"prompts": prompts, **{f"answers/{m}": a for m, a in answers.items()}}
    for kind, params in judges.items():
        artifacts[f"agreement/{kind}"] = runner("evaluate_agreement", AgreementParams(
            **params.model_dump(), preferences=_absolute(config.preferences), pairs=config.agreement_pairs,
            seed=config.seed), {})
        for baseline in config.baselines:
            artifacts[f"judge/{kind}/{baseline}"] = runner(
                "evaluate_judge", params, {"prompts": prompts, "answers_a": answers[MODS], "answers_b": answers[baseline]})

    pairs_note = ("all of them" if config.agreement_pairs is None
                  else f"a seeded draw of {config.agreement_pairs}; evaluation.agreement_pairs= (empty) uses all 742")
    meta = {"workspace": str(root), "export_key": export_key, "selection_size": settings["selection_size"],
            "training": f"{settings['base_model']}, {settings['train'].method}, {settings['train'].epochs:g} epochs",
            "prompts_per_set": config.prompts_per_set, "seed": config.seed, "agreement_pairs_note": pairs_note,
            "generation": f"greedy, up to {config.generation.max_new_tokens} new tokens"
            if config.generation.num_beams == 1 else f"{config.generation.num_beams} beams, up to "
            f"{config.generation.max_new_tokens} new tokens"}
    report = runner("evaluate", ReportParams(artifacts=artifacts, judges=list(config.judge),
                                             baselines=list(config.baselines), trust_threshold=config.trust_threshold,
                                             meta=meta), {})
    folder = root / "artifacts" / report["stage"] / report["key"]
    _publish(folder)
    result = {"evaluation_json": str(folder / EVALUATION_JSON), "chart": str(folder / EVALUATION_PNG),
              "report": str(folder / REPORT_MD), "export_key": export_key, "executed": list(runner.executed)}
    logger.info("MoDS evaluation written: %s", result)
    return result
