"""The MoDS pipeline: its stages in order (each after its inputs), and the one place that
maps the user's configuration onto each stage's parameters: the pipeline's
(``stage_params``) and the evaluation's (``evaluation_params``, ``evaluation_report_params``).

    ingest → sample → quality → high_quality → embed → seed_select → seed_train
      → answers → necessity → ifd → augment_select → final_train → export

(answers and necessity have rows for necessity.method generate and reward_gap, ifd for ifd.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from mods.config import EvaluationConfig, PipelineConfig
from mods.core.artifacts import Artifact, read_marker
from mods.core.engine import Engine
from mods.core.stage import RowwiseStage, get_stage
from mods.evaluation.config import AgreementParams, JudgeParams
from mods.scoring.config import ScorerConfig
from mods.stages.coverage import SeedSelectParams
from mods.stages.data import IngestParams
from mods.stages.evaluation import BaselineParams, ModelAnswersParams, PromptsParams, ReportParams
from mods.stages.export import ExportParams
from mods.stages.necessity import AnswersParams, AugmentSelectParams, IfdParams
from mods.stages.quality import HighQualityParams, ScoringParams
from mods.stages.training import TrainingParams

PIPELINE: tuple[str, ...] = ("ingest", "sample", "quality", "high_quality", "embed", "seed_select", "seed_train",
                             "answers", "necessity", "ifd", "augment_select", "final_train", "export")


def stage_params(config: PipelineConfig, sources: list[str]) -> dict[str, BaseModel]:
    """Every stage's parameters from the pipeline configuration. A stage not named here takes
    its parameters from ``config.stages[<its name>]`` (its parameter model's defaults where
    that is empty)."""
    scoring = ScoringParams(scorer=config.quality.scorer)
    coverage = config.coverage.method_fields()
    necessity = config.necessity
    named: dict[str, BaseModel] = {
        "ingest": IngestParams(sources=sources, ingest=config.ingest),
        "sample": config.sample,
        "quality": scoring,
        "high_quality": HighQualityParams(**config.quality.cutoff().model_dump()),
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
    own = [name for name in PIPELINE if name not in named]  # stages with no section of their own
    unknown = sorted(set(config.stages) - set(own))
    if unknown:
        raise ValueError(f"stages: {', '.join(unknown)} is not a pipeline stage without a section of its own "
                         f"(those are: {', '.join(own) or 'none'}); set the others in their sections")
    return {name: named[name] if name in named else get_stage(name).params.model_validate(config.stages.get(name, {}))
            for name in PIPELINE}


def _absolute(path: str) -> str:
    # Workers may run in another folder: hand them absolute paths.
    return str(Path(path).expanduser().resolve())


@dataclass(frozen=True)
class EvaluationParams:
    """The evaluation stages' parameters for one finished run (the flow adds which models
    and artifacts they run on)."""

    prompts: PromptsParams
    baselines: dict[str, BaselineParams]  # by baseline name
    answers: ModelAnswersParams  # every model's answers
    judges: dict[str, JudgeParams]  # by judge kind
    agreements: dict[str, AgreementParams]  # each judge against the human votes, by judge kind
    scorer_agreement: AgreementParams  # the pipeline's own quality scorer against them


def _agreement(kind: str, scorer: ScorerConfig | None, config: EvaluationConfig) -> AgreementParams:
    return AgreementParams(judge=kind, scorer=scorer if kind == "scorer" else None,
                           llm=config.llm_judge if kind == "llm" else None,
                           tie_margin=config.tie_margin if kind == "scorer" else 0.0,
                           preferences=_absolute(config.preferences), pairs=config.agreement_pairs, seed=config.seed)


def evaluation_params(config: EvaluationConfig, settings: dict[str, Any]) -> EvaluationParams:
    """Every evaluation stage's parameters from the evaluation's configuration and the
    settings of the run it evaluates (``mods.evaluation.runs.run_settings``)."""
    pipeline_scorer: ScorerConfig = settings["scorer"]
    judge_scorer = config.scorer or pipeline_scorer
    judges = {kind: JudgeParams(judge=kind, scorer=judge_scorer if kind == "scorer" else None,
                                llm=config.llm_judge if kind == "llm" else None,
                                tie_margin=config.tie_margin if kind == "scorer" else 0.0)
              for kind in config.judge}
    return EvaluationParams(
        prompts=PromptsParams(
            test_sets_dir=_absolute(config.test_sets_dir), test_sets=list(config.test_sets),
            test_files=[_absolute(f) for f in config.test_files], prompts_per_set=config.prompts_per_set,
            reference_rows_per_set=config.reference_rows_per_set, seed=config.seed),
        baselines={baseline: BaselineParams(
            baseline=baseline, seed=config.seed, kcenter_seed=settings["kcenter_seed"],
            tokens=settings["selection_tokens"] if baseline == "longest" else None,
            base_model=settings["base_model"], train=settings["train"]) for baseline in config.baselines},
        answers=ModelAnswersParams(generation=config.generation, reference_max_length=config.reference_max_length),
        judges=judges,
        agreements={kind: _agreement(kind, params.scorer, config) for kind, params in judges.items()},
        scorer_agreement=_agreement("scorer", pipeline_scorer, config),
    )


def evaluation_report_params(config: EvaluationConfig, settings: dict[str, Any], export_key: str,
                             artifacts: dict[str, Artifact], opponents: list[str]) -> ReportParams:
    """The report stage's parameters: what it compares, and what it states about the run. Its
    ``meta`` holds no workspace path, so a moved or copied workspace reuses the report."""
    generation = config.generation
    pipeline_scorer: ScorerConfig = settings["scorer"]
    meta = {"export_key": export_key, "selection_size": settings["selection_size"],
            "training": f"{settings['base_model']}, {settings['train'].method}, {settings['train'].epochs:g} epochs",
            "prompts_per_set": config.prompts_per_set, "seed": config.seed,
            "agreement_pairs": config.agreement_pairs,
            "generation": f"greedy, up to {generation.max_new_tokens} new tokens" if generation.num_beams == 1
            else f"{generation.num_beams} beams, up to {generation.max_new_tokens} new tokens"}
    return ReportParams(artifacts=artifacts, judges=list(config.judge), baselines=opponents,
                        trust_threshold=config.trust_threshold,
                        judge_scorer=(config.scorer or pipeline_scorer) if "scorer" in config.judge else None,
                        pipeline_scorer=pipeline_scorer, meta=meta)


@dataclass(frozen=True)
class StagePlan:
    """What a run would do with one stage, found without loading a model or running anything."""

    stage: str
    status: str  # "cached", "to run", or "to run, after <inputs not yet made>"
    rows: int | None = None  # a cached artifact's rows (its summary's)
    rows_to_compute: int | None = None  # a row-wise stage to run: distinct rows its store lacks ...
    rows_total: int | None = None  # ... of its distinct rows
    seconds: float | None = None  # a cached artifact: what making it took

    def line(self) -> str:
        if self.status == "cached":
            done = f"{self.rows:,} rows, " if self.rows is not None else ""
            return f"{self.stage:<15} cached       {done}made in {self.seconds or 0:,.1f} s"
        if self.rows_total is not None:
            return (f"{self.stage:<15} {self.status:<12} {self.rows_to_compute:,} of its {self.rows_total:,} rows "
                    "to compute (the rest are in its row store)")
        return f"{self.stage:<15} {self.status}"


def plan_pipeline(config: PipelineConfig, sources: list[str]) -> list[StagePlan]:
    """Each pipeline stage: cached, or to run (and for a row-wise stage whose inputs exist, how
    many of its rows are not computed yet). A stage whose inputs are still to be made cannot be
    keyed (keys follow the inputs' content): it is to run after them."""
    engine = Engine(config.workspace, verify=config.execution.verify, progress=False)
    params = stage_params(config, sources)
    made: dict[str, Artifact] = {}
    plan = []
    for name in PIPELINE:
        stage = get_stage(name)
        waiting = [i for i in stage.inputs if i not in made]
        if waiting:
            plan.append(StagePlan(name, f"to run, after {', '.join(waiting)}"))
            continue
        run = engine.resolve(stage, params[name], {i: made[i] for i in stage.inputs})
        if engine.is_complete(run):
            marker = read_marker(run.artifact.dir(engine.workspace))
            made[name] = run.artifact
            plan.append(StagePlan(name, "cached", rows=marker["summary"].get("rows"), seconds=marker.get("seconds")))
        elif isinstance(stage, RowwiseStage):
            unique, missing = engine.missing_rows(run)
            plan.append(StagePlan(name, "to run", rows_to_compute=len(missing), rows_total=len(unique)))
        else:
            plan.append(StagePlan(name, "to run"))
    return plan
