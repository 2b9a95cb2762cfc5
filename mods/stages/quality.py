"""Quality phase (MoDS step 1): the scorer scores every (instruction [+ input], output)
pair (quality, row-wise), and rows above α — or the best fraction — are kept (high_quality).
A conversation row is scored turn by turn and its turns' scores combined
(``mods.scoring.scorers.score_rows``). The necessity stage (necessity.py) reuses ``ScoringStage``
on the seed model's answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from mods.config import QualityCutoff
from mods.core.artifacts import write_parquet
from mods.core.files import ROWS_PARQUET, SCORES_PARQUET
from mods.core.stage import (
    CPU,
    ONE_GPU,
    RowwiseStage,
    Stage,
    StageContext,
    StageParams,
    read_table,
    register,
    text_cost,
)
from mods.data.conversations import with_conversation_cost
from mods.scoring.config import ScorerConfig
from mods.scoring.scorers import QUALITY_AGGREGATE, build_scorer, score_rows, scorer_identity
from mods.selection.cutoffs import keep_mask, score_distribution


class ScoringParams(StageParams):
    scorer: ScorerConfig = ScorerConfig()


class HighQualityParams(QualityCutoff, StageParams):
    """The quality section's threshold (``QualityCutoff``), validated as there."""


class ScoringStage(RowwiseStage[ScoringParams]):
    """The scorer on every turn of the rows in ``table`` of the stage's one input (an exchange
    row's (instruction, input, ``answer_column``)), the turns' scores combined per row."""

    version, resources = "3", ONE_GPU
    params = ScoringParams
    table: str
    answer_column: str

    def key_extra(self, params: ScoringParams) -> list[str]:
        return scorer_identity(params.scorer)

    def load(self, inputs: Mapping[str, Path], params: ScoringParams) -> pd.DataFrame:
        return read_table(inputs[self.inputs[0]], self.table)

    def block_rows(self, params: ScoringParams) -> int:
        return params.scorer.batch_size

    def setup(self, params: ScoringParams, folders: Mapping[str, Path]) -> Any:
        return build_scorer(params.scorer)

    def process_batch(self, scorer: Any, block: pd.DataFrame, params: ScoringParams) -> pd.DataFrame:
        return score_rows(scorer, block, self.answer_column, aggregate=QUALITY_AGGREGATE[params.scorer.kind])


@register
class Quality(ScoringStage):
    name = "quality"
    description = "Score every (instruction, output) pair."
    inputs = ("sample",)
    outputs = (SCORES_PARQUET,)
    table, answer_column = ROWS_PARQUET, "output"

    def row_keys(self, rows: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
        return rows["id"].astype(str), with_conversation_cost(rows, text_cost(rows["instruction"], rows["input"],
                                                                              rows["output"]))

    def assemble(self, ctx: StageContext, params: ScoringParams, rows: pd.DataFrame, results: pd.DataFrame) -> dict[str, Any]:
        scores = results.reset_index(drop=True)
        scores.insert(0, "id", rows["id"].to_numpy())
        write_parquet(scores, ctx.out / SCORES_PARQUET)
        values = scores["quality_score"].to_numpy(dtype=np.float64) if len(scores) else np.zeros(0)
        return {"rows": len(scores), "score_mean": float(np.nanmean(values)) if len(values) else None}


@register
class HighQuality(Stage[HighQualityParams]):
    name, version, resources = "high_quality", "1", CPU
    description = "Keep rows above alpha (or the top fraction)."
    inputs = ("sample", "quality")
    params = HighQualityParams
    outputs = (ROWS_PARQUET,)

    def run(self, ctx: StageContext, params: HighQualityParams) -> dict[str, Any]:
        rows = read_table(ctx.inputs["sample"], ROWS_PARQUET)
        scores = read_table(ctx.inputs["quality"], SCORES_PARQUET)[["id", "quality_score"]]
        scored = rows.merge(scores, on="id", how="left", validate="one_to_one")
        values = scored["quality_score"].to_numpy(np.float64)
        mask, cutoff = keep_mask(values, "above", params.alpha, params.alpha_percentile, params.keep_fraction)
        kept = scored[mask].reset_index(drop=True)
        if kept.empty:
            raise ValueError(
                f"no row passed the quality filter (alpha={params.alpha}, alpha_percentile={params.alpha_percentile}, "
                f"keep_fraction={params.keep_fraction}) out of {len(scored)}; lower quality.alpha"
            )
        write_parquet(kept, ctx.out / ROWS_PARQUET)
        return {"scored": len(scored), "kept": len(kept), "threshold": float(kept["quality_score"].min()),
                "quality_distribution": score_distribution(values, cutoff, "above", len(kept))}
