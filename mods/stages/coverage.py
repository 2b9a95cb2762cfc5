"""Coverage phase (MoDS step 2): the high-quality instructions are embedded (embed,
row-wise) and a seed set is picked by the coverage method, k-center greedy by default
(seed_select)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
from pydantic import Field

from mods.config import BudgetFields, SeedSelectionConfig
from mods.core.artifacts import write_parquet
from mods.core.files import EMBEDDINGS_PARQUET, ROWS_PARQUET, SELECTED_PARQUET
from mods.core.keys import KEY_WHEN_SET
from mods.core.stage import CPU, ONE_GPU, RowwiseStage, Stage, StageContext, read_table, register, text_cost
from mods.models.embedding import (
    EmbeddingConfig,
    embedding_texts,
    embeddings_table,
    encode_texts,
    load_embedder,
    read_embeddings,
)
from mods.models.loading import model_fingerprint
from mods.selection.coverage_methods import CoverageConfig, budgeted_selection
from mods.selection.kcenter import k_center_greedy
from mods.selection.thresholds import empty_selection, pickable_rows, selection_frame

log = logging.getLogger("mods.stages")


@register
class Embed(RowwiseStage[EmbeddingConfig]):
    name, version, resources = "embed", "2", ONE_GPU
    description = "Embed the high-quality instructions."
    inputs = ("high_quality",)
    params = EmbeddingConfig
    outputs = (EMBEDDINGS_PARQUET,)

    def key_extra(self, params: EmbeddingConfig) -> list[str]:
        return [model_fingerprint(params.model)]

    def load(self, inputs: Mapping[str, Path], params: EmbeddingConfig) -> pd.DataFrame:
        rows = read_table(inputs["high_quality"], ROWS_PARQUET)
        return pd.DataFrame({"id": rows["id"], "text": embedding_texts(rows, params.text, params.conversation)})

    def row_keys(self, rows: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
        return rows["id"].astype(str), text_cost(rows["text"])

    def block_rows(self, params: EmbeddingConfig) -> int:
        return params.batch_size

    def setup(self, params: EmbeddingConfig, folders: Mapping[str, Path]) -> Any:
        return load_embedder(params)

    def process_batch(self, model: Any, block: pd.DataFrame, params: EmbeddingConfig) -> pd.DataFrame:
        return pd.DataFrame({"embedding": list(encode_texts(model, block["text"].tolist(), params, progress=False))})

    def assemble(self, ctx: StageContext, params: EmbeddingConfig, rows: pd.DataFrame, results: pd.DataFrame) -> dict[str, Any]:
        import pyarrow.parquet as pq

        vectors = (np.stack([np.asarray(v, dtype=np.float32) for v in results["embedding"]])
                   if len(results) else np.zeros((0, 0), dtype=np.float32))
        pq.write_table(embeddings_table(rows["id"].tolist(), vectors), ctx.out / EMBEDDINGS_PARQUET)
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
    rows = read_table(high_quality, ROWS_PARQUET).drop_duplicates("id").set_index("id")
    return rows.loc[ids].reset_index()


@dataclass
class Picked:
    """What a selection stage picked: the table it writes, and what its summary reports."""

    frame: pd.DataFrame
    k: int
    spent: dict[str, Any] | None  # a budgeted coverage method's accounting; None on the paper's path
    capped: bool  # fewer distinct rows than k (the paper's path)
    radius: float | None  # the coverage radius after the last pick


def pick_set(params: CoverageFields, vectors: np.ndarray, candidate_ids: list[str],
             rows_of: Callable[[list[str]], pd.DataFrame], already: Sequence[int] = (),
             device: str | None = None) -> Picked:
    """The one selection path of seed_select, augment_select and ``mods select``, among the
    rows of ``vectors`` (``candidate_ids``, in that order; ``already``: indices of centers
    chosen before). ``rows_of(ids)`` gives those rows (training columns, source,
    quality_score), read only where a budget or method needs them.

    The paper's setting (k-center over rows, no budget in tokens or per source) runs
    ``k_center_greedy`` itself, so its picks stay byte-identical; every other setting runs the
    configured coverage method within its budget (``budgeted_selection``)."""
    has_candidates = len(candidate_ids) > len(already)
    if not params.paper_setting():
        if has_candidates:
            frame, spent = budgeted_selection(params.coverage, vectors, rows_of(candidate_ids),
                                              params.k, params.tokens, params.source_caps, params.source_shares,
                                              params.base_model, already=already, seed=params.seed)
        else:
            frame, spent = empty_selection(), {"method": params.coverage.method}
        radius = float(frame["radius_after"].iloc[-1]) if len(frame) else None
        return Picked(frame, len(frame), spent, capped=False, radius=radius)
    k = min(params.k, pickable_rows(vectors, list(already))) if has_candidates else 0
    if k == 0:
        return Picked(empty_selection(), 0, None, capped=k < params.k, radius=None)
    result = k_center_greedy(vectors, k, already_selected=already, seed=params.seed, device=device)
    return Picked(selection_frame(candidate_ids, result), k, None, capped=k < params.k,
                  radius=float(result.radii[-1]))


@register
class SeedSelect(Stage[SeedSelectParams]):
    name, version, resources = "seed_select", "1", CPU
    description = "Seed set picked by the coverage method (k-center greedy by default)."
    inputs = ("embed", "high_quality")
    params = SeedSelectParams
    outputs = (SELECTED_PARQUET,)

    def run(self, ctx: StageContext, params: SeedSelectParams) -> dict[str, Any]:
        ids, vectors = read_embeddings(ctx.inputs["embed"] / EMBEDDINGS_PARQUET)
        picked = pick_set(params, vectors, ids, lambda chosen: candidate_rows(ctx.inputs["high_quality"], chosen))
        write_parquet(picked.frame, ctx.out / SELECTED_PARQUET)
        if picked.spent is not None:
            return {"candidates": len(ids), "k_requested": params.k, "k": picked.k, **picked.spent,
                    "radius": picked.radius}
        if picked.capped:
            log.warning("seed_selection.k=%d, but only %d distinct high-quality rows: the seed set is all of them, "
                        "and the necessity step has nothing left to add", params.k, picked.k)
        return {"candidates": len(ids), "k_requested": params.k, "k": picked.k, "capped": picked.capped,
                "radius": picked.radius}
