"""Prefect task for the `evaluate_prompts` stage (see mods.evaluation)."""

import mods.evaluation  # noqa: F401  (declares the evaluation stages)
from tasks._stage import stage_task

evaluate_prompts_task = stage_task("evaluate_prompts")
