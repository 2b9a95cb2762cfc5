"""Prefect task for the `evaluate_baseline` stage (see mods.evaluation)."""

import mods.evaluation  # noqa: F401  (declares the evaluation stages)
from tasks._stage import stage_task

evaluate_baseline_task = stage_task("evaluate_baseline")
