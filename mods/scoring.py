"""Quality scorers: one float per (instruction, input, output) row, higher = better.

Three kinds, one module each (``mods.scoring_reward_model``, ``mods.scoring_likelihood``,
``mods.scoring_preference``; what they share is in ``mods.scoring_common``):

* ``reward-model`` — the paper's path: any local ``AutoModelForSequenceClassification``
  folder with a single output (MoDS uses OpenAssistant/reward-model-deberta-v3-large-v2).
  question = instruction (+ "\\n" + input), answer = output, score = the logit.
* ``likelihood`` — offline, from the packaged SmolLM2-135M-Instruct: a weighted sum of
  the answer's mean log-probability, its PMI with the instruction and the log-probability
  of ending the turn (the formula and its reasons: ``mods.scoring_likelihood``).
* ``preference`` — offline, calibrated to human judgements: SmolLM2 and MiniLM features and
  text statistics combined by a Bradley-Terry head fitted on PandaLM's human-labelled pairs;
  the score is in logits of "people prefer this answer" (``mods.scoring_preference``,
  docs/scoring.md).

Every score depends on its own row only (no normalisation across the rows of a call).

A conversation row (``ingest.turn: conversation``) is scored turn by turn (``score_rows``):
each assistant turn that answers a user turn, after the real conversation before it, in
the scoring model's chat template. Its ``quality_score`` combines them (``QUALITY_AGGREGATE``):
the reward model's score of its last turn, which reads the whole conversation; the mean of
the turns for the likelihood and preference scores, whose features are per answer. The
per-turn scores are kept (``turn_scores``). An exchange row is one turn: scored as always.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from mods.conversations import row_turns
from mods.models import model_fingerprint
from mods.scoring_likelihood import LIKELIHOOD_VERSION, LikelihoodScorer
from mods.scoring_preference import PREFERENCE_HEAD_FILE, PREFERENCE_VERSION, PreferenceScorer
from mods.scoring_reward_model import REWARD_MODEL_VERSION, RewardModelScorer


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else "none"


# One string for cache keys that changes whenever any kind's definition changes, a refit
# of the preference head included (its file's hash is part of it), so cached scores of
# an older definition are never reused.
SCORER_VERSION = (
    f"likelihood{LIKELIHOOD_VERSION}-reward{REWARD_MODEL_VERSION}-preference{PREFERENCE_VERSION}"
    f".{_file_digest(PREFERENCE_HEAD_FILE)}"
)


class ScorerConfig(BaseModel):
    """How to score the quality of instruction data."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    kind: Literal["preference", "likelihood", "reward-model"] = Field(
        "preference",
        description=(
            "'preference': offline default, SmolLM2 and MiniLM features combined by a head calibrated on human "
            "preference pairs (agrees with people on 73% of PandaLM's pairs, cross-validated; docs/scoring.md). "
            "'likelihood': offline, SmolLM2 log-probabilities alone (fit, relevance and completeness; "
            "43% on those pairs). 'reward-model': the paper's method, needs a local reward-model folder in 'model'."
        ),
    )
    model: str | None = Field(
        None,
        description=(
            "Model folder. Empty: SmolLM2-135M-Instruct for 'preference' and 'likelihood'. Required for 'reward-model': a local "
            "folder of an AutoModelForSequenceClassification with one output, e.g. a download of "
            "OpenAssistant/reward-model-deberta-v3-large-v2."
        ),
    )
    embedding_model: str = Field(
        "all-minilm-l6-v2",
        description=(
            "Sentence-embedding model of the 'preference' scorer (answer-instruction similarity): "
            "'all-minilm-l6-v2' (packaged) or a local sentence-transformers / HF encoder folder."
        ),
    )
    max_length: int = Field(512, ge=16, le=8192, description="Maximum tokens per scored row (longer rows are truncated).")
    batch_size: int = Field(16, ge=1, le=1024, description="Rows per forward pass (rows are sorted by length first).")
    device: str | None = Field(None, description="Torch device ('cpu', 'cuda', 'cuda:1'); empty: cuda when available.")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description=(
            "Compute precision of the forward passes (weights stay float32). 'auto': bfloat16 autocast where the "
            "hardware computes it natively (CPUs with AVX512-BF16/AMX, CUDA with bf16), about 2x faster on such "
            "CPUs; float32 elsewhere."
        ),
    )


