"""Marks on parameter fields that the engine reads when it keys an artifact
(``mods.core.engine.key_params``). A leaf module: every family's config may import it."""

from __future__ import annotations

from typing import Any

# ``Field(..., json_schema_extra=KEY_WHEN_SET)``: a parameter added after artifacts were
# keyed. At its default it is left out of the stage's key and row fingerprint
# (mods.core.engine.key_params), so the artifacts made before it existed keep their keys.
KEY_WHEN_SET: dict[str, Any] = {"key_when_set": True}


def in_key_only_when_set(field: Any) -> bool:
    """Whether a pydantic field is marked ``KEY_WHEN_SET``."""
    extra = getattr(field, "json_schema_extra", None)
    return isinstance(extra, dict) and bool(extra.get("key_when_set"))
