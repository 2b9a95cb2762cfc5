"""Prefect task for the `augment_select` stage (see mods.stages)."""

from tasks._stage import stage_task

augment_select_task = stage_task("augment_select")
