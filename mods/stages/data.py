"""Data phase: every source file into canonical rows (ingest), then an optional seeded
subsample (sample)."""

from __future__ import annotations

from typing import Any

import pandas as pd
from pydantic import Field

from mods.config import SampleConfig
from mods.core.artifacts import fingerprint_files, write_parquet
from mods.core.files import INGEST_REPORT_JSON, QUARANTINE_PARQUET, ROWS_PARQUET
from mods.core.stage import CPU, Stage, StageContext, StageParams, read_table, register
from mods.data.conversations import conversation_chars
from mods.data.ingest import IngestConfig, ingest, write_ingest
from mods.data.readers import hub_ids, source_files


class IngestParams(StageParams):
    sources: list[str] = Field(description="Files, folders, globs or hub ids to read.")
    ingest: IngestConfig = IngestConfig()
    hash_content: bool = Field(False, description="Key the sources by their bytes instead of size and mtime.")


@register
class Ingest(Stage[IngestParams]):
    name, version, resources = "ingest", "1", CPU
    description = "Read every source file into canonical rows; quarantine the rest."
    params = IngestParams
    outputs = (ROWS_PARQUET, QUARANTINE_PARQUET, INGEST_REPORT_JSON)

    def key_extra(self, params: IngestParams) -> list[str]:
        # The sources' files (size and mtime, or bytes), the decontamination sets', hub ids.
        decontam = params.ingest.decontaminate_against or []
        decontam_files = source_files(decontam) if decontam else []
        return ["sources:" + fingerprint_files(source_files(params.sources), params.hash_content),
                "eval:" + fingerprint_files(decontam_files), "hub:" + ",".join(hub_ids(params.sources))]

    def run(self, ctx: StageContext, params: IngestParams) -> dict[str, Any]:
        result = ingest(params.sources, params.ingest, progress=ctx.progress)
        write_ingest(result, ctx.out)
        totals = {k: result.report.get(k) for k in ("read", "kept", "duplicates", "quarantined", "decontaminated")}
        return {"rows": len(result.rows), **totals}


@register
class Sample(Stage[SampleConfig]):
    name, version, resources = "sample", "1", CPU
    description = "Seeded subsample of the pool (optional)."
    inputs = ("ingest",)
    params = SampleConfig
    outputs = (ROWS_PARQUET,)

    def run(self, ctx: StageContext, params: SampleConfig) -> dict[str, Any]:
        rows = read_table(ctx.inputs["ingest"], ROWS_PARQUET)
        eligible = rows
        if params.max_chars:  # what a row trains on: a conversation row's every turn

            size = pd.Series([conversation_chars(row) for row in rows.to_dict("records")], index=rows.index)
            eligible = rows[size <= params.max_chars]
        sampled = eligible
        if params.rows and params.rows < len(eligible):
            sampled = eligible.sample(n=params.rows, random_state=params.seed).sort_index()
        if sampled.empty:
            raise ValueError(f"sample: no row fits sample.max_chars={params.max_chars} (of {len(rows)} ingested rows)")
        write_parquet(sampled.reset_index(drop=True), ctx.out / ROWS_PARQUET)
        return {"pool": len(rows), "eligible": len(eligible), "rows": len(sampled)}
