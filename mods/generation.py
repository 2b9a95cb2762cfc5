"""Necessity inference: the seed model answers instructions, in batches."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from mods.prompts import chat_prompt


class GenerationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(
        64, ge=1, description="Answer length cap (paper: 1,024 with 4 beams, on GPU)."
    )
    num_beams: int = Field(1, ge=1, description="1 = greedy (fast); the paper used 4.")
    batch_size: int = Field(16, ge=1, description="Prompts per generate() call.")
    max_prompt_length: int = Field(256, ge=8, description="Prompt tokens kept (the end is kept).")
    device: str | None = Field(None, description="'cpu', 'cuda', or empty for automatic.")


def generate_answers(
    model: Any,
    tokenizer: Any,
    instructions: Sequence[str],
    inputs: Sequence[str],
    config: GenerationConfig,
    progress: bool = True,
) -> list[str]:
    """Deterministic answers, in input order.

    Prompts are sorted by length and left-padded, so each batch wastes little compute on
    padding and stops as soon as its longest answer is finished.
    """
    if len(instructions) != len(inputs):
        raise ValueError("instructions and inputs must have the same length")
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    truncation_side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    prompts = [chat_prompt(tokenizer, i, x) for i, x in zip(instructions, inputs)]
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
    answers: list[str] = [""] * len(prompts)
    eos_ids = [t for t in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} if isinstance(t, int) and t >= 0]
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress)
    try:
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            encoded = tokenizer(
                [prompts[i] for i in batch],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=config.max_prompt_length,
                add_special_tokens=False,
            ).to(device)
            with torch.inference_mode():
                generated = model.generate(
                    **encoded,
                    max_new_tokens=config.max_new_tokens,
                    num_beams=config.num_beams,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=eos_ids or None,
                )
            new_tokens = generated[:, encoded["input_ids"].shape[1] :]
            for row, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                answers[row] = text.strip()
            bar.update(len(batch))
    finally:
        tokenizer.truncation_side = truncation_side
        bar.close()
    return answers
