"""The MoDS pipeline: its stages in order (each after its inputs) and the one place that
maps the user's configuration onto each stage's parameters.

    ingest → sample → quality → high_quality → embed → seed_select → seed_train
      → answers → necessity → ifd → augment_select → final_train → export

(answers and necessity have rows for necessity.method generate and reward_gap, ifd for ifd.)
"""

from __future__ import annotations

from pydantic import BaseModel

from mods.config import PipelineConfig
from mods.core.stage import get_stage
from mods.stages.coverage import SeedSelectParams
from mods.stages.data import IngestParams
from mods.stages.export import ExportParams
from mods.stages.necessity import AnswersParams, AugmentSelectParams, IfdParams
from mods.stages.quality import HighQualityParams, ScoringParams
from mods.stages.training import TrainingParams

PIPELINE: tuple[str, ...] = ("ingest", "sample", "quality", "high_quality", "embed", "seed_select", "seed_train",
                             "answers", "necessity", "ifd", "augment_select", "final_train", "export")


def stage_params(config: PipelineConfig, sources: list[str]) -> dict[str, BaseModel]:
    """Every stage's parameters from the pipeline configuration; a stage not named here
    runs with its parameter model's defaults."""
    scoring = ScoringParams(scorer=config.quality.scorer)
    coverage = config.coverage.method_fields()
    necessity = config.necessity
    named: dict[str, BaseModel] = {
        "ingest": IngestParams(sources=sources, ingest=config.ingest),
        "sample": config.sample,
        "quality": scoring,
        "high_quality": HighQualityParams(alpha=config.quality.alpha, alpha_percentile=config.quality.alpha_percentile,
                                          keep_fraction=config.quality.keep_fraction),
        "embed": config.embedding,
        "seed_select": SeedSelectParams(
            **config.seed_selection.model_dump(), coverage=coverage,
            base_model=config.base_model if config.seed_selection.tokens is not None else None),
        "seed_train": TrainingParams(base_model=config.base_model, train=config.seed_training),
        "answers": AnswersParams(**necessity.generation.model_dump(), answer_rows=necessity.method != "ifd"),
        "necessity": scoring,
        "ifd": IfdParams(enabled=necessity.method == "ifd", **necessity.ifd.model_dump()),
        "augment_select": AugmentSelectParams(
            **necessity.augment_selection().model_dump(), coverage=coverage,
            base_model=config.base_model if necessity.tokens is not None else None),
        "final_train": TrainingParams(base_model=config.base_model, train=config.final_training),
        "export": ExportParams(),
    }
    return {name: named[name] if name in named else get_stage(name).params() for name in PIPELINE}
