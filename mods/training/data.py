"""Training rows as token ids: a row's conversation with the loss on its answers only,
and micro-batches padded into tensors.

**What a row trains on** (``training_messages``). A conversation row (``ingest.turn:
conversation``: its ``messages`` hold more than its instruction/input/output/history/
``metadata.system`` describe, ``mods.data.conversations.column_messages``) trains on its whole
conversation. Every other row trains on its exchange: the user turn (instruction and
input, joined as ``mods.data.prompts.user_message`` joins them) and ``output``, as rows always
did; the system prompt and history of a ``first`` / ``last`` row stay out, as before, so
those runs train exactly as they did. (A conversation row of one exchange is the row
``first`` gives, and trains the same way.)

**Tokens and labels** (``conversation_pieces``, ``encode_conversation``). One piece per
assistant turn that answers a user turn (``mods.data.conversations.assistant_turns``): its
*context*, every token since the previous answer (system message, user turns, the
template's scaffolding up to and including the assistant header, e.g.
``<|im_start|>assistant\\n``), label -100; and its *answer*, the turn's content and the
end-of-turn text the model must learn to emit, labels = ids. With a chat template the
texts come from the template itself, rendered prefix by prefix: ``messages[:i]`` with the
generation prompt, then ``messages[:i + 1]``; each rendering must extend the previous one
(else ``ValueError``: the template rewrites earlier turns). The end of turn is the
template's text after the content up to and including the eos token (``<|im_end|>`` for
SmolLM2; the rest of the template's closing text when it has no eos). Without a template
the plain format of ``mods.data.prompts`` is used, each answer closed by ``answer_suffix``
(the eos token). Each piece is tokenised on its own, as a prompt and the answer generated
after it are at inference, and the pieces are concatenated; the template's text after
the last answer (the ``\\n`` after ``<|im_end|>``) is left out: nothing to learn from it.
A single exchange is one piece, ``chat_prompt`` + output + eos: the ids and labels a row
always had.

**Truncation to ``max_length``.** Whole turns from the start
(``mods.data.conversations.truncate``): the longest prefix of the conversation that ends with
an answer and fits. Later turns are cut, never earlier ones (a turn is read in the context
of the turns before it), and never the middle of an answer (every answer trained on is
whole, with its end-of-turn token). When not even the first exchange fits, it is cut as
single exchanges always were: the end of its context (closest to the answer) and the start
of its answer, at least a quarter of ``max_length`` for the answer, so that no row trains
on nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pandas as pd
import torch

from mods.data.conversations import Message, assistant_turns, dumps, exchange_messages, row_conversation, truncate
from mods.data.prompts import PLAIN_TURN_SEPARATOR, answer_suffix, plain_prompt, plain_system

# What training reads of an exchange row (and so what a model trained on exchanges depends on);
# a conversation row's ``messages`` besides (``training_key_frame``).
TRAINING_COLUMNS = ("instruction", "input", "output")


@dataclass
class EncodedRow:
    input_ids: list[int]
    labels: list[int]


def training_messages(row: Mapping[str, Any]) -> list[Message]:
    """What a row trains on: a conversation row's conversation, else its exchange."""
    conversation = row_conversation(row)
    if conversation is not None:
        return conversation
    return exchange_messages(row["instruction"], row["input"], str(row["output"]))


