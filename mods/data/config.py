"""How ingestion maps, validates and decontaminates: the ``ingest`` block of the
configuration, read by ``mods.data.ingest``, ``mods.data.shapes`` and ``mods.data.text``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mods.data import schema as S


class IngestConfig(BaseModel):
    """How ingestion maps, validates and decontaminates (a Prefect UI form)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silent default

    field_mapping: dict[str, str] = Field(
        default={},  # a plain default (pydantic copies it per instance): the UI form shows it
        description="Canonical field -> field name in your data, e.g. {'output': 'response'}. "
        "Canonical fields: instruction, input, output, history. Unmapped fields are auto-detected.",
    )
    max_chars: int = Field(
        100_000, gt=0, description="Longest allowed text per field (characters); longer rows are quarantined as too_long."
    )
    min_chars: int = Field(
        1, ge=1, description="Shortest allowed instruction and output (characters, after trimming whitespace)."
    )
    # Default 'conversation': the pools people select from are chat mixes, and a model tuned
    # on the selection should see second turns; a single-exchange pool (Alpaca) gives the
    # same rows, ids and selection as 'first'. The paper's setting: configs/paper-*.yaml.
    turn: Literal["first", "last", "conversation"] = Field(
        "conversation",
        description="For multi-turn rows (chat history, ShareGPT conversations). 'conversation': the whole "
        "conversation is one row (messages column), scored, trained on and answered turn by turn; leading "
        "assistant turns and a trailing unanswered user turn are dropped (metadata.dropped); a single exchange "
        "is the row 'first' gives. 'first' (the paper): the opening exchange becomes instruction/output, the one "
        "scored and embedded; later turns go to metadata.later_turns. 'last': the final exchange, earlier turns "
        "in history.",
    )
    decontaminate_against: list[str] = Field(
        default=[],
        description="Files or folders of evaluation sets; training rows overlapping them are dropped. Empty: no decontamination.",
    )
    decontamination_ngram: int = Field(
        8, ge=1, le=50, description="n of the word n-grams compared (CJK: characters) for decontamination."
    )
    decontamination_threshold: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Drop a row when this share of the n-grams of the shorter text (row prompt or eval item) is shared.",
    )

    @field_validator("field_mapping")
    @classmethod
    def _known_fields(cls, v: dict[str, str]) -> dict[str, str]:
        for k, src in v.items():
            if k not in S.MAPPABLE_FIELDS:
                raise ValueError(f"unknown canonical field {k!r} in mapping (use {', '.join(S.MAPPABLE_FIELDS)})")
            if not isinstance(src, str) or not src:
                raise ValueError(f"mapping for {k!r} must name a field")
        return v
