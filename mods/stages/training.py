"""Training phase (MoDS steps 3 and 5): the base LLM fine-tuned on the seed set
(seed_train) and on seed ∪ augmented (final_train). Both use every GPU of one machine."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, ClassVar, Mapping

import pandas as pd

from mods.core.files import MODEL_DIR, ROWS_PARQUET, SELECTED_PARQUET
from mods.core.stage import WHOLE_MACHINE, Stage, StageContext, StageParams, read_table, register
from mods.models.loading import model_fingerprint
from mods.training.config import TrainConfig
from mods.training.data import training_key_frame
from mods.training.train import train_fitting_memory


class TrainingParams(StageParams):
    base_model: str
    train: TrainConfig = TrainConfig()


def training_rows(inputs: Mapping[str, Path], selections: tuple[str, ...]) -> pd.DataFrame:
    """The high-quality rows of the given selections, deduplicated, in pick order."""
    rows = read_table(inputs["high_quality"], ROWS_PARQUET)
    chosen: list[str] = []
    for name in selections:
        chosen += read_table(inputs[name], SELECTED_PARQUET)["id"].tolist()
    chosen = list(dict.fromkeys(chosen))  # seed ∪ augmented, deduplicated, pick order kept
    return rows.set_index("id").loc[chosen].reset_index()


class TrainingStage(Stage[TrainingParams]):
    version, resources = "2", WHOLE_MACHINE
    params = TrainingParams
    outputs = (MODEL_DIR,)
    selections: ClassVar[tuple[str, ...]]

    def key_extra(self, params: TrainingParams) -> list[str]:
        return [model_fingerprint(params.base_model)]

    def input_digest(self, params: TrainingParams, inputs: Mapping[str, Path]) -> str:
        # What it trains on (the selected rows' texts, in order), not the whole pool: a grown pool that selects the same
        # rows keeps the trained model, and the answers made with it (early cut-off). Exchange rows: instruction, input,
        # output, as always; conversation rows add their messages (mods.training.data.training_key_frame).
        frame = training_key_frame(training_rows(inputs, self.selections))
        return hashlib.sha256(frame.to_json(orient="split", index=False).encode("utf-8")).hexdigest()

    def run(self, ctx: StageContext, params: TrainingParams) -> dict[str, Any]:
        return train_fitting_memory(params.base_model, training_rows(ctx.inputs, self.selections), params.train,
                                    ctx.out / MODEL_DIR, ctx.scratch, progress=ctx.progress)


@register
class SeedTrain(TrainingStage):
    name = "seed_train"
    description = "Fine-tune the base LLM on the seed set."
    inputs = ("high_quality", "seed_select")
    selections = ("seed_select",)


@register
class FinalTrain(TrainingStage):
    name = "final_train"
    description = "Fine-tune the base LLM on seed ∪ augmented."
    inputs = ("high_quality", "seed_select", "augment_select")
    selections = ("seed_select", "augment_select")
