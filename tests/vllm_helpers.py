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

