"""The canonical row schema every ingested example is mapped to.

Rows (``rows.parquet``):

============  ======  ==========================================================
column        type    meaning
============  ======  ==========================================================
id            string  16 hex chars of sha256 over the *normalised* instruction,
                      input, output, history and later turns (NFKC, case-folded,
                      whitespace collapsed), or over the whole conversation with
                      ``turn='conversation'``; equal ids = duplicates
source        string  the file the row came from (path as found)
source_line   int64   1-based line (JSON lines, CSV) or 1-based record index
                      (JSON arrays, Parquet, Arrow) of the row in ``source``
instruction   string  the user turn that is scored and embedded
input         string  extra context for the instruction, "" when none
output        string  the answer to score / train on
history       string  JSON list of earlier turns ``[[user, assistant], ...]``,
                      "[]" when none
metadata      string  JSON object: ``shape`` (detected input shape), ``extra``
                      (fields not mapped), ``duplicates`` (provenance of merged
                      copies), ``later_turns``, ``system``, ``instance``,
                      ``dropped`` / ``merged`` (turns of a conversation), ...
messages      string  JSON list of ``{"role": "system"|"user"|"assistant",
                      "content": str}``: the conversation the row keeps, ending
                      with an assistant turn (``mods.data.conversations``; read it with
                      ``row_messages``, which rebuilds it for rows without it)
============  ======  ==========================================================

``messages`` per ``ingest.turn``: with ``first`` and ``last`` (and every single-exchange
shape) it holds what the other columns hold: the system prompt (``metadata.system``) if
any, the ``history`` pairs, then the user turn (instruction, a blank line and input when
there is one, as ``mods.data.prompts.user_message`` joins them) and ``output``; turns the mode
leaves out stay in ``metadata.later_turns`` / ``unpaired_turns``. With ``conversation``
it holds the whole conversation: one system message (every system turn, joined), then
alternating user and assistant turns (consecutive turns of one role merged, listed in
``metadata.merged``); empty turns, leading assistant turns (a continuation of an earlier
part) and a trailing unanswered user turn are dropped and listed in ``metadata.dropped``
as ``{"turn": 1-based position in the record, "role", "reason": "empty" |
"starts_with_assistant" | "unanswered"}``. Its other columns hold the conversation's
*first exchange*, as ``first`` gives it: ``instruction`` = the first user turn (with
``input`` for an Alpaca row without history), ``output`` = its answer, ``history`` =
"[]", no ``later_turns`` (``messages`` has them); consumers that read only those columns
see the opening request, self-contained. Its ``id`` hashes the whole normalised
conversation (system included) with a marker of its own, so it differs from the id of
the same record in ``first`` or ``last``.

Quarantine (``quarantine.parquet``): ``source``, ``source_line``, ``reason`` (a
short code, see ``QUARANTINE_REASONS``), ``detail`` (a sentence), ``raw`` (the raw
record text, truncated to ``RAW_MAX_CHARS``).
"""

from __future__ import annotations

import pyarrow as pa

ID = "id"
SOURCE = "source"
SOURCE_LINE = "source_line"
INSTRUCTION = "instruction"
INPUT = "input"
OUTPUT = "output"
HISTORY = "history"
METADATA = "metadata"
MESSAGES = "messages"

ROW_COLUMNS: tuple[str, ...] = (ID, SOURCE, SOURCE_LINE, INSTRUCTION, INPUT, OUTPUT, HISTORY, METADATA, MESSAGES)
# The fields a user can map with IngestConfig.field_mapping / --map.
MAPPABLE_FIELDS: tuple[str, ...] = (INSTRUCTION, INPUT, OUTPUT, HISTORY)

ROW_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(SOURCE_LINE, pa.int64(), nullable=False),
        pa.field(INSTRUCTION, pa.string(), nullable=False),
        pa.field(INPUT, pa.string(), nullable=False),
        pa.field(OUTPUT, pa.string(), nullable=False),
        pa.field(HISTORY, pa.string(), nullable=False),
        pa.field(METADATA, pa.string(), nullable=False),
        pa.field(MESSAGES, pa.string(), nullable=False),
    ]
)

REASON = "reason"
DETAIL = "detail"
RAW = "raw"
QUARANTINE_COLUMNS: tuple[str, ...] = (SOURCE, SOURCE_LINE, REASON, DETAIL, RAW)
QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(SOURCE_LINE, pa.int64(), nullable=False),
        pa.field(REASON, pa.string(), nullable=False),
        pa.field(DETAIL, pa.string(), nullable=False),
        pa.field(RAW, pa.string(), nullable=False),
    ]
)
RAW_MAX_CHARS = 4096

# Every reason code a quarantine row can carry (documented in docs/ingestion.md).
QUARANTINE_REASONS: dict[str, str] = {
    "json_syntax": "the line / record is not valid JSON",
    "truncated": "the file ends in the middle of a record",
    "too_deep": "nested too deeply to parse (about 1,000 levels of lists/objects)",
    "not_an_object": "the record is not a JSON object (e.g. a bare string or number)",
    "unknown_shape": "no recognisable fields in this record (others in the file had them)",
    "invalid_utf8": "bytes that are not UTF-8 (or lone surrogates)",
    "control_chars": "NUL or other control characters (other than tab/newline/CR)",
    "missing_instruction": "no instruction field, or null",
    "missing_output": "no output field, or null",
    "empty_instruction": "instruction is empty or whitespace only",
    "empty_output": "output is empty or whitespace only",
    "wrong_type": "a field has a non-string value (number, list, object, bool)",
    "too_long": "a field is longer than IngestConfig.max_chars",
    "bad_history": "history is not a list of [user, assistant] string pairs",
    "empty_instances": "a self-instruct task with no instances",
    "bad_conversation": "conversations is not a list of {from, value} turns",
    "unknown_role": "a conversation turn with a role that is neither user nor assistant",
    "starts_with_assistant": "turn='first' but the conversation starts with the assistant "
                             "(turn='conversation' drops the leading assistant turns instead)",
    "single_turn": "a conversation with one turn only (no answer)",
    "no_answered_turn": "no user turn followed by an assistant turn (turn='conversation': none left after "
                        "dropping empty, leading assistant and trailing user turns)",
    "bad_csv_row": "a CSV row with more fields than the header",
    "decontaminated": "overlaps an evaluation set (not counted as quarantined: see the report)",
}
