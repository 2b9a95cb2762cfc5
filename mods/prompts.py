"""How an (instruction, input) pair becomes a prompt.

One place, so that quality scoring, training and necessity generation all see the
same text: a model fine-tuned on one format and scored on another would be judged
on formatting, not on content.
"""

from __future__ import annotations

from typing import Any


def user_message(instruction: str, input_text: str | None = None) -> str:
    """The user turn: the instruction, plus a blank line and the input when there is one.

    MoDS' reference code scores ``instruction + "\\n" + input``; we keep that order.
    """
    instruction = instruction.strip()
    input_text = (input_text or "").strip()
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def chat_prompt(tokenizer: Any, instruction: str, input_text: str | None = None) -> str:
    """The text the model sees before its answer.

    Uses the tokenizer's chat template when it has one (instruct models such as
    SmolLM2), else an Alpaca-style plain prompt (base models, tiny test models).
    """
    message = user_message(instruction, input_text)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
    return f"### Instruction:\n{message}\n\n### Response:\n"


def answer_suffix(tokenizer: Any) -> str:
    """What closes an answer in training text: the end-of-sequence token, so the model
    learns to stop (and the likelihood scorer can ask whether an answer is finished)."""
    return tokenizer.eos_token or ""
