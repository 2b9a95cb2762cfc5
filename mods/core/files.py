"""The names of the files in artifact folders: one constant per file, declared by the stage
that writes it (its ``outputs``, which the engine checks after the stage ran) and imported by
every reader, so that a renamed file is one edit and a misspelt one an import error.

A name ending in "/" is a folder.
"""

from __future__ import annotations

# ingest, sample, high_quality
ROWS_PARQUET = "rows.parquet"
QUARANTINE_PARQUET = "quarantine.parquet"
INGEST_REPORT_JSON = "ingest_report.json"
# quality
SCORES_PARQUET = "scores.parquet"
# embed
EMBEDDINGS_PARQUET = "embeddings.parquet"
# seed_select, augment_select, export, and an evaluation baseline's rows
SELECTED_PARQUET = "selected.parquet"
# seed_train, final_train, an evaluation baseline's model
MODEL_DIR = "model/"
# answers, necessity, ifd (and an evaluated model's answers)
ANSWERS_PARQUET = "answers.parquet"
NECESSITY_PARQUET = "necessity.parquet"
IFD_PARQUET = "ifd.parquet"
# export
SELECTED_JSONL = "selected.jsonl"
SELECTED_MESSAGES_JSONL = "selected_messages.jsonl"
SELECTED_SHAREGPT_JSONL = "selected_sharegpt.jsonl"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
COVERAGE_PNG = "coverage.png"
# the evaluation's stages
PROMPTS_PARQUET = "prompts.parquet"
JUDGMENTS_PARQUET = "judgments.parquet"
PAIRS_PARQUET = "pairs.parquet"
AGREEMENT_JSON = "agreement.json"
EVALUATION_JSON = "evaluation.json"
EVALUATION_PNG = "evaluation.png"
