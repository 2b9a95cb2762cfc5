"""Necessity inference: the seed model answers instructions, in batches, on one of two
engines (``generation.engine``): transformers' ``generate`` (here) or vLLM
(``mods.generation.vllm_engine``). ``open_answer_engine`` is the one way in for a caller that
answers many batches with one model (the answers stage, the evaluation's answers)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from mods.core.faults import first_line
from mods.generation import vllm_engine  # imports vLLM only when an engine starts
from mods.generation.config import EngineName, GenerationConfig
from mods.generation.tokens import chat_prompts, eos_token_ids
from mods.models.loading import pick_device, torch_dtype
from mods.training.train import load_trained_model

log = logging.getLogger("mods.generation.answers")


def vllm_installed() -> bool:
    """Whether vLLM can be imported here (``make vllm``), without importing it (seconds)."""
    return importlib.util.find_spec("vllm") is not None


def chosen_engine(config: GenerationConfig) -> EngineName:
    """The engine a config asks for; ``auto``: vLLM where it is installed and decoding is
    greedy (its beam search is not transformers'), else transformers."""
    if config.engine != "auto":
        return config.engine
    return "vllm" if config.num_beams == 1 and vllm_installed() else "transformers"


def generate_answers(
    model: Any,
    tokenizer: Any,
    instructions: Sequence[str],
    inputs: Sequence[str],
    config: GenerationConfig,
    progress: bool = True,
    contexts: Sequence[Sequence[Any]] | None = None,
) -> list[str]:
    """Deterministic answers, in input order (``contexts``: the conversation before each
    user turn, ``chat_prompts``).

    Prompts are sorted by length and left-padded, so each batch wastes little compute on
    padding and stops as soon as its longest answer is finished.
    """
    prompts = chat_prompts(tokenizer, instructions, inputs, contexts)
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    truncation_side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
    answers: list[str] = [""] * len(prompts)
    eos_ids = eos_token_ids(tokenizer)
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


class AnswerEngine(Protocol):
    """One model, ready to answer: ``answer`` any number of batches, then ``close``."""

    name: EngineName

    def answer(self, instructions: Sequence[str], inputs: Sequence[str], progress: bool = False,
               contexts: Sequence[Sequence[Any]] | None = None) -> list[str]: ...

    def close(self) -> None: ...


class TransformersAnswers:
    """``generate_answers`` on a model loaded once."""

    name: EngineName = "transformers"

    def __init__(self, model_dir: Path, config: GenerationConfig) -> None:
        self.config = config
        self.model, self.tokenizer = load_trained_model(
            model_dir, device=config.device, dtype=torch_dtype(config.dtype, pick_device(config.device)))

    def answer(self, instructions: Sequence[str], inputs: Sequence[str], progress: bool = False,
               contexts: Sequence[Sequence[Any]] | None = None) -> list[str]:
        return generate_answers(self.model, self.tokenizer, instructions, inputs, self.config, progress=progress,
                                contexts=contexts)

    def close(self) -> None:
        self.model = None


class EngineStartError(RuntimeError):
    """The generation engine the config names could not start (one line: what, and what to do)."""


def open_answer_engine(model_dir: Path, config: GenerationConfig) -> AnswerEngine:
    """The config's engine, started for the model in ``model_dir`` (a ``mods train`` output
    or a plain HF model folder). vLLM that cannot start (not installed, no memory, a model it
    does not support) is an ``EngineStartError``, or transformers when the engine is ``auto``."""
    if chosen_engine(config) == "vllm":
        try:
            if not vllm_installed():
                raise ImportError("vLLM is not installed here (make vllm)")
            return vllm_engine.VllmAnswers(Path(model_dir), config)
        except Exception as error:  # noqa: BLE001 - any start failure is one line
            if config.engine != "auto":
                raise EngineStartError(f"generation.engine vllm could not start: {first_line(error)} "
                                       "(generation.engine: transformers, or auto, runs without it)") from None
            log.warning("vLLM could not start (%s); generation.engine is auto: answering with transformers",
                        first_line(error))
    return TransformersAnswers(Path(model_dir), config)