def training_key_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Everything training reads of ``frame``, for artifact keys: TRAINING_COLUMNS and, when
    some rows are conversation rows, a ``messages`` column with their conversations ("" for
    the other rows), so that a set of exchange rows keeps the key it always had."""
    key = frame[list(TRAINING_COLUMNS)]
    if "messages" not in frame.columns:
        return key
    conversations = [row_conversation(row) for row in frame.to_dict("records")]
    if all(c is None for c in conversations):
        return key
    return key.assign(messages=["" if c is None else dumps(c) for c in conversations])


def _plain_pieces(tokenizer: Any, messages: Sequence[Message]) -> list[tuple[str, str]]:
    suffix = answer_suffix(tokenizer)
    answered = set(assistant_turns(messages))
    pieces: list[tuple[str, str]] = []
    context = ""
    for i, message in enumerate(messages):
        if message["role"] == "system":
            context += plain_system(message["content"])
        elif message["role"] == "user":
            after_answer = i > 0 and messages[i - 1]["role"] == "assistant"
            context += (PLAIN_TURN_SEPARATOR if after_answer else "") + plain_prompt(message["content"])
        elif i in answered:
            pieces.append((context, message["content"] + suffix))
            context = ""
        else:  # an assistant turn that answers nothing: context only
            context += message["content"] + suffix
    return pieces


def _render(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def _template_pieces(tokenizer: Any, messages: Sequence[Message]) -> list[tuple[str, str]]:
    eos = tokenizer.eos_token or ""
    pieces: list[tuple[str, str]] = []
    done = ""  # the rendered text the pieces so far cover
    for i in assistant_turns(messages):
        prompt = _render(tokenizer, messages[:i], True)
        through = _render(tokenizer, messages[: i + 1], False)
        if not prompt.startswith(done) or not through.startswith(prompt):
            raise ValueError("the chat template does not render a conversation turn by turn (a rendering of its "
                             f"first {i + 1} messages does not extend that of the first {i}): cannot tell which "
                             "tokens are the assistant's")
        turn, content = through[len(prompt):], messages[i]["content"]
        at = turn.find(content)
        if at < 0:
            content = content.strip()
            at = turn.find(content)
        if at < 0:
            raise ValueError(f"the chat template does not render assistant turn {i + 1} verbatim")
        closing = turn[at + len(content):]
        end = closing.index(eos) + len(eos) if eos and eos in closing else len(closing.rstrip())
        pieces.append((prompt[len(done):] + turn[:at], content + closing[:end]))
        done = prompt + turn[: at + len(content) + end]
    return pieces


def conversation_pieces(tokenizer: Any, messages: Sequence[Message]) -> list[tuple[str, str]]:
    """(context, answer) texts, one pair per answered assistant turn (module docstring)."""
    if getattr(tokenizer, "chat_template", None):
        return _template_pieces(tokenizer, messages)
    return _plain_pieces(tokenizer, messages)


def _token_pieces(tokenizer: Any, messages: Sequence[Message]) -> list[tuple[list[int], list[int]]]:
    pieces = conversation_pieces(tokenizer, messages)
    if not pieces:
        raise ValueError("a conversation without an assistant turn that answers a user turn: nothing to train on")
    return [(tokenizer(context, add_special_tokens=False)["input_ids"],
             tokenizer(answer, add_special_tokens=False)["input_ids"]) for context, answer in pieces]


def _cut_exchange(prompt_ids: list[int], answer_ids: list[int], max_length: int) -> EncodedRow:
    """One exchange in ``max_length``: the end of the prompt, the start of the answer (at
    least a quarter of ``max_length`` for it); unchanged when it fits."""
    max_prompt = max_length - min(len(answer_ids), max(1, max_length // 4))
    if len(prompt_ids) > max_prompt:
        prompt_ids = prompt_ids[-max_prompt:]
    answer_ids = answer_ids[: max_length - len(prompt_ids)]
    return EncodedRow(prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids)


def encode_conversation(tokenizer: Any, messages: Sequence[Message], max_length: int) -> EncodedRow:
    """A conversation's ids and labels, truncated to ``max_length`` (module docstring)."""
    pieces = _token_pieces(tokenizer, messages)
    turns = assistant_turns(messages)
    ends, total = {}, 0
    for turn, (context, answer) in zip(turns, pieces):
        total += len(context) + len(answer)
        ends[turn] = total
    kept = len(truncate(messages, lambda prefix: ends[len(prefix) - 1] <= max_length))
    whole = sum(1 for turn in turns if turn < kept)
    if whole == 0:
        return _cut_exchange(*pieces[0], max_length)
    ids: list[int] = []
    labels: list[int] = []
    for context, answer in pieces[:whole]:
        ids += context + answer
        labels += [-100] * len(context) + answer
    return EncodedRow(ids, labels)


def conversation_token_count(tokenizer: Any, messages: Sequence[Message]) -> int:
    """A conversation's tokens in training, untruncated."""
    return sum(len(context) + len(answer) for context, answer in _token_pieces(tokenizer, messages))


def encode_rows(tokenizer: Any, frame: pd.DataFrame, max_length: int) -> list[EncodedRow]:
    """Every row of ``frame`` (instruction, input, output; and messages, metadata, history
    for conversation rows) as ids and labels: ``encode_conversation`` of ``training_messages``.

    An exchange row gives prompt + answer + end-of-answer token, the loss on the answer only;
    an over-long one keeps the end of the prompt and the start of the answer."""
    return [encode_conversation(tokenizer, training_messages(row), max_length) for row in frame.to_dict("records")]


def collate(rows: Sequence[EncodedRow], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
