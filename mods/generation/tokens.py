"""What both engines feed the model and where they stop: each answer's prompt token ids
(``prompt_token_ids``) and the end-of-turn ids (``eos_token_ids``)."""

from __future__ import annotations

from typing import Any, Sequence

from mods.data.prompts import chat_prompt


def eos_token_ids(tokenizer: Any) -> list[int]:
    """Where an answer stops: the end-of-sequence token and the chat turn's end, <|im_end|>."""
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    return sorted(t for t in ids if isinstance(t, int) and t >= 0)


def chat_prompts(tokenizer: Any, instructions: Sequence[str], inputs: Sequence[str],
                 contexts: Sequence[Sequence[Any]] | None = None) -> list[str]:
    """The prompt of each answer to generate: ``chat_prompt`` of its user turn, after its
    conversation so far (``contexts``, one list of messages per prompt; none: single exchanges)."""
    if len(instructions) != len(inputs) or (contexts is not None and len(contexts) != len(inputs)):
        raise ValueError("instructions, inputs and contexts must have the same length")
    before = contexts if contexts is not None else [()] * len(instructions)
    return [chat_prompt(tokenizer, i, x, c) for i, x, c in zip(instructions, inputs, before)]


def prompt_token_ids(tokenizer: Any, instructions: Sequence[str], inputs: Sequence[str],
                     max_prompt_length: int, contexts: Sequence[Sequence[Any]] | None = None) -> list[list[int]]:
    """Each prompt's token ids as ``generate_answers`` feeds them: the chat prompt, its last
    ``max_prompt_length`` tokens (a long conversation keeps the turns nearest the answer)."""
    truncation_side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        prompts = chat_prompts(tokenizer, instructions, inputs, contexts)
        return tokenizer(prompts, truncation=True, max_length=max_prompt_length,
                         add_special_tokens=False)["input_ids"]
    finally:
        tokenizer.truncation_side = truncation_side
