"""Prefect task for the `embed` stage (see mods.stages)."""

from tasks._stage import stage_task

embed_task = stage_task("embed")
