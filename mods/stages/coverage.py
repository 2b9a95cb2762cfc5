"""Coverage phase (MoDS step 2): the high-quality instructions are embedded (embed,
row-wise) and a seed set is picked by the coverage method, k-center greedy by default
(seed_select)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from pydantic import Field

from mods.config import BudgetFields, SeedSelectionConfig
from mods.core.artifacts import write_parquet
from mods.core.stage import (
    CPU,
    KEY_WHEN_SET,
    ONE_GPU,
    RowwiseStage,
    Stage,
    StageContext,
    read_table,
    register,
    text_cost,
)
from mods.coverage_methods import CoverageConfig
from mods.embedding import EmbeddingConfig
from mods.models import model_fingerprint
from mods.selection import pickable_rows, selection_frame

log = logging.getLogger("mods.stages")


@register
class Embed(RowwiseStage[EmbeddingConfig]):
    name, version, resources = "embed", "2", ONE_GPU
    description = "Embed the high-quality instructions."
    inputs = ("high_quality",)
    params = EmbeddingConfig
    outputs = ("embeddings.parquet",)

    def key_extra(self, params: EmbeddingConfig) -> list[str]:
        return [model_fingerprint(params.model)]

    def load(self, inputs: Mapping[str, Path], params: EmbeddingConfig) -> pd.DataFrame:
        from mods.embedding import embedding_texts

        rows = read_table(inputs["high_quality"], "rows.parquet")
        return pd.DataFrame({"id": rows["id"], "text": embedding_texts(rows, params.text, params.conversation)})

    def row_keys(self, rows: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
        return rows["id"].astype(str), text_cost(rows["text"])

    def block_rows(self, params: EmbeddingConfig) -> int:
        return params.batch_size

    def setup(self, params: EmbeddingConfig, folders: Mapping[str, Path]) -> Any:
        from mods.embedding import load_embedder

        return load_embedder(params)

    def process_batch(self, model: Any, block: pd.DataFrame, params: EmbeddingConfig) -> pd.DataFrame:
        from mods.embedding import encode_texts

        return pd.DataFrame({"embedding": list(encode_texts(model, block["text"].tolist(), params, progress=False))})

    def assemble(self, ctx: StageContext, params: EmbeddingConfig, rows: pd.DataFrame, results: pd.DataFrame) -> dict[str, Any]:
        import pyarrow.parquet as pq

        from mods.embedding import embeddings_table

        vectors = (np.stack([np.asarray(v, dtype=np.float32) for v in results["embedding"]])
                   if len(results) else np.zeros((0, 0), dtype=np.float32))
        pq.write_table(embeddings_table(rows["id"].tolist(), vectors), ctx.out / "embeddings.parquet")
        return {"rows": len(rows), "dim": int(vectors.shape[1])}


class CoverageFields(BudgetFields):
    """What a selection stage adds to its section of the configuration: the coverage method
    and, for a token budget, the base model whose tokenizer counts."""

    coverage: CoverageConfig = Field(CoverageConfig(), json_schema_extra=KEY_WHEN_SET)
    base_model: str | None = Field(None, json_schema_extra=KEY_WHEN_SET)

    def paper_setting(self) -> bool:
        """k-center on a row budget without caps: the paper's exact k-center path."""
        return (self.coverage.method == "k_center" and self.tokens is None and not self.source_caps
                and not self.source_shares)


class SeedSelectParams(SeedSelectionConfig, CoverageFields):
    pass


def candidate_rows(high_quality: Path, ids: list[str]) -> pd.DataFrame:
    """The high-quality rows of ``ids``, in that order (what budgets and methods read)."""
    rows = read_table(high_quality, "rows.parquet").drop_duplicates("id").set_index("id")
    return rows.loc[ids].reset_index()


@register
class SeedSelect(Stage[SeedSelectParams]):
    # Version 1 → inputs gained high_quality (sources, quality, tokens): the key changes once,
    # the default selection's bytes do not, so every later key stays (early cut-off).
    name, version, resources = "seed_select", "1", CPU
    description = "Seed set picked by the coverage method (k-center greedy by default)."
    inputs = ("embed", "high_quality")
    params = SeedSelectParams
    outputs = ("selected.parquet",)

    def run(self, ctx: StageContext, params: SeedSelectParams) -> dict[str, Any]:
        from mods.coverage_methods import budgeted_selection
        from mods.embedding import read_embeddings
        from mods.kcenter import k_center_greedy

        ids, vectors = read_embeddings(ctx.inputs["embed"] / "embeddings.parquet")
        if not params.paper_setting():
            frame, spent = budgeted_selection(params.coverage, vectors, candidate_rows(ctx.inputs["high_quality"], ids),
                                              params.k, params.tokens, params.source_caps, params.source_shares,
                                              params.base_model, seed=params.seed)
            write_parquet(frame, ctx.out / "selected.parquet")
            return {"candidates": len(ids), "k_requested": params.k, "k": len(frame), **spent,
                    "radius": float(frame["radius_after"].iloc[-1]) if len(frame) else None}
        k = min(params.k, pickable_rows(vectors, []))
        if k < params.k:
            log.warning("seed_selection.k=%d, but only %d distinct high-quality rows: the seed set is all of them, "
                        "and the necessity step has nothing left to add", params.k, k)
        result = k_center_greedy(vectors, k, seed=params.seed)
        write_parquet(selection_frame(ids, result), ctx.out / "selected.parquet")
        return {"candidates": len(ids), "k_requested": params.k, "k": k, "capped": k < params.k,
                "radius": float(result.radii[-1]) if k else None}
