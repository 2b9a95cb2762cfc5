"""Quality phase (MoDS step 1): the scorer scores every (instruction [+ input], output)
pair (quality, row-wise), and rows above α — or the best fraction — are kept (high_quality).
A conversation row is scored turn by turn and its turns' scores combined
(``mods.scoring.score_rows``). The necessity stage (necessity.py) reuses ``ScoringStage``
on the seed model's answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from mods.core.artifacts import write_parquet
from pydantic import Field

from mods.core.stage import (
    CPU,
    KEY_WHEN_SET,
    ONE_GPU,
    RowwiseStage,
    Stage,
    StageContext,
    StageParams,
    read_table,
    register,
    text_cost,
)
from mods.scoring import ScorerConfig, scorer_identity


class ScoringParams(StageParams):
    scorer: ScorerConfig = ScorerConfig()


class HighQualityParams(StageParams):
    alpha: float | None = None
    alpha_percentile: float | None = Field(None, json_schema_extra=KEY_WHEN_SET)
    keep_fraction: float | None = None


class ScoringStage(RowwiseStage[ScoringParams]):
    """The scorer on every turn of the rows in ``table`` of the stage's one input (an exchange
    row's (instruction, input, ``answer_column``)), the turns' scores combined per row."""

    # 3: conversation rows scored turn by turn, every result with its turn_scores.
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
        from mods.scoring import build_scorer

        return build_scorer(params.scorer)

    def process_batch(self, scorer: Any, block: pd.DataFrame, params: ScoringParams) -> pd.DataFrame:
        from mods.scoring import QUALITY_AGGREGATE, score_rows

        return score_rows(scorer, block, self.answer_column, aggregate=QUALITY_AGGREGATE[params.scorer.kind])


@register
class Quality(ScoringStage):
    name = "quality"
    description = "Score every (instruction, output) pair."
    inputs = ("sample",)
    outputs = ("scores.parquet",)
    table, answer_column = "rows.parquet", "output"

    def row_keys(self, rows: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
        from mods.conversations import with_conversation_cost

        return rows["id"].astype(str), with_conversation_cost(rows, text_cost(rows["instruction"], rows["input"],
                                                                              rows["output"]))

    def assemble(self, ctx: StageContext, params: ScoringParams, rows: pd.DataFrame, results: pd.DataFrame) -> dict[str, Any]:
        scores = results.reset_index(drop=True)
        scores.insert(0, "id", rows["id"].to_numpy())
        write_parquet(scores, ctx.out / "scores.parquet")
        values = scores["quality_score"].to_numpy(dtype=np.float64) if len(scores) else np.zeros(0)
        return {"rows": len(scores), "score_mean": float(np.nanmean(values)) if len(values) else None}


@register
class HighQuality(Stage[HighQualityParams]):
    name, version, resources = "high_quality", "1", CPU
    description = "Keep rows above alpha (or the top fraction)."
    inputs = ("sample", "quality")
    params = HighQualityParams
    outputs = ("rows.parquet",)

    def run(self, ctx: StageContext, params: HighQualityParams) -> dict[str, Any]:
        from mods.cutoffs import keep_mask, score_distribution

        rows = read_table(ctx.inputs["sample"], "rows.parquet")
        scores = read_table(ctx.inputs["quality"], "scores.parquet")[["id", "quality_score"]]
        scored = rows.merge(scores, on="id", how="left", validate="one_to_one")
        values = scored["quality_score"].to_numpy(np.float64)
        mask, cutoff = keep_mask(values, "above", params.alpha, params.alpha_percentile, params.keep_fraction)
        kept = scored[mask].reset_index(drop=True)
        if kept.empty:
            raise ValueError(
                f"no row passed the quality filter (alpha={params.alpha}, alpha_percentile={params.alpha_percentile}, "
                f"keep_fraction={params.keep_fraction}) out of {len(scored)}; lower quality.alpha"
            )
        write_parquet(kept, ctx.out / "rows.parquet")
        return {"scored": len(scored), "kept": len(kept), "threshold": float(kept["quality_score"].min()),
                "quality_distribution": score_distribution(values, cutoff, "above", len(kept))}
