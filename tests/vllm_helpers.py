"""What the vLLM tests share: skip where vLLM is not installed, except in CI (which runs
`make vllm`, so a missing vLLM there is a broken install, not a reason to skip)."""

from __future__ import annotations

import importlib.util
import os

import pytest


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is not None:
        return
    if os.environ.get("CI"):
        pytest.fail("vLLM is not installed, and CI installs it (make vllm)")
    pytest.skip("vLLM is not installed here: `make vllm` adds it (docs/generation.md)")



# The session's engine answers with these (a test that needs other settings starts its own).
SHARED_MAX_NEW_TOKENS = 48
SHARED_MAX_PROMPT_LENGTH = 64


class SharedEngine:
    """One vLLM engine on the packaged SmolLM2 for the whole test session (its start costs
    70-150 s on 2 CPU cores): started by the first test that asks, started again only if a
    test closed it (the test of ``close`` itself), stopped at the end of the session."""

    def __init__(self) -> None:
        from mods.generation.config import GenerationConfig

        self.config = GenerationConfig(engine="vllm", max_new_tokens=SHARED_MAX_NEW_TOKENS,
                                       max_prompt_length=SHARED_MAX_PROMPT_LENGTH, device="cpu")
        self.engine = None
        self.starts = 0

    def get(self):
        from mods.generation.answers import open_answer_engine
        from mods.models.loading import DEFAULT_BASE_MODEL, resolve_model_path

        if self.engine is None or getattr(self.engine, "llm", None) is None:
            self.engine = open_answer_engine(resolve_model_path(DEFAULT_BASE_MODEL), self.config)
            self.starts += 1
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
