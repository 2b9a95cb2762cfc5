"""Prefect task for the `sample` stage (see mods.stages)."""

from tasks._stage import stage_task

sample_task = stage_task("sample")
