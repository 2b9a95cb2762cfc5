"""Prefect task for the `evaluate_judge` stage (see mods.evaluation)."""

import mods.evaluation  # noqa: F401  (declares the evaluation stages)
from tasks._stage import stage_task

evaluate_judge_task = stage_task("evaluate_judge")
