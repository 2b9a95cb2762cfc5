"""Judges: which of two answers to one prompt is better, and how far a judge can be trusted.

Two judges, both local and offline:

* **pairwise LLM judge** (``LLMJudge``): any local causal LM reads the paper's judging
  prompt (the Vicuna/Cherry-LLM prompt MoDS used with GPT-4) and writes the first line
  it asks for, "score_1 score_2" on a 1-10 scale. Decoding is greedy and constrained to
  that line, so a small judge cannot fail the format; this is temperature-0 decoding of
  the same reply the paper parses. Each pair is judged in both orders and counted the
  paper's way (``paper_outcome``).
* **scorer judge** (``scorer_outcomes``): the configured quality scorer scores both
  answers; a gap below ``tie_margin`` is a tie. A pointwise scorer has no order, so one
  pass is enough.

Either is measured against people with ``judge_agreement`` on PandaLM's human votes
(``mods.evaluation.preferences``): a win/tie/lose table means little when its judge agrees with
people no better than a coin.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from mods.data.prompts import user_message
from mods.evaluation.preferences import agreement
from mods.models.loading import DEFAULT_BASE_MODEL, load_causal_lm, pick_device, resolve_model_path
from mods.scoring.common import model_hash

Outcome = Literal["win", "tie", "lose"]
OUTCOMES: tuple[Outcome, ...] = ("win", "tie", "lose")

# The paper's judging prompt (Vicuna's pairwise review prompt, as MoDS and Cherry LLM send it to GPT-4).
JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_TEMPLATE = (
    "[Question]\n{question}\n\n"
    "[The Start of Assistant 1's Answer]\n{answer_1}\n\n[The End of Assistant 1's Answer]\n\n"
    "[The Start of Assistant 2's Answer]\n{answer_2}\n\n[The End of Assistant 2's Answer]\n\n"
    "[System]\n{criteria}\n\n"
)
JUDGE_CRITERIA = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above.\nPlease rate the helpfulness, relevance, accuracy, level of details of their "
    "responses. Each assistant receives an overall score on a scale of 1 to 10, where a higher score indicates "
    "better overall performance.\nPlease first output a single line containing only two values indicating the "
    "scores for Assistant 1 and 2, respectively. The two scores are separated by a space. In the subsequent "
    "line, please provide a comprehensive explanation of your evaluation, avoiding any potential bias and "
    "ensuring that the order in which the responses were presented does not affect your judgment."
)

# A rater takes (questions, first answers, second answers) and returns, per item, the
# (score of the first, score of the second), or None when no score could be read.
Rater = Callable[[Sequence[str], Sequence[str], Sequence[str]], list[tuple[float, float] | None]]


class LLMJudgeConfig(BaseModel):
    """The pairwise LLM judge (a Prefect UI form)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(
        DEFAULT_BASE_MODEL,
        description=f"Judge model: '{DEFAULT_BASE_MODEL}' (packaged, offline; weak), a local HF causal-LM folder or a hub id, "
        "e.g. a Qwen2.5-7B-Instruct or Llama-3-8B-Instruct download for a GPU run.",
    )
    max_question_tokens: int = Field(256, ge=8, description="Question tokens shown to the judge (longer: cut).")
    max_answer_tokens: int = Field(256, ge=8, description="Tokens of each answer shown to the judge (longer: cut).")
    batch_size: int = Field(8, ge=1, description="Judge prompts per forward pass.")
    device: str | None = Field(None, description="'cpu', 'cuda', or empty for automatic.")


def judge_prompt(question: str, answer_1: str, answer_2: str) -> tuple[str, str]:
    """(system, user) messages of the paper's judging prompt."""
    return JUDGE_SYSTEM, JUDGE_TEMPLATE.format(question=question, answer_1=answer_1, answer_2=answer_2,
                                               criteria=JUDGE_CRITERIA)


def parse_scores(review: str) -> tuple[float, float] | None:
    """The paper's reading of a review: its first line holds two numbers, space- or comma-separated."""
    first = review.strip().split("\n")[0].replace(",", " ").split()
    if len(first) != 2:
        return None
    try:
        return float(first[0]), float(first[1])
    except ValueError:
        return None


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def paper_outcome(scores_ab: tuple[float, float] | None, scores_ba: tuple[float, float] | None) -> Outcome:
    """A's result from two reviews: A shown first (scores_ab = (A, B)), then B shown first
    (scores_ba = (B, A)). The paper counts a win when A wins both orders or wins one and ties
    the other, a tie when both orders tie or each model wins one, and a loss otherwise, i.e.
    the sign of the summed per-order preferences. An unreadable review counts as a tie
    (the paper's parser gives [-1, -1] for it)."""
    first = _sign(scores_ab[0] - scores_ab[1]) if scores_ab else 0
    second = _sign(scores_ba[1] - scores_ba[0]) if scores_ba else 0
    total = first + second
    return "win" if total > 0 else "lose" if total < 0 else "tie"


