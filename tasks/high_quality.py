"""Prefect task for the `high_quality` stage (see mods.stages)."""

from tasks._stage import stage_task

high_quality_task = stage_task("high_quality")
