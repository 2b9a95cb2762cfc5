"""The ``reward-model`` scorer — the paper's path: any local ``AutoModelForSequenceClassification``
folder with a single output (MoDS uses OpenAssistant/reward-model-deberta-v3-large-v2).
question = instruction (+ "\\n" + input), answer = output, score = the logit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mods.models.loading import pick_device, resolve_model_path
from mods.scoring.common import (
    as_text,
    check_lengths,
    length_batches,
    model_hash,
    resolve_precision,
    scoring_autocast,
    turn_contexts,
)

if TYPE_CHECKING:
    from mods.scoring.config import ScorerConfig

# Bumped whenever the definition of the reward-model score changes (part of mods.scoring.scorers.SCORER_VERSION).
REWARD_MODEL_VERSION = "1"


class RewardModelScorer:
    """The paper's quality score: a reward model's single logit for (question, answer)."""

    def __init__(self, config: ScorerConfig) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not config.model:
            raise ValueError(
                "the reward-model scorer needs 'model': a local folder of a sequence-classification reward model "
                "(e.g. OpenAssistant/reward-model-deberta-v3-large-v2 downloaded elsewhere)"
            )
        self.config = config
        self.path = resolve_model_path(config.model, field="quality.scorer.model")
        if not (self.path / "config.json").exists():
            raise ValueError(f"{self.path} has no config.json; it is not a saved Hugging Face model folder")
        self.device = pick_device(config.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.model = AutoModelForSequenceClassification.from_pretrained(self.path)
        except Exception as exc:  # noqa: BLE001 - re-raised with the folder named
            raise ValueError(f"cannot load {self.path} as a sequence-classification model: {exc}") from exc
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"{self.path} has num_labels={self.model.config.num_labels}; a reward model must output one "
                "score (num_labels=1)"
            )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()
        self.dtype = resolve_precision(config.precision, self.device)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "reward-model",
            "version": REWARD_MODEL_VERSION,
            "model": str(self.path),
            "model_hash": model_hash(self.path),
            "max_length": self.config.max_length,
            "precision": str(self.dtype).removeprefix("torch."),
        }

    def score(
        self,
        instructions: Sequence[str],
        inputs: Sequence[str],
        outputs: Sequence[str],
        progress: bool = True,
        contexts: Sequence[Sequence[Any]] | None = None,
    ) -> pd.DataFrame:
        """``contexts``: a conversation's messages before each row's user turn. The reward
        model then reads the whole conversation up to the answer: through its tokenizer's
        chat template when it has one (one sequence), else as the question, every earlier
        turn's text then the user turn, a blank line between them (OpenAssistant's reward
        models take a (question, answer) pair and have no template)."""
        n = check_lengths(instructions, inputs, outputs)
        before = turn_contexts(contexts, n)
        answers = [as_text(o) for o in outputs]
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        texts: list[tuple[str, ...]] = []
        for ins, inp, answer, context in zip(instructions, inputs, answers, before):
            ins, inp = as_text(ins), as_text(inp)
            question = ins + ("\n" + inp if inp.strip() else "")  # as MoDS' reference code
            if not context:
                texts.append((question, answer))
            elif templated:
                texts.append((self.tokenizer.apply_chat_template(
                    [*map(dict, context), {"role": "user", "content": question},
                     {"role": "assistant", "content": answer}], tokenize=False),))
            else:
                texts.append(("\n\n".join([*(m["content"] for m in context), question]), answer))
        encoded = [self.tokenizer(*t, truncation=True, max_length=self.config.max_length) for t in texts]
        full_len = [
            len(self.tokenizer(*t, truncation=False)["input_ids"]) if len(e["input_ids"]) >= self.config.max_length else 0
            for t, e in zip(texts, encoded)
        ]
        scores = np.full(n, np.nan, dtype=np.float64)
        batches = length_batches([len(e["input_ids"]) for e in encoded], self.config.batch_size)
        with torch.inference_mode(), scoring_autocast(self.device, self.dtype):
            for batch in tqdm(batches, desc="reward-model scoring", disable=not progress, unit="batch"):
                padded = self.tokenizer.pad([encoded[i] for i in batch], return_tensors="pt")
                padded = {k: v.to(self.device) for k, v in padded.items()}
                logits = self.model(**padded).logits.float()
                scores[batch] = logits[:, 0].cpu().numpy()
        return pd.DataFrame(
            {
                "quality_score": scores,
                "truncated": np.array([fl > self.config.max_length for fl in full_len], dtype=bool),
            }
        )
