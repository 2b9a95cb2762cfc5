"""Instruction data in: readers of every shape, ingest (validation, quarantine, de-duplication,
decontamination), the canonical row schema, whole conversations, chat prompts."""
