"""Prefect task for the `seed_train` stage (see mods.stages)."""

from tasks._stage import stage_task

seed_train_task = stage_task("seed_train")
