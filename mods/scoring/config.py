"""How quality is scored (``ScorerConfig``: the ``scorer`` block of the configuration) and
what every scorer offers (``Scorer``). The three kinds read it; ``mods.scoring.scorers``
builds one from it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field


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
            "Model folder or Hugging Face hub id. Empty: SmolLM2-135M-Instruct for 'preference' and 'likelihood'. "
            "Required for 'reward-model': an AutoModelForSequenceClassification with one output, e.g. "
            "OpenAssistant/reward-model-deberta-v3-large-v2."
        ),
    )
    embedding_model: str = Field(
        "all-minilm-l6-v2",
        description=(
            "Sentence-embedding model of the 'preference' scorer (answer-instruction similarity): "
            "'all-minilm-l6-v2' (packaged), a local sentence-transformers / HF encoder folder, or a hub id."
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