def judge_both_orders(questions: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str],
                      rate: Rater) -> pd.DataFrame:
    """Every pair judged with A first and with B first; one row per pair with both
    reviews' scores and A's outcome."""
    if not len(questions) == len(answers_a) == len(answers_b):
        raise ValueError("questions, answers_a and answers_b must have the same length")
    n = len(questions)
    # One call for both orders: the rater batches across them.
    scores = rate(list(questions) * 2, list(answers_a) + list(answers_b), list(answers_b) + list(answers_a))
    ab, ba = scores[:n], scores[n:]
    return pd.DataFrame({
        "a_first_scores": [list(s) if s else None for s in ab],
        "b_first_scores": [list(s) if s else None for s in ba],
        "outcome": [paper_outcome(x, y) for x, y in zip(ab, ba)],
    })


def scorer_outcomes(score_a: Sequence[float], score_b: Sequence[float], tie_margin: float) -> list[Outcome]:
    """A's outcome per pair from two pointwise scores: within ``tie_margin`` is a tie."""
    a = np.asarray(score_a, dtype=np.float64)
    b = np.asarray(score_b, dtype=np.float64)
    gap = np.nan_to_num(a - b, nan=0.0)  # an unscorable answer decides nothing
    return ["tie" if abs(g) < tie_margin or g == 0 else "win" if g > 0 else "lose" for g in gap]


def count_outcomes(outcomes: Sequence[str]) -> dict[str, int]:
    unknown = set(outcomes) - set(OUTCOMES)
    if unknown:
        raise ValueError(f"unknown outcomes {sorted(unknown)}")
    return {name: int(sum(1 for o in outcomes if o == name)) for name in OUTCOMES}


def winning_score(win: int, tie: int, lose: int) -> float | None:
    """Cherry LLM's summary of a table: (win - lose) / total + 1; 1.0 = even, above = A better."""
    total = win + tie + lose
    return (win - lose) / total + 1 if total else None


def judge_agreement(outcomes: Sequence[str], human: Sequence[int]) -> dict[str, Any]:
    """How often a judge's verdict matches people's: ``outcomes`` are the judge's results
    for answer A ("win" = A better), ``human`` the people's choice (0 = A, 1 = B). A judge's
    tie counts as half a match, as in ``mods.evaluation.preferences.agreement`` (the project's one
    definition): a judge that calls everything a tie sits at 50%, never above.
    ``agreement_decided`` leaves the judge's ties out, ``tie_rate`` says how many there were."""
    if len(outcomes) != len(human):
        raise ValueError("outcomes and human must have the same length")
    # Outcomes as scores, so that the project's one agreement definition applies.
    score_a = np.array([1.0 if o == "win" else 0.0 for o in outcomes])
    score_b = np.array([1.0 if o == "lose" else 0.0 for o in outcomes])
    human_arr = np.asarray(human, dtype=np.int64)
    decided = np.array([o != "tie" for o in outcomes], dtype=bool)
    return {
        "pairs": int(len(outcomes)),
        "agreement": float(agreement(score_a, score_b, human_arr)) if len(outcomes) else None,
        "agreement_decided": float(agreement(score_a[decided], score_b[decided], human_arr[decided]))
        if decided.any() else None,
        "tie_rate": float(1 - decided.mean()) if len(outcomes) else None,
    }


