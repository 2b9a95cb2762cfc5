"""Export: the selection in the shapes trainers read, with provenance, and the run report."""

from __future__ import annotations

from typing import Any

from mods.core.files import (
    COVERAGE_PNG,
    REPORT_JSON,
    REPORT_MD,
    SELECTED_JSONL,
    SELECTED_MESSAGES_JSONL,
    SELECTED_PARQUET,
    SELECTED_SHAREGPT_JSONL,
)
from mods.core.stage import CPU, Stage, StageContext, StageParams, register
from mods.report import build_report


class ExportParams(StageParams):
    pass


@register
class Export(Stage[ExportParams]):
    name, version, resources = "export", "5", CPU
    description = ("selected.jsonl (Alpaca format), selected_messages.jsonl (OpenAI messages), "
                   "selected_sharegpt.jsonl (ShareGPT), selected.parquet with provenance, the run report.")
    inputs = ("ingest", "sample", "quality", "high_quality", "embed", "seed_select", "seed_train", "answers",
              "necessity", "ifd", "augment_select", "final_train")
    params = ExportParams
    outputs = (SELECTED_JSONL, SELECTED_MESSAGES_JSONL, SELECTED_SHAREGPT_JSONL, SELECTED_PARQUET,
               REPORT_JSON, REPORT_MD, COVERAGE_PNG)

    def run(self, ctx: StageContext, params: ExportParams) -> dict[str, Any]:
        return build_report(ctx.out, ctx.inputs)
