"""Coverage phase (MoDS step 2): the high-quality instructions are embedded (embed,
row-wise) and a seed set is picked by k-center greedy (seed_select)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from mods.config import SeedSelectionConfig
from mods.core.artifacts import write_parquet
from mods.core.stage import CPU, ONE_GPU, RowwiseStage, Stage, StageContext, read_table, register, text_cost
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
        return pd.DataFrame({"id": rows["id"], "text": embedding_texts(rows, params.text)})

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


@register
class SeedSelect(Stage[SeedSelectionConfig]):
    name, version, resources = "seed_select", "1", CPU
    description = "k-center greedy seed set (coverage)."
    inputs = ("embed",)
    params = SeedSelectionConfig
    outputs = ("selected.parquet",)

    def run(self, ctx: StageContext, params: SeedSelectionConfig) -> dict[str, Any]:
        from mods.embedding import read_embeddings
        from mods.kcenter import k_center_greedy

        ids, vectors = read_embeddings(ctx.inputs["embed"] / "embeddings.parquet")
        k = min(params.k, pickable_rows(vectors, []))
        if k < params.k:
            log.warning("seed_selection.k=%d, but only %d distinct high-quality rows: the seed set is all of them, "
                        "and the necessity step has nothing left to add", params.k, k)
        result = k_center_greedy(vectors, k, seed=params.seed)
        write_parquet(selection_frame(ids, result), ctx.out / "selected.parquet")
        return {"candidates": len(ids), "k_requested": params.k, "k": k, "capped": k < params.k,
                "radius": float(result.radii[-1]) if k else None}
