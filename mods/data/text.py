"""Text fields of ingested rows: validation (a bad field quarantines its row, with a
reason), the normalised content that makes two rows duplicates (``row_id``), and text
that Parquet accepts (``safe_text``)."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mods.data.config import IngestConfig

# C0 controls other than tab/newline/CR, DEL, and lone surrogates (undecodable bytes)
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class Quarantine(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------- helpers


def normalise(text: str) -> str:
    """What two copies must share to count as duplicates: NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def row_id(instruction: str, input_text: str, output: str, history: list, later: list) -> str:
    payload = json.dumps(
        [normalise(instruction), normalise(input_text), normalise(output),
         [[normalise(u), normalise(a)] for u, a in history],
         [[t["role"], normalise(t["content"])] for t in later]],
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def conversation_id(messages: list) -> str:
    """The id of a whole conversation (turn='conversation'): its normalised turns, marked
    so that it never equals a ``row_id`` of the same text."""
    payload = json.dumps(["conversation", [[m["role"], normalise(m["content"])] for m in messages]],
                         ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def safe_text(s: str) -> str:
    """Text that UTF-8 encoding (Parquet) accepts: undecodable bytes shown as \\xNN."""
    if not _SURROGATE.search(s):
        return s
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


class _Missing:
    pass


MISSING = _Missing()


def check_text(value: Any, what: str, cfg: IngestConfig, required: bool, reason_base: str) -> str:
    """Validate one text field; returns it trimmed or raises Quarantine."""
    if value is MISSING or value is None:
        if required:
            raise Quarantine(f"missing_{reason_base}", f"{what} is {'absent' if value is MISSING else 'null'}")
        return ""
    if not isinstance(value, str):
        raise Quarantine("wrong_type", f"{what} is a {type_name(value)}, not a string: {str(value)[:60]!r}")
    m = _BAD_CHARS.search(value)
    if m:
        ch = m.group()
        if "\ud800" <= ch <= "\udfff":
            raise Quarantine("invalid_utf8", f"{what} contains bytes that are not valid UTF-8")
        raise Quarantine("control_chars", f"{what} contains control character U+{ord(ch):04X} at offset {m.start()}")
    value = value.strip()
    if required and len(value) < cfg.min_chars:
        raise Quarantine(f"empty_{reason_base}",
                          f"{what} is empty" if not value else f"{what} is shorter than {cfg.min_chars} characters")
    if len(value) > cfg.max_chars:
        raise Quarantine("too_long", f"{what} has {len(value)} characters (max_chars={cfg.max_chars})")
    return value
