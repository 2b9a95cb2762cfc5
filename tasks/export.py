"""Prefect task for the `export` stage (see mods.stages)."""

from tasks._stage import stage_task

export_task = stage_task("export")
