"""Quality scorers: one float per (instruction, input, output) row, higher = better.

Three kinds, one module each (``mods.scoring.reward_model``, ``mods.scoring.likelihood``,
``mods.scoring.preference``; what they share is in ``mods.scoring.common``):

* ``reward-model`` — the paper's path: any local ``AutoModelForSequenceClassification``
  folder with a single output (MoDS uses OpenAssistant/reward-model-deberta-v3-large-v2).
  question = instruction (+ "\\n" + input), answer = output, score = the logit.
* ``likelihood`` — offline, from the packaged SmolLM2-135M-Instruct: a weighted sum of
  the answer's mean log-probability, its PMI with the instruction and the log-probability
  of ending the turn (the formula and its reasons: ``mods.scoring.likelihood``).
* ``preference`` — offline, calibrated to human judgements: SmolLM2 and MiniLM features and
  text statistics combined by a Bradley-Terry head fitted on PandaLM's human-labelled pairs;
  the score is in logits of "people prefer this answer" (``mods.scoring.preference``,
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
from typing import Literal

import numpy as np
import pandas as pd

from mods.data.conversations import row_turns
from mods.models.loading import model_fingerprint
from mods.scoring.config import Scorer, ScorerConfig
from mods.scoring.likelihood import LIKELIHOOD_VERSION, LikelihoodScorer
from mods.scoring.preference import PREFERENCE_HEAD_FILE, PREFERENCE_VERSION, PreferenceScorer
from mods.scoring.reward_model import REWARD_MODEL_VERSION, RewardModelScorer


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else "none"


# One string for cache keys that changes whenever any kind's definition changes, a refit
# of the preference head included (its file's hash is part of it), so cached scores of
# an older definition are never reused.
SCORER_VERSION = (
    f"likelihood{LIKELIHOOD_VERSION}-reward{REWARD_MODEL_VERSION}-preference{PREFERENCE_VERSION}"
    f".{_file_digest(PREFERENCE_HEAD_FILE)}"
)


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
    """One score per row of ``rows``: every turn of it (``mods.data.conversations.row_turns``: a
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
