"""Prefect task for the `seed_select` stage (see mods.stages)."""

from tasks._stage import stage_task

seed_select_task = stage_task("seed_select")
