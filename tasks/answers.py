"""Prefect task for the `answers` stage (see mods.stages)."""

from tasks._stage import stage_task

answers_task = stage_task("answers")
