"""How the seed model answers (``GenerationConfig``: the ``generation`` block of the
configuration), read by both engines (``mods.generation.answers``, ``mods.generation.vllm_engine``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mods.core.keys import KEY_WHEN_SET
from mods.models.loading import MODEL_DTYPE_HELP, ModelDtype

EngineName = Literal["transformers", "vllm"]


class GenerationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(
        64, ge=1, description="Answer length cap (paper: 1,024 with 4 beams, on GPU)."
    )
    num_beams: int = Field(1, ge=1, description="1 = greedy (fast); the paper used 4.")
    batch_size: int = Field(16, ge=1, description="Prompts per generate() call.")
    max_prompt_length: int = Field(256, ge=8, description="Prompt tokens kept (the end is kept).")
    device: str | None = Field(None, description="'cpu', 'cuda', or empty for automatic.")
    # Added after answers were keyed: at its default it is not in the key (old keys stay).
    engine: Literal["transformers", "vllm", "auto"] = Field(
        "transformers", json_schema_extra=KEY_WHEN_SET,
        description="'transformers' (generate), 'vllm' (make vllm; greedy only, ~3x on 2 CPU cores; "
        "use a larger batch_size, e.g. 64+) or 'auto': vllm where it is installed and num_beams is 1, else "
        "transformers, and transformers when vLLM cannot start. The engine is part of the answers' key.",
    )

    dtype: ModelDtype = Field("auto", json_schema_extra=KEY_WHEN_SET, description=MODEL_DTYPE_HELP)

    @model_validator(mode="after")
    def _engine_can_decode(self) -> "GenerationConfig":
        if self.engine == "vllm" and self.num_beams > 1:
            raise ValueError("generation.engine 'vllm' decodes greedily (num_beams 1); beam search runs on "
                             "'transformers' (vLLM's beam search is another algorithm, and impractical on CPU)")
        return self