class LLMJudge:
    """A local causal LM answering the paper's judging prompt with its first line, "s1 s2"."""

    def __init__(self, config: LLMJudgeConfig) -> None:
        self.config = config
        self.path = resolve_model_path(config.model, field="evaluation.llm_judge.model")
        self.device = pick_device(config.device)
        self.model, self.tokenizer = load_causal_lm(self.path, device=str(self.device))
        self.model.eval()
        tok = self.tokenizer
        self._digits = [self._single_token(str(d)) for d in range(10)]
        self._space = self._single_token(" ")
        self._newline = self._single_token("\n")
        if None in self._digits or self._space is None or self._newline is None:
            raise ValueError(f"judge model {config.model}: its tokenizer does not spell digits, ' ' and '\\n' as "
                             "single tokens, which the constrained score line needs")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token

    def _single_token(self, text: str) -> int | None:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[0] if len(ids) == 1 else None

    def _cut(self, text: str, max_tokens: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= max_tokens else self.tokenizer.decode(ids[:max_tokens]) + " ..."

    def prompt_text(self, question: str, first: str, second: str) -> str:
        cfg = self.config
        system, user = judge_prompt(self._cut(question, cfg.max_question_tokens),
                                    self._cut(first, cfg.max_answer_tokens), self._cut(second, cfg.max_answer_tokens))
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            try:
                return tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                               tokenize=False, add_generation_prompt=True)
            except Exception:  # noqa: BLE001 - templates without a system role (e.g. Gemma): fold it in
                return tok.apply_chat_template([{"role": "user", "content": f"{system}\n\n{user}"}],
                                               tokenize=False, add_generation_prompt=True)
        return f"{system}\n\n{user}"

    def _allowed(self, generated: list[int]) -> list[int]:
        """Tokens that keep the reply on the line "s1 s2" with s in 1..10."""
        one, zero = self._digits[1], self._digits[0]
        separators = 0
        number: list[int] = []
        for token in generated:
            if token == self._newline:
                return [self._newline]  # done; further steps only pad
            if token == self._space:
                separators += 1
                number = []
            else:
                number.append(token)
        if not number:
            return self._digits[1:]
        allowed = [zero] if number == [one] else []
        return allowed + [self._space if separators == 0 else self._newline]

    def fingerprint(self) -> dict[str, Any]:
        return {"model": str(self.path), "model_hash": model_hash(self.path),
                **self.config.model_dump(exclude={"device", "model"})}

    def rate(self, questions: Sequence[str], firsts: Sequence[str], seconds: Sequence[str],
             progress: bool = False) -> list[tuple[float, float] | None]:
        """(score of the first answer, score of the second) per item, greedy and constrained."""
        tok = self.tokenizer
        prompts = [self.prompt_text(q, a, b) for q, a, b in zip(questions, firsts, seconds)]
        lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
        results: list[tuple[float, float] | None] = [None] * len(prompts)
        padding_side = tok.padding_side
        tok.padding_side = "left"
        try:
            for start in tqdm(range(0, len(order), self.config.batch_size), desc="judge", unit="batch",
                              disable=not progress):
                batch = order[start : start + self.config.batch_size]
                encoded = tok([prompts[i] for i in batch], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(self.device)
                width = encoded["input_ids"].shape[1]
                with torch.inference_mode():
                    out = self.model.generate(
                        **encoded, max_new_tokens=5, do_sample=False, num_beams=1,
                        prefix_allowed_tokens_fn=lambda _, ids: self._allowed(ids[width:].tolist()),
                        pad_token_id=tok.pad_token_id, eos_token_id=self._newline,
                    )
                for row, ids in zip(batch, out[:, width:]):
                    results[row] = parse_scores(tok.decode(ids, skip_special_tokens=True))
        finally:
            tok.padding_side = padding_side
        return results


def llm_judge_pairs(judge: LLMJudge, instructions: Sequence[str], inputs: Sequence[str], answers_a: Sequence[str],
                    answers_b: Sequence[str], progress: bool = False) -> pd.DataFrame:
    """The LLM judge on (instruction, input) prompts, both orders, paper counting."""
    questions = [user_message(i, x) for i, x in zip(instructions, inputs)]
    return judge_both_orders(questions, answers_a, answers_b,
                             lambda q, f, s: judge.rate(q, f, s, progress=progress))


def scorer_judge_pairs(scorer: Any, instructions: Sequence[str], inputs: Sequence[str], answers_a: Sequence[str],
                       answers_b: Sequence[str], tie_margin: float, progress: bool = False) -> pd.DataFrame:
    """The quality scorer as a judge: both answers scored, the gap decides (``tie_margin``)."""
    n = len(instructions)
    scores = scorer.score(list(instructions) * 2, list(inputs) * 2, list(answers_a) + list(answers_b),
                          progress=progress)["quality_score"].to_numpy(dtype=np.float64)
    a, b = scores[:n], scores[n:]
    return pd.DataFrame({"score_a": a, "score_b": b, "outcome": scorer_outcomes(a, b, tie_margin)})


def rule_outcomes(values_a: Sequence[float], values_b: Sequence[float]) -> list[Outcome]:
    """Outcomes of a trivial rule (e.g. "the longer answer wins"), for reference rows in reports."""
    return scorer_outcomes(values_a, values_b, tie_margin=0.0)


_WS = re.compile(r"\s+")


def answer_length(text: str) -> int:
    """Words in an answer (the length baseline people's votes are compared with)."""
    return len(_WS.split(text.strip())) if text and text.strip() else 0
