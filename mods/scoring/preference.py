"""The ``preference`` scorer — offline, calibrated to human judgements: per-row features from the
same SmolLM2 passes (total surprisal, log-probabilities, a yes/no judge question),
MiniLM similarities between the answer and the instruction / input, and pure-Python
text statistics (copying the input, repetition, format), combined by a linear
Bradley-Terry head fitted on PandaLM's human-labelled pairs
(``mods/scoring/quality_head.json``; ``benchmarks/quality_scorer.py --fit``). The score is in
logits of "people prefer this answer": the difference of two rows' scores is the
head's log-odds that people prefer the first. See docs/scoring.md.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from mods.data.prompts import user_message
from mods.models.embedding import resolve_embedding_model
from mods.scoring.common import FeatureScorer, as_text, check_lengths, model_hash
from mods.scoring.likelihood import EMPTY_SCORE, END_FILL, END_FLOOR, LikelihoodScorer

if TYPE_CHECKING:
    from mods.scoring.config import ScorerConfig

# Bumped whenever the definition of the preference score changes (part of mods.scoring.scorers.SCORER_VERSION).
PREFERENCE_VERSION = "1"
# The preference scorer's fitted head, shipped with the package (benchmarks/quality_scorer.py --fit).
PREFERENCE_HEAD_FILE = Path(__file__).with_name("quality_head.json")

# Asked after the answer, in the same conversation (LikelihoodScorer's judge).
JUDGE_QUESTION = "Was your answer correct, complete and helpful? Answer yes or no."

_WORDS = re.compile(r"\w+")
_LIST_LINE = re.compile(r"^\s*(\d+[.)]|[-*\u2022])\s+")
_REFUSAL = re.compile(
    r"\b(i'?m sorry|i am sorry|i cannot|i can'?t|i am unable|i'?m unable|as an ai|i do not know|i don'?t know)\b",
    re.IGNORECASE,
)


def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def text_features(instruction: str, input_text: str, output: str) -> dict[str, float]:
    """Pure-Python statistics of one answer that are not its length.

    copy_input: share of the answer's word 4-grams found in the input (an answer that
    repeats its input instead of working on it); repeated_trigrams: share of the answer's
    word 3-grams that are repeats (loops); distinct_words: distinct / all words;
    lines: log(1 + non-blank lines); list_lines: share of lines that are list items;
    digits: share of characters that are digits; ends_sentence: the answer ends with
    closing punctuation (not cut off); refusal: an apology or refusal phrase.
    """
    words = [w.lower() for w in _WORDS.findall(output)]
    lines = [line for line in output.splitlines() if line.strip()]
    grams4 = _ngrams(words, 4)
    source4 = set(_ngrams([w.lower() for w in _WORDS.findall(input_text)], 4))
    grams3 = _ngrams(words, 3)
    stripped = output.rstrip()
    return {
        "copy_input": sum(g in source4 for g in grams4) / len(grams4) if grams4 else 0.0,
        "repeated_trigrams": 1.0 - len(set(grams3)) / len(grams3) if grams3 else 0.0,
        "distinct_words": len(set(words)) / len(words) if words else 0.0,
        "lines": math.log1p(len(lines)),
        "list_lines": sum(bool(_LIST_LINE.match(line)) for line in lines) / len(lines) if lines else 0.0,
        "digits": sum(c.isdigit() for c in output) / len(output) if output else 0.0,
        "ends_sentence": float(stripped[-1:] in tuple(".!?)\"'`]}")) if stripped else 0.0,
        "refusal": float(bool(_REFUSAL.search(output))),
    }


class PreferenceHead(BaseModel):
    """A linear Bradley-Terry head: score = Σ weight · (feature − mean) / scale.

    Means and scales are fixed numbers from the fit (never recomputed from the rows being
    scored), so every row's score depends on that row alone."""

    model_config = ConfigDict(extra="allow")

    features: list[str]
    mean: list[float]
    scale: list[float]
    weights: list[float]

    def apply(self, frame: pd.DataFrame) -> np.ndarray:
        missing = [f for f in self.features if f not in frame.columns]
        if missing:
            raise ValueError(f"preference head needs features {missing}, which the scorer did not compute")
        x = frame[self.features].to_numpy(dtype=np.float64)
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        return z @ np.asarray(self.weights)


def load_preference_head(path: Path = PREFERENCE_HEAD_FILE) -> PreferenceHead:
    if not path.is_file():
        raise ValueError(f"the preference scorer's head {path} is missing (run benchmarks/quality_scorer.py --fit)")
    head = PreferenceHead.model_validate_json(path.read_text())
    n = len(head.features)
    if not (len(head.mean) == len(head.scale) == len(head.weights) == n) or min(head.scale, default=1) <= 0:
        raise ValueError(f"{path}: features, mean, scale and weights must have one length and positive scales")
    return head