class Scorer(Protocol):
    config: ScorerConfig

    def score(
        self,
        instructions: Sequence[str],
        inputs: Sequence[str],
        outputs: Sequence[str],
        progress: bool = True,
        contexts: Sequence[Sequence[Any]] | None = None,
    ) -> pd.DataFrame: ...

    def fingerprint(self) -> dict[str, Any]: ...


def build_scorer(config: ScorerConfig) -> Scorer:
    if config.kind == "reward-model":
        return RewardModelScorer(config)
    if config.kind == "likelihood":
        return LikelihoodScorer(config)
    if config.kind == "preference":
        return PreferenceScorer(config)
    raise ValueError(f"unknown scorer kind {config.kind!r}")


def scorer_identity(scorer: ScorerConfig) -> list[str]:
    """What a scorer's scores depend on beyond its configuration's values: the files of its
    model and embedding model (the preference scorer's similarities), and the scorer's own
    definition version (formulas and the shipped preference head's digest): a changed one
    must not reuse old scores. The quality stages and the evaluation's scorer judge use it."""
    return [model_fingerprint(scorer.model), model_fingerprint(getattr(scorer, "embedding_model", None)),
            f"scorer:{SCORER_VERSION}"]


TurnAggregate = Literal["mean", "min", "last"]
# How a conversation's turn scores become its quality score, per scorer kind (module docstring).
QUALITY_AGGREGATE: dict[str, TurnAggregate] = {"reward-model": "last", "likelihood": "mean", "preference": "mean"}


def score_rows(scorer: Scorer, rows: pd.DataFrame, answer_column: str = "output",
               turn_answers: Sequence[Sequence[str]] | None = None, aggregate: TurnAggregate = "mean",
               progress: bool = False) -> pd.DataFrame:
    """One score per row of ``rows``: every turn of it (``mods.conversations.row_turns``: a
    conversation row's assistant turns in their context, an exchange row's one exchange,
    ``answer_column`` its answer; ``turn_answers``: other answers, one list per row, one per
    turn) scored in one call, then combined per row by ``aggregate``. Columns: the scorer's
    (``quality_score`` combined; other numbers averaged over the turns, flags any turn's)
    and ``turn_scores``, the turns' scores in order."""
    turns, owner = [], []
    for position, row in enumerate(rows.to_dict("records")):
        answers = None if turn_answers is None else turn_answers[position]
        for turn in row_turns(row, answer_column, answers):
            turns.append(turn)
            owner.append(position)
    contexts = [turn.context for turn in turns]
    scored = scorer.score([t.instruction for t in turns], [t.input for t in turns], [t.answer for t in turns],
                          progress=progress, contexts=contexts if any(contexts) else None)
    turn_scores = scored["quality_score"].to_numpy(np.float64)
    if len(turns) == len(rows):  # one turn per row: the scores are the rows' own
        return scored.assign(turn_scores=[[float(v)] for v in turn_scores])
    groups = scored.groupby(np.asarray(owner), sort=True)
    combined = pd.DataFrame(index=range(len(rows)))
    for column in scored.columns:
        if column == "quality_score":
            values = groups[column].agg({"mean": "mean", "min": "min", "last": "last"}[aggregate])
        elif scored[column].dtype == bool:
            values = groups[column].any()
        else:
            values = groups[column].mean()
        combined[column] = values.to_numpy()
    starts = np.searchsorted(np.asarray(owner), np.arange(len(rows) + 1))
    combined["turn_scores"] = [[float(v) for v in turn_scores[a:b]] for a, b in zip(starts[:-1], starts[1:])]
    return combined
