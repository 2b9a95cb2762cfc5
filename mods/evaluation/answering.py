"""Every model's answers to the test prompts, and where a prompt has a reference answer,
the reference's mean per-token log-likelihood under the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mods.generation.answers import TransformersAnswers, open_answer_engine
from mods.generation.config import GenerationConfig
from mods.training.data import collate, encode_rows
from mods.training.train import load_trained_model


def reference_loglik(model: Any, tokenizer: Any, frame: pd.DataFrame, max_length: int, batch_size: int = 8) -> np.ndarray:
    """Mean per-token log-likelihood of each row's ``reference`` answer after its prompt.

    The tokens and the masking are the training loss's (``mods.training.data.encode_rows``: the
    model's prompt format, the answer plus its end-of-answer token, prompt tokens not scored),
    so it reads as "how likely this model finds the reference", minus the training loss."""
    import torch

    rows = pd.DataFrame({"instruction": frame["instruction"].astype(str), "input": frame["input"].astype(str),
                         "output": frame["reference"].astype(str)})
    encoded = encode_rows(tokenizer, rows, max_length)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = np.full(len(encoded), np.nan)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            tensors = {k: v.to(device) for k, v in collate([encoded[i] for i in batch], pad).items()}
            logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits.float()
            labels = tensors["labels"][:, 1:]
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            scored = labels != -100
            token_lp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * scored
            means = token_lp.sum(-1) / scored.sum(-1).clamp(min=1)
            for row, value, count in zip(batch, means.cpu().numpy(), scored.sum(-1).cpu().numpy()):
                out[row] = float(value) if count else np.nan
    return out


def answer_prompts(model_dir: Path, prompts: pd.DataFrame, generation: GenerationConfig, reference_max_length: int,
                   progress: bool = True) -> pd.DataFrame:
    """One model's answers to the prompts marked ``answer`` and its reference log-likelihood
    on those marked ``reference_loglik``: columns test_set, prompt_id, answer, reference_loglik."""
    answers = pd.Series([None] * len(prompts), dtype=object)
    todo = prompts.index[prompts["answer"]].tolist()
    with_reference = prompts.index[prompts["reference_loglik"]].tolist()
    loglik = np.full(len(prompts), np.nan)
    engine = open_answer_engine(model_dir, generation) if todo else None
    try:
        if engine is not None:
            answers.loc[todo] = engine.answer(prompts.loc[todo, "instruction"].tolist(),
                                              prompts.loc[todo, "input"].tolist(), progress=progress)
        if with_reference:
            # The likelihood is transformers' forward pass, whichever engine answered.
            model, tokenizer = ((engine.model, engine.tokenizer) if isinstance(engine, TransformersAnswers)
                                else load_trained_model(model_dir, device=generation.device))
            loglik[with_reference] = reference_loglik(model, tokenizer, prompts.loc[with_reference],
                                                      reference_max_length, batch_size=generation.batch_size)
    finally:
        if engine is not None:
            engine.close()
    return pd.DataFrame({"test_set": prompts["test_set"], "prompt_id": prompts["prompt_id"], "answer": answers,
                         "reference_loglik": loglik})
