"""Export: the selection in the shapes trainers read, with provenance, and the run report."""

from __future__ import annotations

from typing import Any

from mods.core.stage import CPU, Stage, StageContext, StageParams, register


class ExportParams(StageParams):
    pass


@register
class Export(Stage[ExportParams]):
    # Version 4: the report shows score distributions, cut-offs and the selection's composition.
    # Version 5: the selection also as OpenAI messages and ShareGPT JSON lines (conversations whole).
    name, version, resources = "export", "5", CPU
    description = ("selected.jsonl (Alpaca format), selected_messages.jsonl (OpenAI messages), "
                   "selected_sharegpt.jsonl (ShareGPT), selected.parquet with provenance, the run report.")
    inputs = ("ingest", "sample", "quality", "high_quality", "embed", "seed_select", "seed_train", "answers",
              "necessity", "ifd", "augment_select", "final_train")
    params = ExportParams
    outputs = ("selected.jsonl", "selected_messages.jsonl", "selected_sharegpt.jsonl", "selected.parquet",
               "report.json", "report.md", "coverage.png")

    def run(self, ctx: StageContext, params: ExportParams) -> dict[str, Any]:
        from mods.report import build_report

        return build_report(ctx.out, ctx.inputs)
