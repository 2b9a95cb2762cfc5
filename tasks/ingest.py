"""Prefect task for the `ingest` stage (see mods.stages)."""

from tasks._stage import stage_task

ingest_task = stage_task("ingest")
