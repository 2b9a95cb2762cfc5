"""Prefect task for the `necessity` stage (see mods.stages)."""

from tasks._stage import stage_task

necessity_task = stage_task("necessity")
