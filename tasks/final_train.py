"""Prefect task for the `final_train` stage (see mods.stages)."""

from tasks._stage import stage_task

final_train_task = stage_task("final_train")
