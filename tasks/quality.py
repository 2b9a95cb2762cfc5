"""Prefect task for the `quality` stage (see mods.stages)."""

from tasks._stage import stage_task

quality_task = stage_task("quality")
