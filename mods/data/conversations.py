"""What a conversation is: the one definition every stage reads.

A row's conversation is a list of messages ``{"role": "system" | "user" | "assistant",
"content": str}``: an optional system message first, then user and assistant turns in
order, ending with an assistant turn. Rows ingested with ``ingest.turn: conversation``
hold a whole conversation; rows of ``first`` / ``last`` (and single-exchange shapes such
as Alpaca) hold the exchange(s) that mode keeps. Ingestion stores it in the ``messages``
column (``mods.data.schema``); ``row_messages`` also rebuilds it for rows made before that
column existed, from ``metadata.system``, ``history``, ``instruction``, ``input`` and
``output`` (the user turn joined as ``mods.data.prompts.user_message`` joins it).

Conversations written by ingestion alternate user and assistant after the system
message; ``assistant_turns`` does not rely on it (an assistant turn that follows another
assistant turn answers nothing and is not counted).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, TypedDict

from mods.data.prompts import user_message

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
# ShareGPT's names for the roles ("from" of a turn).
SHAREGPT_ROLES: dict[str, str] = {"system": "system", "user": "human", "assistant": "gpt"}


class Message(TypedDict):
    role: Role
    content: str


def _field(row: Any, name: str, default: Any = None) -> Any:
    """A column of a row given as a dict, a pandas Series or a namedtuple (itertuples)."""
    if isinstance(row, Mapping) or hasattr(row, "get"):
        value = row.get(name, default)
    else:
        value = getattr(row, name, default)
    return default if value is None or (isinstance(value, float) and value != value) else value  # NaN: absent


def _json(value: Any, default: Any) -> Any:
    if isinstance(value, str):
        return json.loads(value) if value.strip() else default
    return default if value is None else value


def exchange_messages(instruction: str, input_text: str, output: str, history: Sequence[Sequence[str]] = (),
                      system: str = "") -> list[Message]:
    """The messages of a single-exchange row: system (when not empty), the history pairs,
    then the user turn (instruction, plus input as ``user_message`` joins them) and the answer."""
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages += [{"role": "user", "content": user_message(instruction, input_text)},
                 {"role": "assistant", "content": output}]
    return messages


def column_messages(row: Any) -> list[Message]:
    """The messages a row's instruction/input/output/history/metadata.system describe (what
    ``row_messages`` gives for a row without a ``messages`` column)."""
    metadata = _json(_field(row, "metadata"), {}) or {}
    system = (metadata.get("system") or "") if isinstance(metadata, dict) else ""
    return exchange_messages(_field(row, "instruction", ""), _field(row, "input", ""), _field(row, "output", ""),
                             _json(_field(row, "history"), []), system)


def row_messages(row: Any) -> list[Message]:
    """A row's conversation: its ``messages`` column, or, for rows made before it existed
    (or where it is empty), the messages its other columns describe."""
    stored = _json(_field(row, "messages"), None)
    return list(stored) if stored else column_messages(row)


# The metadata key ingestion sets on a conversation row (``ingest.turn: conversation``, a
# conversation with more than one plain exchange: later turns or a system message).
WHOLE_CONVERSATION = "conversation"


def row_conversation(row: Any) -> list[Message] | None:
    """A conversation row's messages, else None: the row is its exchange (instruction,
    input, output), as every row of ``first`` / ``last`` and every plain one-exchange
    conversation is (and trains, scores and embeds as it always did). A conversation row is
    marked in its metadata by ingestion, or (rows from elsewhere) holds messages beyond what
    its other columns describe."""
    stored = _field(row, "messages")
    if not isinstance(stored, (str, list)) or not stored:
        return None
    messages = row_messages(row)
    metadata = _json(_field(row, "metadata"), {}) or {}
    if isinstance(metadata, dict) and metadata.get(WHOLE_CONVERSATION):
        return messages
    return messages if messages != column_messages(row) else None


class Turn(NamedTuple):
    """One answer to score or to generate, with what comes before it."""

    instruction: str
    input: str
    answer: str
    context: list[Message]  # the messages before the user turn: [] for an exchange row


def row_turns(row: Any, answer_column: str = "output", answers: Sequence[str] | None = None) -> list[Turn]:
    """The turns of a row that the scorers score and the seed model answers: for a
    conversation row each assistant turn that answers a user turn, in its real context;
    for an exchange row its one exchange (``answer_column`` its answer). ``answers``:
    other answers, one per turn, in place of the row's (the seed model's)."""
    conversation = row_conversation(row)
    if conversation is None:
        turns = [Turn(str(_field(row, "instruction", "")), str(_field(row, "input", "")),
                      str(_field(row, answer_column, "")), [])]
    else:
        turns = [Turn(conversation[i - 1]["content"], "", conversation[i]["content"], conversation[: i - 1])
                 for i in assistant_turns(conversation)]
    if answers is not None:
        if len(answers) != len(turns):
            raise ValueError(f"{len(answers)} answers for a row of {len(turns)} turns")
        turns = [turn._replace(answer=str(answer)) for turn, answer in zip(turns, answers)]
    return turns


def conversation_chars(row: Any) -> int:
    """Characters of what a row trains on: every turn of a conversation row, else
    instruction + input + output (the measure of ``sample.max_chars``)."""
    conversation = row_conversation(row)
    if conversation is None:
        return sum(len(str(_field(row, c, ""))) for c in ("instruction", "input", "output"))
    return sum(len(m["content"]) for m in conversation)


def with_conversation_cost(rows: Any, cost: Any) -> Any:
    """``cost`` (a pandas Series of characters per row, for the order of a stage's shards and
    blocks), with each conversation row's replaced by the characters of all its turns.
    Exchange rows keep theirs: the order of their blocks, hence their batches' numbers, is
    the one they always had."""
    if "metadata" not in rows.columns or rows.empty:
        return cost
    marked = rows["metadata"].astype(str).str.contains(f'"{WHOLE_CONVERSATION}": true', regex=False).to_numpy()
    if not marked.any():
        return cost
    cost = cost.copy()
    cost[marked] = [sum(len(m["content"]) for m in row_messages(r)) for r in rows[marked].to_dict("records")]
    return cost


def answer_chars(rows: Any) -> Any:
    """Characters of each row's answers (a pandas Series): every assistant turn of a
    conversation row, the output of an exchange row (the ``longest`` baseline's measure)."""
    lengths = rows["output"].fillna("").astype(str).str.len()
    if "messages" not in rows.columns:
        return lengths
    lengths = lengths.copy()
    for position, row in enumerate(rows.to_dict("records")):
        conversation = row_conversation(row)
        if conversation is not None:
            lengths.iloc[position] = sum(len(conversation[i]["content"]) for i in assistant_turns(conversation))
    return lengths


def user_turns_text(row: Any) -> str | None:
    """A conversation row's user turns, in order, a blank line between them (what the
    embedding reads of a conversation by default); None for an exchange row."""
    conversation = row_conversation(row)
    if conversation is None:
        return None
    return "\n\n".join(m["content"] for m in conversation if m["role"] == "user")


def dumps(messages: Sequence[Message]) -> str:
    """The ``messages`` column's text for a conversation."""
    return json.dumps(list(messages), ensure_ascii=False)


def assistant_turns(messages: Sequence[Message]) -> list[int]:
    """Indices of the assistant turns that answer a user turn (the turns to score or train on)."""
    return [i for i, m in enumerate(messages)
            if m["role"] == "assistant" and i > 0 and messages[i - 1]["role"] == "user"]


def truncate(messages: Sequence[Message], fits: Callable[[list[Message]], bool]) -> list[Message]:
    """The longest prefix that ends with an answer (an index of ``assistant_turns``) and that
    ``fits`` (e.g. ``lambda m: len(tokenize(m)) <= max_length``); [] when not even the first
    exchange fits. Later turns are cut, never earlier ones: a turn is read in its context."""
    best: list[Message] = []
    for i in assistant_turns(messages):
        prefix = list(messages[: i + 1])
        if not fits(prefix):
            break
        best = prefix
    return best


def to_sharegpt(messages: Sequence[Message]) -> list[dict[str, str]]:
    """ShareGPT turns: ``{"from": "system" | "human" | "gpt", "value": ...}``."""
    return [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in messages]


def to_alpaca(messages: Sequence[Message]) -> dict[str, Any]:
    """LLaMA-Factory's Alpaca form of a conversation: the last exchange as instruction/output,
    the earlier user/assistant pairs as ``history``, the system message as ``system``.
    Assumes alternating turns (as ingestion writes them)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    pairs = [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns) - 1, 2)]
    record: dict[str, Any] = {"instruction": pairs[-1][0] if pairs else "", "input": "",
                              "output": pairs[-1][1] if pairs else ""}
    if len(pairs) > 1:
        record["history"] = pairs[:-1]
    if system:
        record["system"] = system
    return record