class PreferenceScorer(FeatureScorer):
    """Offline scorer calibrated to human preference pairs (module docstring).

    Features per row (all columns of ``features``):

    * from SmolLM2 (LikelihoodScorer's two passes, plus the judge question read off the
      conditional pass): ``lp_answer``, ``lp_answer_neutral``, ``pmi``, ``lp_end``,
      ``answer_tokens``, ``judge``; derived: ``info`` = total surprisal of the answer in
      nats (−lp_answer × answer_tokens: how much the answer says that the model could not
      guess), ``log_info`` = log(1 + info), ``lp_end_clipped`` (as the likelihood score);
    * from MiniLM: ``sim_question`` (answer vs instruction + input), ``sim_instruction``
      (answer vs instruction alone), ``sim_input`` (answer vs the input, or the instruction
      when there is none);
    * ``text_features``.

    The head (``mods/scoring/quality_head.json``) picks its features from these by name.
    """

    def __init__(self, config: ScorerConfig, head: PreferenceHead | None = None) -> None:
        self.config = config
        self.head = head or load_preference_head()
        needs = set(self.head.features)
        self.lm = LikelihoodScorer(
            config,
            judge_question=JUDGE_QUESTION if "judge" in needs else None,
            neutral=bool(needs & {"lp_answer_neutral", "pmi"}),
        )
        self.path, self.device, self.dtype = self.lm.path, self.lm.device, self.lm.dtype
        self.embedder = None
        if needs & {"sim_question", "sim_instruction", "sim_input"}:
            from sentence_transformers import SentenceTransformer

            self.embedding_path = Path(resolve_embedding_model(config.embedding_model))
            self.embedder = SentenceTransformer(str(self.embedding_path), device=str(self.device))

    def fingerprint(self) -> dict[str, Any]:
        fp = {
            **self.lm.fingerprint(),
            "kind": "preference",
            "version": PREFERENCE_VERSION,
            "judge_question": self.lm.judge_question,
            "neutral_pass": self.lm.neutral,
            "head": hashlib.sha256(self.head.model_dump_json().encode()).hexdigest()[:16],
        }
        del fp["weights"]  # the likelihood score's weights play no part here
        if self.embedder is not None:
            fp["embedding_model"] = str(self.embedding_path)
            fp["embedding_model_hash"] = model_hash(self.embedding_path)
        return fp

    def _similarities(self, instructions: list[str], inputs: list[str], outputs: list[str]) -> pd.DataFrame:
        # Each distinct text is embedded once (instructions repeat across a pool's rows).
        texts = list(dict.fromkeys([*instructions, *(user_message(a, b) for a, b in zip(instructions, inputs)),
                                    *(b or a for a, b in zip(instructions, inputs)), *outputs]))
        vectors = self.embedder.encode(texts, batch_size=self.config.batch_size, convert_to_numpy=True,
                                       normalize_embeddings=True, show_progress_bar=False)
        at = {t: i for i, t in enumerate(texts)}

        def cos(left: list[str], right: list[str]) -> np.ndarray:
            a = vectors[[at[t] for t in left]].astype(np.float64)
            b = vectors[[at[t] for t in right]].astype(np.float64)
            return (a * b).sum(axis=1)

        return pd.DataFrame({
            "sim_question": cos([user_message(a, b) for a, b in zip(instructions, inputs)], outputs),
            "sim_instruction": cos(instructions, outputs),
            "sim_input": cos([b or a for a, b in zip(instructions, inputs)], outputs),
        })

    def features(
        self,
        instructions: Sequence[str],
        inputs: Sequence[str],
        outputs: Sequence[str],
        progress: bool = True,
        contexts: Sequence[Sequence[Any]] | None = None,
    ) -> pd.DataFrame:
        """Every feature the head may use, one row per input row (no quality_score).
        ``contexts``: the conversation before each user turn, read by SmolLM2's passes; the
        similarities and text statistics compare the answer with its own user turn."""
        n = check_lengths(instructions, inputs, outputs)
        ins = [as_text(x) for x in instructions]
        inp = [as_text(x) for x in inputs]
        out = [as_text(x) for x in outputs]
        feats = self.lm.features(ins, inp, out, progress=progress, contexts=contexts)
        feats["info"] = -feats["lp_answer"].fillna(0.0) * feats["answer_tokens"]
        feats["log_info"] = np.log1p(feats["info"].clip(lower=0.0))
        feats["lp_end_clipped"] = feats["lp_end"].fillna(END_FILL).clip(lower=END_FLOOR, upper=0.0)
        # Columns named explicitly: an empty block (necessity with nothing left) still has them.
        text = pd.DataFrame([text_features(a, b, c) for a, b, c in zip(ins, inp, out)], index=range(n),
                            columns=list(text_features("", "", "")), dtype=np.float64)
        feats = pd.concat([feats, text], axis=1)
        if self.embedder is not None:
            similarities = (self._similarities(ins, inp, out) if n else
                            pd.DataFrame(columns=["sim_question", "sim_instruction", "sim_input"], dtype=np.float64))
            feats = pd.concat([feats, similarities], axis=1)
        return feats

    def combine(self, features: pd.DataFrame) -> pd.Series:
        """quality_score from the features: the head's logit, EMPTY_SCORE for an empty answer."""
        q = pd.Series(self.head.apply(features.fillna({c: 0.0 for c in self.head.features})), index=features.index)
        return q.where(features["answer_tokens"] > 0, EMPTY_SCORE).astype(np.float64)
