"""Prefect tasks of the evaluation flow: one per stage (see mods.evaluation).

``EVALUATE_TASKS`` joins ``tasks.STAGE_TASKS``, so the GPU-stage flow can run them too.
"""

import mods.evaluation  # noqa: F401  (declares the evaluation stages)
from tasks._stage import stage_task
from tasks.evaluate_agreement import evaluate_agreement_task
from tasks.evaluate_answers import evaluate_answers_task
from tasks.evaluate_baseline import evaluate_baseline_task
from tasks.evaluate_judge import evaluate_judge_task
from tasks.evaluate_prompts import evaluate_prompts_task

evaluate_task = stage_task("evaluate")

EVALUATE_TASKS = {
    "evaluate_prompts": evaluate_prompts_task,
    "evaluate_baseline": evaluate_baseline_task,
    "evaluate_answers": evaluate_answers_task,
    "evaluate_judge": evaluate_judge_task,
    "evaluate_agreement": evaluate_agreement_task,
    "evaluate": evaluate_task,
}
