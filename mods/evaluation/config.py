"""What the evaluation compares and how it judges: the baselines' and judges' names, and a
judge's parameters (``JudgeParams``; ``AgreementParams`` adds the human pairs it is checked
against), read by ``mods.evaluation.judging`` and ``mods.evaluation.head_fit`` and composed by
the evaluation stages (``mods.stages.evaluation``)."""

from __future__ import annotations

from typing import Literal

from mods.core.stage import StageParams
from mods.evaluation.judges import LLMJudgeConfig
from mods.scoring.config import ScorerConfig

Baseline = Literal["random", "quality_top", "seed_only", "longest", "full"]


JudgeKind = Literal["scorer", "llm"]


class JudgeParams(StageParams):
    judge: JudgeKind
    scorer: ScorerConfig | None = None
    llm: LLMJudgeConfig | None = None
    tie_margin: float = 0.0


class AgreementParams(JudgeParams):
    preferences: str
    pairs: int | None = None
    seed: int = 0
