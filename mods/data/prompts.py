"""How an (instruction, input) pair becomes a prompt, and a conversation a text.

One place, so that quality scoring, training and necessity generation all see the
same text: a model fine-tuned on one format and scored on another would be judged
on formatting, not on content.

With a chat template the tokenizer's template renders prompts and conversations. Without
one (base models, tiny test models) the plain Alpaca-style format is used; a conversation
extends it turn by turn (``plain_system``, ``plain_prompt``, ``PLAIN_TURN_SEPARATOR``)::

    {system}\n\n                                      (when there is a system message)
    ### Instruction:\n{user 1}\n\n### Response:\n{assistant 1}{eos}
    \n\n### Instruction:\n{user 2}\n\n### Response:\n{assistant 2}{eos}

so a single exchange is exactly ``chat_prompt`` + answer + ``answer_suffix``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def user_message(instruction: str, input_text: str | None = None) -> str:
    """The user turn: the instruction, plus a blank line and the input when there is one.

    MoDS' reference code scores ``instruction + "\\n" + input``; we keep that order.
    """
    instruction = instruction.strip()
    input_text = (input_text or "").strip()
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def chat_prompt(tokenizer: Any, instruction: str, input_text: str | None = None,
                context: Sequence[Mapping[str, str]] = ()) -> str:
    """The text the model sees before its answer.

    Uses the tokenizer's chat template when it has one (instruct models such as
    SmolLM2), else an Alpaca-style plain prompt (base models, tiny test models).
    ``context``: the messages of the conversation before this user turn (a system message,
    earlier user/assistant turns), rendered as training renders them (the module docstring;
    ``mods.training.data.conversation_pieces``); empty for a single exchange.
    """
    message = user_message(instruction, input_text)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [*map(dict, context), {"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
    return plain_context(tokenizer, context) + plain_prompt(message)


def plain_context(tokenizer: Any, context: Sequence[Mapping[str, str]]) -> str:
    """The messages before a user turn in the plain format, up to where that turn starts."""
    text = ""
    for message in context:
        if message["role"] == "system":
            text += plain_system(message["content"])
        elif message["role"] == "user":
            text += plain_prompt(message["content"])
        else:
            text += message["content"] + answer_suffix(tokenizer) + PLAIN_TURN_SEPARATOR
    return text


# Between an answer (closed by its end-of-answer token) and the next user turn, plain format.
PLAIN_TURN_SEPARATOR = "\n\n"


def plain_prompt(message: str) -> str:
    """A user turn and the response header in the plain (template-less) format."""
    return f"### Instruction:\n{message}\n\n### Response:\n"


def plain_system(system: str) -> str:
    """A system message in the plain format: its text, then a blank line."""
    return f"{system}\n\n"


def answer_suffix(tokenizer: Any) -> str:
    """What closes an answer in training text: the end-of-sequence token, so the model
    learns to stop (and the likelihood scorer can ask whether an answer is finished)."""
    return tokenizer.eos_token or ""
